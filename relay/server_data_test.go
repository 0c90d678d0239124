package relay

import (
	"bytes"
	"math/rand/v2"
	"strings"
	"testing"
)

// refDataRead is go-smtp's dataReader (data.go, v0.25.1) byte by byte,
// with the bare CR/LF check wire made on the raw lines before wireData:
// the reference wireData must match. It returns the message, how many
// bytes of raw it read, whether it found the end of data, and whether a
// bare CR or LF came before that.
func refDataRead(raw []byte) (out []byte, used int, eof, bare bool) {
	const (
		stateBeginLine = iota
		stateDot
		stateDotCR
		stateCR
		stateData
		stateEOF
	)
	state := stateBeginLine
	w := &wire{}
	for used < len(raw) && state != stateEOF {
		c := raw[used]
		used++
		switch state {
		case stateBeginLine:
			if c == '.' {
				state = stateDot
				continue
			}
			if c == '\r' {
				state = stateCR
				break
			}
			state = stateData
		case stateDot:
			if c == '\r' {
				state = stateDotCR
				continue
			}
			state = stateData
		case stateDotCR:
			if c == '\n' {
				state = stateEOF
				continue
			}
			state = stateData
		case stateCR:
			if c == '\n' {
				state = stateBeginLine
				break
			}
			state = stateData
		case stateData:
			if c == '\r' {
				state = stateCR
			}
		}
		out = append(out, c)
	}
	w.checkBare(raw[:used])
	return out, used, state == stateEOF, w.bare.Load()
}

// refLineTooLong is go-smtp's lineLimitReader over the bytes of a
// message, its counter at 1 after "DATA\r\n".
func refLineTooLong(raw []byte, limit int) bool {
	if limit == 0 {
		return false // no limit
	}
	n := 1
	for _, c := range raw {
		if c == '\n' {
			n = 0
		}
		n++
		if n > limit {
			return true
		}
	}
	return false
}

// fastDataRead runs wireData's unstuff and countLines over raw, handed
// in pieces of at most srcMax bytes into reads of at most dstMax bytes,
// the way read does over wire's buffer.
func fastDataRead(raw []byte, srcMax, dstMax, limit int) (out []byte, used int, eof, bare, tooLong bool) {
	d := &wireData{lineLen: 1, lineMax: limit}
	dst := make([]byte, dstMax)
	for used < len(raw) && !d.eof {
		src := raw[used:min(len(raw), used+srcMax)]
		nsrc, n := d.unstuff(dst, src)
		if !d.countLines(src[:nsrc]) {
			tooLong = true
		}
		out = append(out, dst[:n]...)
		used += nsrc
	}
	return out, used, d.eof, d.bare, tooLong
}

// randomData is n random bytes rich in dots, CRs and LFs.
func randomData(r *rand.Rand, n int) []byte {
	const alpha = ".\r\n\r\n.."
	b := make([]byte, n)
	for i := range b {
		if r.IntN(3) == 0 {
			b[i] = alpha[r.IntN(len(alpha))]
		} else {
			b[i] = byte('a' + r.IntN(3))
		}
	}
	return b
}

func checkWireData(t *testing.T, raw []byte, srcMax, dstMax, limit int) {
	t.Helper()
	want, wantUsed, wantEOF, wantBare := refDataRead(raw)
	wantLong := refLineTooLong(raw[:wantUsed], limit)
	got, used, eof, bare, long := fastDataRead(raw, srcMax, dstMax, limit)
	if !bytes.Equal(got, want) || used != wantUsed || eof != wantEOF || bare != wantBare || long != wantLong {
		t.Fatalf("%q (src %d, dst %d, limit %d):\ngot  %q used %d eof %v bare %v long %v\nwant %q used %d eof %v bare %v long %v",
			raw, srcMax, dstMax, limit, got, used, eof, bare, long, want, wantUsed, wantEOF, wantBare, wantLong)
	}
	if !bare {
		// bodyReader skips its own bare CR/LF check behind wireData: a
		// message without bare CR or LF as sent has none once unstuffed.
		b := newBodyReader(bytes.NewReader(got), 0)
		if _, err := b.Read(make([]byte, len(got)+1)); err != nil && len(got) > 0 {
			t.Fatalf("%q: clean as sent, but the message %q is not: %v", raw, got, err)
		}
	}
}

