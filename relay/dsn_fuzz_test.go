package relay

import (
	"bytes"
	"io"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-message"

	"github.com/batonmail/baton/queue"
)

// crlfReference is the obvious whole-buffer version of dsnCRLFReader.
func crlfReference(in []byte) []byte {
	var out []byte
	for i := 0; i < len(in); i++ {
		switch in[i] {
		case '\r':
			out = append(out, '\r', '\n')
			if i+1 < len(in) && in[i+1] == '\n' {
				i++
			}
		case '\n':
			out = append(out, '\r', '\n')
		default:
			out = append(out, in[i])
		}
	}
	if len(out) > 0 && out[len(out)-1] != '\n' {
		out = append(out, '\r', '\n')
	}
	return out
}

func FuzzDSNCRLFReader(f *testing.F) {
	for _, s := range []string{"", "a", "a\r", "\r\n\r\n", "a\n\rb", "x\r\r\n", strings.Repeat("ab\r", 5000)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		want := crlfReference(in)
		for _, r := range []io.Reader{bytes.NewReader(in), iotest.OneByteReader(bytes.NewReader(in)), iotest.HalfReader(bytes.NewReader(in))} {
			got, err := io.ReadAll(newDSNCRLFReader(r))
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("crlf(%q) = %q, %v; want %q", in, got, err, want)
			}
		}
		hdr, err := io.ReadAll(&dsnHeaderReader{r: newDSNCRLFReader(iotest.HalfReader(bytes.NewReader(in))), lineStart: true})
		if err != nil {
			t.Fatal(err)
		}
		wantHdr := want
		if i := bytes.Index(want, []byte("\r\n\r\n")); i >= 0 {
			wantHdr = want[:i+2]
		}
		if bytes.HasPrefix(want, []byte("\r\n")) {
			wantHdr = nil
		}
		if !bytes.Equal(hdr, wantHdr) {
			t.Fatalf("header(%q) = %q, want %q", in, hdr, wantHdr)
		}
	})
}

// FuzzBuildDSN feeds hostile reply texts, hosts, addresses and originals
// to BuildDSN and checks that the result is always a well-formed report:
// CRLF only, no overlong generated lines, three parts that go-message can
// read, and exactly one recipient group naming the recipient.
func FuzzBuildDSN(f *testing.F) {
	f.Add("No such user", "mx.dest.test", "5.1.1", 550, "u@dest.test", "env", "Subject: x\r\n\r\nbody\r\n", true, false)
	f.Add("line1\r\nline2\x00\x7f", "evil\r\nX-Injected: 1", "4.4.7", 451, "ü@dest.test", "a\r\nb", "no header at all", false, true)
	f.Add(strings.Repeat("long ", 400), "", "", 0, "x@y.test", "", "\r\nbody only\n", true, true)
	f.Fuzz(func(t *testing.T, text, host, enhanced string, code int, addr, envid, original string, full, expired bool) {
		if strings.TrimSpace(addr) == "" || strings.ContainsAny(addr, "\r\n") {
			return // queue.Envelope.Validate refuses such recipients
		}
		m, _ := dsnMessage(queue.RetHeaders)
		if full {
			m.Envelope.Ret = queue.RetFull
		}
		m.Envelope.EnvID = envid
		m.Size = int64(len(original))
		rs := []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: addr}, State: queue.RcptFailed, Attempts: 1, Expired: expired,
			Last: queue.Reply{Code: code, Enhanced: enhanced, Text: text, Host: host}}}
		cfg := DSNConfig{ReportingMTA: "relay.example.test", Now: func() time.Time { return dsnReceived }}
		env, body, err := BuildDSN(cfg, m, rs, DSNFailure, strings.NewReader(original))
		if err != nil || env == nil {
			t.Fatalf("BuildDSN = %v, %v", env, err)
		}
		raw, err := io.ReadAll(body)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\r")) || bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\n")) {
			t.Fatalf("bare CR or LF in DSN:\n%q", raw)
		}
		// Generated lines (everything before the third part) stay short.
		gen, _, _ := bytes.Cut(raw, []byte("Content-Description: Undelivered Message"))
		for _, l := range bytes.Split(gen, []byte("\r\n")) {
			if len(l) > 998 {
				t.Fatalf("generated line of %d bytes", len(l))
			}
		}
		e, err := message.Read(bytes.NewReader(raw))
		if err != nil {
			t.Fatalf("go-message: %v", err)
		}
		mr := e.MultipartReader()
		if mr == nil {
			t.Fatal("not multipart")
		}
		var parts []string
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("part %d: %v", len(parts), err)
			}
			b, err := io.ReadAll(p.Body)
			if err != nil {
				t.Fatal(err)
			}
			parts = append(parts, string(b))
		}
		if len(parts) != 3 {
			t.Fatalf("%d parts", len(parts))
		}
		groups := dsnStatusGroups(t, parts[1])
		if len(groups) != 2 {
			t.Fatalf("%d status groups:\n%s", len(groups), parts[1])
		}
		norm := func(s string) string { return strings.Join(strings.Fields(s), " ") }
		fr := norm(groups[1].Get("Final-Recipient"))
		if clean := dsnOneLine(addr, 900); !strings.HasSuffix(fr, norm("; "+clean)) && !strings.HasSuffix(fr, norm("; "+dsnASCIIOnly(clean))) {
			t.Fatalf("Final-Recipient %q for %q", fr, addr)
		}
		if groups[1].Get("X-Injected") != "" || groups[0].Get("X-Injected") != "" {
			t.Fatal("header injection through reply fields")
		}
	})
}
