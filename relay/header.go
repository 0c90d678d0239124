package relay

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/emersion/go-message/textproto"

	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

// Replies about message content.
var (
	errBareNewline   = policy.Reject(554, [3]int{5, 6, 0}, "Message refused: bare CR or LF found, lines must end with CRLF")
	errTooBig        = policy.Reject(552, [3]int{5, 3, 4}, "Message size exceeds fixed maximum message size")
	errHeaderTooBig  = policy.Reject(552, [3]int{5, 3, 4}, "Message header exceeds fixed maximum size")
	errHeaderInvalid = policy.Reject(554, [3]int{5, 6, 0}, "Message header is malformed")
)

// bodyReader checks a message as it streams from the client: it counts
// the bytes against a limit and refuses a bare CR or a bare LF anywhere
// (SMTP smuggling: a next hop might take "\n.\n" or "\r.\r" for the end of
// the data and the rest for a second message). A message that does not end
// with CRLF (possible with BDAT) gets one. The first error sticks; err
// reports it.
type bodyReader struct {
	r      io.Reader
	limit  int64
	n      int64
	prevCR bool
	prevLF bool
	tail   []byte
	eof    bool
	err    error
	// checked is set when the source refuses bare CR and LF itself (its
	// Read fails with errBareNewline), so the bytes need no second look.
	checked bool
	// atEOF, when set, is asked before EOF is passed on; an error
	// replaces EOF.
	atEOF func() error
}

func newBodyReader(r io.Reader, limit int64) *bodyReader {
	return &bodyReader{r: r, limit: limit, prevLF: true}
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		if len(b.tail) == 0 {
			return 0, io.EOF
		}
		n := copy(p, b.tail)
		b.tail = b.tail[n:]
		return n, nil
	}
	n, err := b.r.Read(p)
	if b.checked {
		if n > 0 {
			b.prevCR, b.prevLF = p[n-1] == '\r', p[n-1] == '\n'
		}
	} else {
		for _, c := range p[:n] {
			if b.prevCR != (c == '\n') {
				b.err = errBareNewline
				return 0, b.err
			}
			b.prevCR = c == '\r'
			b.prevLF = c == '\n'
		}
	}
	b.n += int64(n)
	if b.limit > 0 && b.n > b.limit {
		b.err = errTooBig
		return 0, b.err
	}
	switch {
	case err == io.EOF:
		if b.prevCR {
			b.err = errBareNewline
			return 0, b.err
		}
		if b.atEOF != nil {
			if e := b.atEOF(); e != nil {
				b.err = e
				return 0, e
			}
		}
		b.eof = true
		if !b.prevLF {
			b.tail = []byte("\r\n")
		}
		if n == 0 {
			return b.Read(p)
		}
		return n, nil
	case err != nil:
		b.err = err
	}
	return n, err
}

// readHeaderBlock reads the header fields of a message, up to and without
// the empty line that ends them. sawBlank is false when the message ended
// inside the header. More than max bytes is errHeaderTooBig.
func readHeaderBlock(br *bufio.Reader, max int) (raw []byte, sawBlank bool, err error) {
	atStart := true
	for {
		chunk, err := br.ReadSlice('\n')
		if atStart && string(chunk) == "\r\n" {
			return raw, true, nil
		}
		raw = append(raw, chunk...)
		if len(raw) > max {
			return nil, false, errHeaderTooBig
		}
		atStart = len(chunk) > 0 && chunk[len(chunk)-1] == '\n'
		switch {
		case err == nil, errors.Is(err, bufio.ErrBufferFull):
		case err == io.EOF:
			return raw, false, nil
		default:
			return nil, false, err
		}
	}
}

// parseHeader parses a header block read by readHeaderBlock.
func parseHeader(raw []byte) (textproto.Header, error) {
	r := bufio.NewReaderSize(io.MultiReader(bytes.NewReader(raw), strings.NewReader("\r\n")), min(len(raw)+2, 4096))
	h, err := textproto.ReadHeader(r)
	if err != nil {
		return textproto.Header{}, errHeaderInvalid
	}
	return h, nil
}

// traceInfo is what the Received header says about a submission.
type traceInfo struct {
	Helo     string
	Addr     netip.Addr
	Host     string
	ESMTP    bool
	Auth     bool // authenticated with AUTH (not by address)
	UTF8     bool
	TLS      *tls.ConnectionState
	Received time.Time
}

// protocol returns the RFC 3848 (and RFC 6531) "with" keyword.
func (t *traceInfo) protocol() string {
	if !t.ESMTP {
		return "SMTP"
	}
	p := "ESMTP"
	if t.UTF8 {
		p = "UTF8SMTP"
	}
	if t.TLS != nil {
		p += "S"
	}
	if t.Auth {
		p += "A"
	}
	return p
}

// receivedHeader returns the Received header field (RFC 5321 §4.4) for a
// submission, folded, with CRLF. It names the client by its EHLO name and
// address and the TLS version and cipher; it never names the user.
func receivedHeader(t *traceInfo) string {
	helo := t.Helo
	if !validDomain(helo) && !validAddrLiteral(helo) {
		helo = "unknown"
	}
	ip := "unknown"
	if t.Addr.IsValid() {
		if t.Addr.Is4() {
			ip = "[" + t.Addr.String() + "]"
		} else {
			ip = "[IPv6:" + t.Addr.WithZone("").String() + "]"
		}
	}
	var b strings.Builder
	b.WriteString("Received: from ")
	b.WriteString(helo)
	b.WriteString(" (")
	b.WriteString(ip)
	b.WriteString(")\r\n\tby ")
	b.WriteString(t.Host)
	b.WriteString(" (baton) with ")
	b.WriteString(t.protocol())
	if t.TLS != nil {
		b.WriteString("\r\n\t(using ")
		b.WriteString(tls.VersionName(t.TLS.Version))
		b.WriteString(" with cipher ")
		b.WriteString(tls.CipherSuiteName(t.TLS.CipherSuite))
		b.WriteString(")")
	}
	b.WriteString(";\r\n\t")
	b.WriteString(t.Received.Format(time.RFC1123Z))
	b.WriteString("\r\n")
	return b.String()
}

// fixUps returns the header fields RFC 6409 §8 lets a submission server
// add when they are missing: Date (§8.3) and Message-ID (§8.4).
func fixUps(h textproto.Header, host string, now time.Time) string {
	var b strings.Builder
	if !h.Has("Date") {
		b.WriteString("Date: ")
		b.WriteString(now.Format(time.RFC1123Z))
		b.WriteString("\r\n")
	}
	if !h.Has("Message-Id") {
		b.WriteString("Message-ID: <")
		b.WriteString(strings.ToLower(string(queue.NewID())))
		b.WriteString(".")
		b.WriteString(now.UTC().Format("20060102150405"))
		b.WriteString("@")
		b.WriteString(host)
		b.WriteString(">\r\n")
	}
	return b.String()
}