func TestWireData_MatchesGoSMTP(t *testing.T) {
	for _, s := range []string{
		"", ".\r\n", "a\r\n.\r\n", "..\r\n.\r\n", ".a\r\n.\r\n", ".\ra\r\n.\r\n", ".\r\r\n.\r\n",
		"\n.\n", "\r.\r", "\r\n.\n", "\n.\r\n", "a\n.\r\nb\r\n.\r\n", "a\r\r\n.\r\n", "a\rb\r\n.\r\n",
		"line\r\n..dot\r\n.\r\nNEXT\r\n", "a\r\n.", "a\r\n.\r", strings.Repeat("x", 30) + "\r\n.\r\n",
	} {
		for src := 1; src <= len(s)+1; src++ {
			for _, dst := range []int{1, 2, 3, 64} {
				for _, limit := range []int{0, 5, 31, 2000} {
					checkWireData(t, []byte(s), src, dst, limit)
				}
			}
		}
	}
	r := rand.New(rand.NewPCG(5, 6))
	for range 5000 {
		raw := randomData(r, r.IntN(200))
		checkWireData(t, raw, 1+r.IntN(64), 1+r.IntN(64), r.IntN(40))
	}
}

// FuzzWireData checks wireData against go-smtp's reader and wire's bare
// CR/LF check on any input, buffer sizes and line limit.
func FuzzWireData(f *testing.F) {
	f.Add([]byte("a\r\n..b\r\n.\r\nMAIL"), uint8(3), uint8(5), uint8(10))
	f.Add([]byte(".\r.\r\n\n.\n\r\n.\r\n"), uint8(1), uint8(1), uint8(0))
	f.Fuzz(func(t *testing.T, raw []byte, src, dst, limit uint8) {
		checkWireData(t, raw, 1+int(src), 1+int(dst), int(limit))
	})
}

// TestServer_DataOverTheWire sends messages of every shape over a real
// connection, each followed at once by a NOOP in the same write: dots
// and bare CRs and LFs anywhere, lengths around wire's 4096-byte buffer.
// The server must answer each as go-smtp's reader and wire's checks
// would have (250 with the message queued exactly as go-smtp un-stuffs
// it, or 554 for a bare CR or LF), and take the NOOP as the next command.
func TestServer_DataOverTheWire(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	r := rand.New(rand.NewPCG(7, 8))
	const head = "Subject: wire\r\n\r\n"
	queued := 0
	for i := range 60 {
		var body []byte
		switch n := []int{0, 10, 4000, 4090, 4096, 4100, 8192, 20000}[i%8]; {
		case i%3 == 0:
			// A clean message, stuffed as a client would.
			clean := bytes.ReplaceAll(randomData(r, n), []byte("\r"), nil)
			clean = bytes.ReplaceAll(clean, []byte("\n"), []byte("\r\n"))
			body = textprotoDot(append(clean, "\r\n"...))
		default:
			body = append(randomData(r, n), "\r\n.\r\n"...)
		}
		raw := append([]byte(head), body...)
		want, used, eof, bare := refDataRead(raw)
		if !eof || refLineTooLong(raw[:used], 2000) {
			// (go-smtp's quirks can swallow the final dot after a bare
			// CR.)
			continue
		}
		rc.expect("MAIL FROM:<a@sender.test>", 250, "")
		rc.expect("RCPT TO:<b@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		rc.send(string(raw[:used]) + "NOOP\r\n")
		code, text := rc.reply()
		switch {
		case bare && code != 554:
			t.Fatalf("message %d with a bare CR or LF: %d %s, want 554", i, code, text)
		case !bare && code != 250:
			t.Fatalf("message %d: %d %s, want 250", i, code, text)
		case !bare:
			queued++
			msgs := ts.messages()
			if len(msgs) != queued {
				t.Fatalf("%d messages queued, want %d", len(msgs), queued)
			}
			id := text[strings.LastIndexByte(text, ' ')+1:]
			var m string
			for _, msg := range msgs {
				if string(msg.ID) == id {
					m = msg.Body
				}
			}
			rest := want[len(head):]
			if !strings.HasSuffix(m, string(rest)) {
				t.Fatalf("message %d: queued body %q does not end with the message as go-smtp reads it, %q", i, m, rest)
			}
		}
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("NOOP after message %d: %d %s", i, code, text)
		}
	}
	t.Logf("%d messages queued, the others refused", queued)
	if queued == 0 {
		t.Fatal("no message was accepted")
	}

	// A line longer than go-smtp's limit closes the connection.
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send(head + strings.Repeat("y", 2100) + "\r\n.\r\nNOOP\r\n")
	if code, text := rc.reply(); code != 500 {
		t.Fatalf("long line: %d %s, want 500", code, text)
	}
	if code, _ := rc.reply(); code != 0 {
		t.Fatalf("after the long line the connection is still open (%d)", code)
	}
}

