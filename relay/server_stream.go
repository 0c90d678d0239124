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
	var b bytes.Buffer
	b.Grow(len(raw))
	if err := textproto.WriteHeader(&b, *h); err != nil {
		return nil, errHeaderInvalid
	}
	raw = bytes.TrimSuffix(b.Bytes(), []byte("\r\n")) // the empty line WriteHeader ends with
	if env.Stream != "" {
		return raw, nil
	}
	if ValidStreamName(want) != nil || !s.hasStream(want) {
		return nil, policy.Reject(554, [3]int{5, 6, 0}, "Unknown mail stream in the "+name+" header field")
	}
	env.Stream = want
	return raw, nil
}
