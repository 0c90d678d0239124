package admin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/mail"
	"github.com/emersion/go-message/textproto"

	"github.com/batonmail/baton/queue"
)

// Mailbox is one sandbox identity's captured mail.
type Mailbox struct {
	Identity string `json:"identity"`
	Messages int    `json:"messages"`
	Bytes    int64  `json:"bytes"`
}

// SandboxMessage describes one captured message.
type SandboxMessage struct {
	ID       queue.ID  `json:"id"`
	Identity string    `json:"identity"`
	From     string    `json:"from"`
	To       []string  `json:"to"`
	Received time.Time `json:"received"`
	Size     int64     `json:"size"`
	// State is the queue state: "held" until an administrator releases
	// the message for real delivery.
	State string `json:"state"`
	// Subject and Date are the message's header fields, decoded.
	Subject string `json:"subject"`
	Date    string `json:"date,omitempty"`
}

// SandboxDetail is a captured message's header and text.
type SandboxDetail struct {
	SandboxMessage
	// Header lists the header fields in order, values decoded where they
	// are encoded words.
	Header []HeaderField `json:"header"`
	// Text is the first text/plain part (or else the first text/html
	// part's source, with TextType saying which), at most maxText bytes.
	Text      string `json:"text"`
	TextType  string `json:"text_type"`
	Truncated bool   `json:"truncated,omitempty"`
}

// HeaderField is one header field.
type HeaderField struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

const (
	// maxSandboxList bounds the messages a mailbox listing shows (newest
	// first), since each costs a body read for its subject.
	maxSandboxList = 500
	// maxHeader bounds the header read for a listing.
	maxHeader = 256 << 10
	// maxText bounds the text shown of one message.
	maxText = 1 << 20
	// maxPartDepth bounds how many multiparts deep the viewer looks for
	// text: the sender shapes captured mail, and each level costs a
	// reader, so a message nested thousands deep would otherwise take
	// the listener's time and memory. Real mail nests a few levels.
	maxPartDepth = 10
)

// errWalkDone ends a walk over a message's parts early.
var errWalkDone = errors.New("admin: walk done")

// sandboxFilter selects the candidates for sandbox mail: captured mail is
// held until an administrator releases it (and then it is delivered), and
// backends apply a state filter from their index, before reading messages.
var sandboxFilter = queue.Filter{State: queue.StateHeld}

