package relay

import (
	"testing"

	"github.com/batonmail/baton/queue"
)

// chooseStream removes the stream header's fields, folded lines and all,
// and leaves every other line of the header as it was, even the odd ones
// the header parser skips.
func TestChooseStream_KeepsOtherLinesByteForByte(t *testing.T) {
	s := &Server{cfg: ServerConfig{StreamHeader: DefaultStreamHeader, Submitter: SubmitterFunc(nil)}}
	for _, tc := range []struct{ raw, want string }{
		{"Subject: a\r\nX-Baton-Stream: bulk\r\nTo: b@x.test\r\n", "Subject: a\r\nTo: b@x.test\r\n"},
		{"X-Baton-Stream:\r\n\tbulk\r\nSubject: a\r\n  folded\r\n", "Subject: a\r\n  folded\r\n"},
		{"x-baton-stream : bulk\r\nX-BATON-STREAM: other\r\nTo: b@x.test\r\n", "To: b@x.test\r\n"},
		{"Subject: a\r\n: no name\r\nX-Baton-Stream: bulk\r\n", "Subject: a\r\n: no name\r\n"},
		{"X-Baton-Stream: bulk\r\n", ""},
		{"X-Baton-Streams: x\r\nX-Baton-Stream: bulk\r\nSubject: a\r\n", "X-Baton-Streams: x\r\nSubject: a\r\n"},
	} {
		h, err := parseHeader([]byte(tc.raw))
		if err != nil {
			t.Fatalf("%q: %v", tc.raw, err)
		}
		env := &queue.Envelope{}
		got, err := s.chooseStream(env, &h, []byte(tc.raw))
		if err != nil {
			t.Fatalf("%q: %v", tc.raw, err)
		}
		if string(got) != tc.want {
			t.Errorf("%q:\ngot  %q\nwant %q", tc.raw, got, tc.want)
		}
		if env.Stream != StreamBulk {
			t.Errorf("%q: stream %q, want bulk", tc.raw, env.Stream)
		}
		if h.Has(DefaultStreamHeader) {
			t.Errorf("%q: the parsed header still has the field", tc.raw)
		}
	}
}
