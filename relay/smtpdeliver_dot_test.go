package relay

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"testing"

	"github.com/batonmail/baton/mx"
)

// textprotoDot is what net/textproto's DotWriter writes for body followed
// by Close: the reference dotStuffer must match.
func textprotoDot(body []byte) []byte {
	var out bytes.Buffer
	bw := bufio.NewWriter(&out)
	w := textproto.NewWriter(bw).DotWriter()
	w.Write(body)
	w.Close()
	return out.Bytes()
}

// fastDot stuffs body in blocks cut at the given offsets, as copyBody
// does, and appends what an untouched DotWriter's Close writes.
func fastDot(body []byte, cuts ...int) []byte {
	var st dotStuffer
	var out []byte
	prev := 0
	for _, c := range cuts {
		c = min(max(c, prev), len(body))
		out = st.stuff(out, body[prev:c])
		prev = c
	}
	out = st.stuff(out, body[prev:])
	out = out[:len(out)-st.closeTrim()]
	return append(out, "\r\n.\r\n"...)
}

// randomBody is a body of n bytes over an alphabet rich in the bytes that
// matter to dot-stuffing: dots, CR, LF and line-start positions.
func randomBody(r *rand.Rand, n int) []byte {
	const alpha = "..\r\n\r\nab."
	b := make([]byte, n)
	for i := range b {
		if r.IntN(4) == 0 {
			b[i] = alpha[r.IntN(len(alpha))]
		} else {
			b[i] = byte('a' + r.IntN(26))
		}
	}
	return b
}