// TestServer_DataOverTLS reads messages through wireData under STARTTLS:
// bodies larger than a TLS record, dot lines across record boundaries,
// smuggling payloads, each followed in the same write by a NOOP that must
// be the next command.
func TestServer_DataOverTLS(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.startTLS(ts.clientConfig())
	rc.expect("EHLO client.test", 250, "")
	const head = "Subject: tls\r\n\r\n"
	big := strings.Repeat("line of text\r\n..dotted\r\n", 3000) // ~70 KB
	for i, tc := range []struct {
		body string // as sent, through the final dot
		code int
	}{
		{big + ".\r\n", 250},
		{"x\r\n.\n" + big + ".\r\n", 554},
		{"x\n.\r\nMAIL FROM:<evil@sender.test>\r\n.\r\n", 554},
		{"x\r\n\r.\r\n" + big + ".\r\n", 554},
		{".\r\n", 250},
		{"..\r\n...\r\n.\r\n", 250},
	} {
		raw := head + tc.body
		want, used, eof, bare := refDataRead([]byte(raw))
		if !eof || used != len(raw) || bare != (tc.code == 554) {
			t.Fatalf("case %d: bad test input (eof %v, used %d of %d, bare %v)", i, eof, used, len(raw), bare)
		}
		before := len(ts.messages())
		rc.expect("MAIL FROM:<a@sender.test>", 250, "")
		rc.expect("RCPT TO:<b@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		rc.send(raw + "NOOP\r\n")
		code, text := rc.reply()
		if code != tc.code {
			t.Fatalf("case %d: %d %s, want %d", i, code, text, tc.code)
		}
		msgs := ts.messages()
		switch {
		case code == 250 && len(msgs) != before+1, code != 250 && len(msgs) != before:
			t.Fatalf("case %d: %d messages queued, had %d", i, len(msgs), before)
		case code == 250:
			id := text[strings.LastIndexByte(text, ' ')+1:]
			found := false
			for _, m := range msgs {
				if string(m.ID) == id {
					found = true
					if !strings.HasSuffix(m.Body, string(want[len(head):])) {
						t.Fatalf("case %d: queued body does not end with the message as go-smtp reads it", i)
					}
				}
			}
			if !found {
				t.Fatalf("case %d: %s not queued", i, id)
			}
		}
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("NOOP after case %d: %d %s", i, code, text)
		}
	}
}

// TestServer_DataEndSplitAcrossWrites sends the end of a message in two
// writes, split at every position of "\r\n.\r\n" and of the NOOP that
// follows it, so that wireData finds the end of data across the reads of
// its buffer: each message must end exactly at its dot, and the NOOP must
// be the next command.
func TestServer_DataEndSplitAcrossWrites(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	const msg = "Subject: split\r\n\r\nbody\r\n..dot\r\n.\r\nNOOP\r\n"
	tail := len("\r\n.\r\nNOOP\r\n")
	queued := 0
	for k := len(msg) - tail; k < len(msg); k++ {
		rc.expect("MAIL FROM:<a@sender.test>", 250, "")
		rc.expect("RCPT TO:<b@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		rc.send(msg[:k])
		rc.send(msg[k:])
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("split at %d: %d %s", k, code, text)
		}
		queued++
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("NOOP after split at %d: %d %s", k, code, text)
		}
	}
	msgs := ts.messages()
	if len(msgs) != queued {
		t.Fatalf("%d messages queued, want %d", len(msgs), queued)
	}
	for _, m := range msgs {
		if !strings.HasSuffix(m.Body, "\r\n\r\nbody\r\n.dot\r\n") {
			t.Fatalf("queued body %q", m.Body)
		}
	}
}