// sandboxes counts captured mail per identity.
func (s *Server) sandboxes(ctx context.Context) ([]Mailbox, error) {
	boxes := map[string]*Mailbox{}
	err := s.cfg.Queue.List(ctx, sandboxFilter, func(m *queue.Message) error {
		if !m.Envelope.Sandbox {
			return nil
		}
		b := boxes[m.Envelope.Identity]
		if b == nil {
			b = &Mailbox{Identity: m.Envelope.Identity}
			boxes[m.Envelope.Identity] = b
		}
		b.Messages++
		b.Bytes += m.Size
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([]Mailbox, 0, len(boxes))
	for _, b := range boxes {
		out = append(out, *b)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Identity < out[j].Identity })
	return out, nil
}

// sandboxMessages lists an identity's captured mail, newest first.
func (s *Server) sandboxMessages(ctx context.Context, identity string) ([]SandboxMessage, error) {
	var msgs []*queue.Message
	err := s.cfg.Queue.List(ctx, sandboxFilter, func(m *queue.Message) error {
		if m.Envelope.Sandbox && m.Envelope.Identity == identity {
			msgs = append(msgs, m)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	sort.Slice(msgs, func(i, j int) bool {
		if !msgs[i].Received.Equal(msgs[j].Received) {
			return msgs[i].Received.After(msgs[j].Received)
		}
		return msgs[i].ID < msgs[j].ID
	})
	if len(msgs) > maxSandboxList {
		msgs = msgs[:maxSandboxList]
	}
	out := make([]SandboxMessage, 0, len(msgs))
	for _, m := range msgs {
		sm := summarize(m)
		if h, err := s.readHeader(ctx, m.ID); err == nil {
			mh := mail.Header{Header: message.Header{Header: h}}
			sm.Subject, _ = mh.Subject()
			sm.Date = h.Get("Date")
		} else if errors.Is(err, queue.ErrNotFound) {
			continue // delivered or deleted meanwhile
		} else {
			s.log.Warn("sandbox: cannot read header", "id", m.ID, "err", err)
		}
		out = append(out, sm)
	}
	return out, nil
}

func summarize(m *queue.Message) SandboxMessage {
	sm := SandboxMessage{ID: m.ID, Identity: m.Envelope.Identity, From: m.Envelope.From, Received: m.Received,
		Size: m.Size, State: m.State.String(), To: []string{}}
	for _, rc := range m.Envelope.To {
		sm.To = append(sm.To, rc.Addr)
	}
	return sm
}

func (s *Server) readHeader(ctx context.Context, id queue.ID) (textproto.Header, error) {
	rc, err := s.cfg.Queue.Open(ctx, id)
	if err != nil {
		return textproto.Header{}, err
	}
	defer rc.Close()
	return textproto.ReadHeader(bufio.NewReader(io.LimitReader(rc, maxHeader)))
}

// sandboxGet returns message id if it is captured sandbox mail. Other
// messages are not found here: the sandbox endpoints show only what
// sandbox identities submitted.
func (s *Server) sandboxGet(ctx context.Context, id queue.ID) (*queue.Message, error) {
	if id == "" {
		return nil, fmt.Errorf("%w: id is required", errBadRequest)
	}
	m, err := s.cfg.Queue.Get(ctx, id)
	if errors.Is(err, queue.ErrInvalid) {
		err = fmt.Errorf("%w: %s", queue.ErrNotFound, id)
	}
	if err != nil {
		return nil, err
	}
	if !m.Envelope.Sandbox {
		return nil, fmt.Errorf("%w: %s is not sandbox mail", queue.ErrNotFound, id)
	}
	return m, nil
}

// sandboxMessage parses a captured message for viewing.
func (s *Server) sandboxMessage(ctx context.Context, id queue.ID) (*SandboxDetail, error) {
	m, err := s.sandboxGet(ctx, id)
	if err != nil {
		return nil, err
	}
	rc, err := s.cfg.Queue.Open(ctx, id)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	d := &SandboxDetail{SandboxMessage: summarize(m), Header: []HeaderField{}}
	// message.Read decodes transfer encodings and known charsets; an
	// unknown charset leaves the part's bytes as they are, which is
	// still worth showing.
	e, err := message.Read(bufio.NewReader(rc))
	if err != nil && !message.IsUnknownCharset(err) && !message.IsUnknownEncoding(err) {
		return nil, fmt.Errorf("admin: parse message %s: %w", id, err)
	}
	fields := e.Header.Fields()
	for fields.Next() {
		v, err := fields.Text()
		if err != nil {
			v = fields.Value()
		}
		d.Header = append(d.Header, HeaderField{Name: fields.Key(), Value: v})
	}
	mh := mail.Header{Header: e.Header}
	d.Subject, _ = mh.Subject()
	d.Date = e.Header.Get("Date")

	var html string
	e.Walk(func(path []int, part *message.Entity, err error) error {
		if len(path) > maxPartDepth {
			return errWalkDone
		}
		if err != nil && !message.IsUnknownCharset(err) && !message.IsUnknownEncoding(err) {
			return nil
		}
		t, _, _ := part.Header.ContentType()
		if t == "" && part == e {
			t = "text/plain" // RFC 2045 §5.2 default
		}
		switch t {
		case "text/plain":
			d.Text, d.Truncated = readText(part.Body)
			d.TextType = t
			return errWalkDone // the first text/plain part is the one shown
		case "text/html":
			if html == "" {
				html, _ = readText(part.Body)
			}
		}
		return nil
	})
	if d.TextType == "" && html != "" {
		d.Text, d.TextType = html, "text/html"
	}
	return d, nil
}

// readText reads up to maxText bytes of r; truncated says there was more.
func readText(r io.Reader) (string, bool) {
	b, _ := io.ReadAll(io.LimitReader(r, maxText+1))
	if len(b) > maxText {
		return strings.ToValidUTF8(string(b[:maxText]), "\uFFFD"), true
	}
	return strings.ToValidUTF8(string(b), "\uFFFD"), false
}