func TestDotStuffer_MatchesTextproto(t *testing.T) {
	for _, s := range []string{
		"", ".", "\r", "\n", "\r\n", ".\r\n", "..\r\n", "a", "a\r", "a\n", "a\r\n",
		"\r\r\n", "\r.\r\n", "\n.\n", ".\r.\r", "x\r\n.\r\nafter", "\n\n\n", "\r\r\r",
		"line\r\n.leading\r\n..two\r\n.\r\n", "bare\nlf\n.dot\n",
	} {
		want := textprotoDot([]byte(s))
		for cut := 0; cut <= len(s); cut++ {
			if got := fastDot([]byte(s), cut); !bytes.Equal(got, want) {
				t.Errorf("%q cut at %d: got %q, want %q", s, cut, got, want)
			}
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		body := randomBody(r, r.IntN(300))
		cuts := []int{r.IntN(len(body) + 1), r.IntN(len(body) + 1), r.IntN(len(body) + 1)}
		if cuts[1] < cuts[0] {
			cuts[0], cuts[1] = cuts[1], cuts[0]
		}
		if got, want := fastDot(body, cuts...), textprotoDot(body); !bytes.Equal(got, want) {
			t.Fatalf("%q cut at %v:\ngot  %q\nwant %q", body, cuts, got, want)
		}
	}
}

// FuzzDotStuffer checks dotStuffer against net/textproto's DotWriter on
// any input cut anywhere into two or three blocks.
func FuzzDotStuffer(f *testing.F) {
	f.Add([]byte("a\r\n.b\r\n..\r\n.\r\n"), uint16(3), uint16(7))
	f.Add([]byte("\r\r\n\n.\r."), uint16(1), uint16(2))
	f.Add([]byte(""), uint16(0), uint16(0))
	f.Fuzz(func(t *testing.T, body []byte, c1, c2 uint16) {
		cuts := []int{int(c1) % (len(body) + 1), int(c2) % (len(body) + 1)}
		if cuts[1] < cuts[0] {
			cuts[0], cuts[1] = cuts[1], cuts[0]
		}
		if got, want := fastDot(body, cuts...), textprotoDot(body); !bytes.Equal(got, want) {
			t.Fatalf("%q cut at %v:\ngot  %q\nwant %q", body, cuts, got, want)
		}
	})
}

// TestSMTPDeliver_DotStuffedOnTheWire delivers bodies of every size
// around copyBody's block size, with dots, bare CRs and bare LFs, and
// checks that the bytes between the 354 reply and the end of data are
// exactly what go-smtp's own DotWriter would have sent, in lockstep and
// pipelined (where the end of data goes out with the last block).
func TestSMTPDeliver_DotStuffedOnTheWire(t *testing.T) {
	for _, ext := range []string{"8BITMIME", "PIPELINING"} {
		t.Run(ext, func(t *testing.T) { testDotStuffedOnTheWire(t, ext) })
	}
}

func testDotStuffedOnTheWire(t *testing.T, ext string) {
	var mu sync.Mutex
	var got [][]byte
	addr := sdRawPeer(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		say := func(s string) { c.Write([]byte(s + "\r\n")) }
		say("220 raw.example.test ESMTP")
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			cmd := strings.ToUpper(strings.TrimSpace(line))
			switch {
			case strings.HasPrefix(cmd, "EHLO"):
				say("250-raw.example.test")
				say("250 " + ext)
			case cmd == "DATA":
				say("354 go ahead")
				// A stuffed body never holds CRLF.CRLF before its end.
				var data []byte
				for !bytes.HasSuffix(data, []byte("\r\n.\r\n")) {
					b, err := br.ReadByte()
					if err != nil {
						return
					}
					data = append(data, b)
				}
				mu.Lock()
				got = append(got, data)
				mu.Unlock()
				say("250 2.0.0 ok")
			case cmd == "QUIT":
				say("221 bye")
				return
			default:
				say("250 2.0.0 ok")
			}
		}
	})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, sdHostAt("mx.example.test", addr))
	r := rand.New(rand.NewPCG(3, 4))
	var bodies [][]byte
	for _, n := range []int{0, 1, 2, 3, 32<<10 - 2, 32<<10 - 1, 32 << 10, 32<<10 + 1, 70000, 100 << 10} {
		bodies = append(bodies, randomBody(r, n))
	}
	// Clean bodies ending at a block boundary with CRLF, CR and a dot.
	for _, tail := range []string{"\r\n", "\r", ".", "\r\n."} {
		b := bytes.Repeat([]byte("x"), 32<<10-len(tail))
		bodies = append(bodies, append(b, tail...))
	}
	for i, body := range bodies {
		res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), body))
		wantCodes(t, res, 250)
		mu.Lock()
		if len(got) != i+1 {
			mu.Unlock()
			t.Fatalf("body %d: peer got %d messages", i, len(got))
		}
		if want := textprotoDot(body); !bytes.Equal(got[i], want) {
			t.Errorf("body %d (%d bytes): %d bytes on the wire differ from DotWriter's %d", i, len(body), len(got[i]), len(want))
		}
		mu.Unlock()
	}
}

// BenchmarkDotStuff compares dotStuffer with net/textproto's DotWriter
// (what go-smtp's client uses) on 5 KB and 100 KB bodies.
func BenchmarkDotStuff(b *testing.B) {
	for _, size := range []int{5 << 10, 100 << 10} {
		body := sdBenchBody(size)
		b.Run(fmt.Sprintf("textproto/size=%dKB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			bw := bufio.NewWriter(io.Discard)
			for b.Loop() {
				w := textproto.NewWriter(bw).DotWriter()
				for off := 0; off < len(body); off += 32 << 10 {
					w.Write(body[off:min(len(body), off+32<<10)])
				}
				w.Close()
			}
		})
		b.Run(fmt.Sprintf("block/size=%dKB", size>>10), func(b *testing.B) {
			b.SetBytes(int64(len(body)))
			out := make([]byte, 0, 40<<10)
			for b.Loop() {
				var st dotStuffer
				for off := 0; off < len(body); off += 32 << 10 {
					out = st.stuff(out[:0], body[off:min(len(body), off+32<<10)])
				}
			}
		})
	}
}
