package relay

import (
	"bytes"
	"strings"

	"github.com/emersion/go-message/textproto"

	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

// hasStream reports whether the Submitter delivers the named stream; a
// Submitter that is no StreamChecker decides at Submit.
func (s *Server) hasStream(name string) bool {
	if sc, ok := s.cfg.Submitter.(StreamChecker); ok {
		return sc.HasStream(name)
	}
	return true
}

// pinnedStream returns the stream the session's identity pins, or "";
// the caller holds ss.mu.
func (ss *session) pinnedStream() string {
	switch {
	case ss.authID != nil:
		return ss.authID.Stream
	case ss.w.allowed != nil:
		return ss.w.allowed.Stream
	}
	return ""
}

// chooseStream applies the stream header of a message: it sets
// env.Stream from it unless the identity pinned the stream already, and
// returns the header block without the field (h loses it too). Every
// other field is kept byte for byte. A header naming a stream that is not
// delivered is refused with 554 5.6.0: RFC 3463 X.6.0, a problem with the
// message's content that retrying cannot fix (5.7.1 would claim a
// permission problem, which it is not).
func (s *Server) chooseStream(env *queue.Envelope, h *textproto.Header, raw []byte) ([]byte, error) {
	name := s.cfg.StreamHeader
	if !h.Has(name) {
		return raw, nil
	}
	// With several fields the first decides; all are removed.
	want := strings.ToLower(strings.TrimSpace(h.Get(name)))
	h.Del(name)
	raw = removeField(raw, name)
	if env.Stream != "" {
		return raw, nil
	}
	if ValidStreamName(want) != nil || !s.hasStream(want) {
		return nil, policy.Reject(554, [3]int{5, 6, 0}, "Unknown mail stream in the "+name+" header field")
	}
	env.Stream = want
	return raw, nil
}

// removeField returns the header block raw without the fields named name
// (ASCII case ignored, as are blanks before the colon, as the header parser
// does), continuation lines included. Every other line stays as it was:
// writing the parsed header back would drop the lines the parser skips.
func removeField(raw []byte, name string) []byte {
	out := make([]byte, 0, len(raw))
	drop := false
	for len(raw) > 0 {
		line := raw
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line = raw[:i+1]
		}
		raw = raw[len(line):]
		if line[0] != ' ' && line[0] != '\t' {
			// A new field: is it one to drop?
			key, _, ok := bytes.Cut(line, []byte(":"))
			drop = ok && strings.EqualFold(string(bytes.TrimRight(key, " \t")), name)
		}
		if !drop {
			out = append(out, line...)
		}
	}
	return out
}
