package dkim_test

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/batonmail/baton/dkim"
)

// wellFormed reports whether msg uses CRLF line endings only, as the relay
// guarantees before signing, and every header line is a field
// (name:value) or a continuation. Verifiers disagree about malformed
// header lines (go-msgauth takes a line without a colon as a field named
// by the whole line, dkimpy rejects the message), so no signer can
// satisfy them all there.
func wellFormed(msg []byte) bool {
	hdr, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	for i, line := range bytes.Split(hdr, []byte("\r\n")) {
		if len(line) == 0 {
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			if i == 0 {
				return false
			}
			continue
		}
		name, _, ok := bytes.Cut(line, []byte(":"))
		name = bytes.TrimRight(name, " \t")
		if !ok || len(name) == 0 {
			return false
		}
		for _, c := range name {
			if c < 0x21 || c > 0x7e {
				return false
			}
		}
	}
	for i, c := range msg {
		switch c {
		case '\r':
			if i+1 >= len(msg) || msg[i+1] != '\n' {
				return false
			}
		case '\n':
			if i == 0 || msg[i-1] != '\r' {
				return false
			}
		}
	}
	return true
}

// FuzzSign signs arbitrary messages: Sign must not panic, and whenever it
// signs a well-formed message, go-msgauth must verify every signature.
// Run it longer with: go test -run '^$' -fuzz FuzzSign -fuzztime 60s ./dkim/
func FuzzSign(f *testing.F) {
	for _, m := range testMessages {
		f.Add([]byte(m))
	}
	f.Add([]byte("From: a@example.test\r\nFrom: b@other.test\r\n\r\n"))
	f.Add([]byte("from :a@EXAMPLE.test\r\n \r\n\tx\r\n\r\n\r\n \t\r\n"))
	ks, recs := testKeys(f)
	s, err := dkim.NewSigner(dkim.SignerConfig{Keys: ks, MaxHeaderBytes: 4096})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		sig, err := s.Sign(context.Background(), bytes.NewReader(msg))
		if err != nil || sig == nil || !wellFormed(msg) {
			return
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(sig), "\r\n"), "\r\n") {
			if len(line) > 998 {
				t.Fatalf("signature line of %d bytes", len(line))
			}
		}
		full := string(sig) + string(msg)
		for _, v := range verify(t, recs, full) {
			if v.Err != nil {
				t.Fatalf("d=%s: %v\nmessage %q", v.Domain, v.Err, full)
			}
		}
	})
}
