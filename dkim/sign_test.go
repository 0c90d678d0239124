package dkim_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/dkim"
)

// loadKey loads a test key from testdata.
func loadKey(t testing.TB, domain, selector, file string) dkim.Key {
	t.Helper()
	s, err := dkim.LoadPrivateKey("testdata/" + file)
	if err != nil {
		t.Fatal(err)
	}
	return dkim.Key{Domain: domain, Selector: selector, Signer: s}
}

// testKeys returns a store with an RSA and an Ed25519 key for
// example.test, an RSA key for other.test, and the TXT records that
// publish them.
func testKeys(t testing.TB) (*dkim.KeyStore, map[string]string) {
	t.Helper()
	keys := []dkim.Key{
		loadKey(t, "example.test", "rsa1", "rsa2048.pem"),
		loadKey(t, "example.test", "ed1", "ed25519.pem"),
		loadKey(t, "other.test", "k1", "rsa2048-pkcs1.pem"),
	}
	ks, err := dkim.NewKeyStore(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return ks, records(t, keys...)
}

func records(t testing.TB, keys ...dkim.Key) map[string]string {
	t.Helper()
	recs := make(map[string]string)
	for _, k := range keys {
		txt, err := k.TXT()
		if err != nil {
			t.Fatal(err)
		}
		recs[k.RecordName()] = txt
	}
	return recs
}

func newSigner(t testing.TB, cfg dkim.SignerConfig) *dkim.Signer {
	t.Helper()
	s, err := dkim.NewSigner(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sign(t testing.TB, s *dkim.Signer, msg string) string {
	t.Helper()
	sig, err := s.Sign(context.Background(), strings.NewReader(msg))
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	return string(sig)
}

// verify checks every signature of msg with go-msgauth and returns the
// verifications.
func verify(t testing.TB, recs map[string]string, msg string) []*msgauth.Verification {
	t.Helper()
	if !strings.Contains(msg, "\r\n\r\n") {
		// go-msgauth cannot read a message without the empty line after
		// the header (RFC 5322 allows it when there is no body); the empty
		// line adds nothing to the canonical body, so add it.
		if !strings.HasSuffix(msg, "\r\n") {
			msg += "\r\n"
		}
		msg += "\r\n"
	}
	vs, err := msgauth.VerifyWithOptions(strings.NewReader(msg), &msgauth.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			if r, ok := recs[strings.ToLower(strings.TrimSuffix(name, "."))]; ok {
				return []string{r}, nil
			}
			return nil, &net.DNSError{Err: "no such host", Name: name, IsNotFound: true}
		},
	})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	return vs
}

// mustVerify fails unless msg has want signatures and all verify.
func mustVerify(t testing.TB, recs map[string]string, msg string, want int) []*msgauth.Verification {
	t.Helper()
	vs := verify(t, recs, msg)
	if len(vs) != want {
		t.Fatalf("got %d signatures, want %d", len(vs), want)
	}
	for _, v := range vs {
		if v.Err != nil {
			t.Fatalf("signature d=%s failed: %v\nmessage:\n%s", v.Domain, v.Err, msg)
		}
	}
	return vs
}

// testMessages are messages exercising header and body canonicalisation.
var testMessages = map[string]string{
	"plain": "From: Alice <alice@example.test>\r\n" +
		"To: Bob <bob@dest.test>\r\n" +
		"Subject: Hello\r\n" +
		"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n" +
		"Message-ID: <1@example.test>\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"\r\n" +
		"Hello Bob.\r\n",
	"folded": "From: Alice\r\n <alice@example.test>\r\n" +
		"To: bob@dest.test,\r\n\tcarol@dest.test,\r\n   dave@dest.test\r\n" +
		"Subject:   A long   subject\r\n\twith\t tabs and   spaces  \r\n continued\r\n" +
		"Content-Type: text/plain;\r\n charset=\"utf-8\";\r\n format=flowed\r\n" +
		"X-Trailing: value with trailing space   \r\n" +
		"\r\n" +
		"Body with  inner   spaces and trailing spaces   \r\n" +
		"and a tab at the end\t\r\n",
	"repeated": "Received: from a.test by b.test; Mon, 23 Nov 2026 10:00:00 +0000\r\n" +
		"Received: from c.test by a.test; Mon, 23 Nov 2026 09:59:00 +0000\r\n" +
		"From: alice@example.test\r\n" +
		"To: bob@dest.test\r\n" +
		"To: carol@dest.test\r\n" +
		"Cc: dave@dest.test\r\n" +
		"Cc: erin@dest.test\r\n" +
		"Comments: one\r\n" +
		"Comments: two\r\n" +
		"Subject: repeated\r\n" +
		"\r\n" +
		"body\r\n",
	"8bit": "From: =?utf-8?q?J=C3=B6rg?= <jorg@example.test>\r\n" +
		"To: Zoë <zoe@dest.test>\r\n" +
		"Subject: Grüße aus Köln — ünïcödé\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n" +
		"Grüße, 日本語, emoji 📨, and raw Latin-1 bytes: \xe9\xe8\xff\r\n" +
		"\x00\x01 control bytes\r\n",
	"longline": "From: alice@example.test\r\n" +
		"Subject: long lines\r\n" +
		"\r\n" +
		strings.Repeat("x", 996) + "\r\n" +
		strings.Repeat("word ", 199) + "\r\n" +
		strings.Repeat("\t", 50) + "\r\n" +
		"last line\r\n" +
		"\r\n\r\n\r\n",
	"dots": "From: alice@example.test\r\n" +
		"Subject: dots\r\n" +
		"\r\n" +
		".\r\n" +
		"..\r\n" +
		".leading dot\r\n" +
		"end\r\n",
	"emptybody": "From: alice@example.test\r\n" +
		"Subject: nothing\r\n" +
		"\r\n",
	"headeronly": "From: alice@example.test\r\n" +
		"Subject: no separator\r\n",
	"noeol": "From: alice@example.test\r\n" +
		"Subject: no final line break\r\n" +
		"\r\n" +
		"line one\r\n" +
		"line two",
	"badcharset": "From: =?x-unknown?q?abc?= <alice@EXAMPLE.test>\r\n" +
		"Subject: unknown charset\r\n" +
		"\r\n" +
		"body\r\n",
}

func TestSign_VerifiesWithGoMsgauth(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	for name, msg := range testMessages {
		t.Run(name, func(t *testing.T) {
			sig := sign(t, s, msg)
			vs := mustVerify(t, recs, sig+msg, 2)
			for _, v := range vs {
				if v.Domain != "example.test" {
					t.Errorf("d=%s, want example.test", v.Domain)
				}
			}
		})
	}
}

func TestSign_RSAOnlyAndEd25519Only(t *testing.T) {
	for _, file := range []string{"rsa2048.pem", "rsa2048-pkcs1.pem", "ed25519.pem"} {
		t.Run(file, func(t *testing.T) {
			k := loadKey(t, "example.test", "sel", file)
			ks, err := dkim.NewKeyStore(k)
			if err != nil {
				t.Fatal(err)
			}
			s := newSigner(t, dkim.SignerConfig{Keys: ks})
			msg := testMessages["plain"]
			sig := sign(t, s, msg)
			mustVerify(t, records(t, k), sig+msg, 1)
			wantAlgo := "a=rsa-sha256;"
			if k.Type() == dkim.Ed25519 {
				wantAlgo = "a=ed25519-sha256;"
			}
			if !strings.Contains(sig, wantAlgo) {
				t.Errorf("signature lacks %s:\n%s", wantAlgo, sig)
			}
		})
	}
}

func TestSign_FieldFormat(t *testing.T) {
	ks, _ := testKeys(t)
	now := time.Unix(1_700_000_000, 0)
	s := newSigner(t, dkim.SignerConfig{Keys: ks, Now: func() time.Time { return now }, Expiration: 7 * 24 * time.Hour})
	sig := sign(t, s, testMessages["repeated"])
	if !strings.HasSuffix(sig, "\r\n") {
		t.Fatalf("signature does not end in CRLF: %q", sig)
	}
	fields := 0
	for _, line := range strings.Split(strings.TrimSuffix(sig, "\r\n"), "\r\n") {
		if len(line) > 78 {
			t.Errorf("line of %d characters: %q", len(line), line)
		}
		if strings.HasPrefix(line, "DKIM-Signature:") {
			fields++
		} else if line == "" || (line[0] != ' ' && line[0] != '\t') {
			t.Errorf("line is neither a field start nor a continuation: %q", line)
		}
		if strings.ContainsAny(line, "\r\n") {
			t.Errorf("bare CR or LF in %q", line)
		}
	}
	if fields != 2 {
		t.Errorf("got %d DKIM-Signature fields, want 2", fields)
	}
	unfolded := strings.ReplaceAll(sig, "\r\n ", " ")
	for _, want := range []string{"c=relaxed/relaxed;", "t=1700000000;", "x=1700604800;", "d=example.test;", "s=rsa1;", "s=ed1;"} {
		if !strings.Contains(unfolded, want) {
			t.Errorf("signature lacks %q:\n%s", want, sig)
		}
	}
	if strings.Contains(unfolded, " l=") {
		t.Errorf("signature has an l= tag:\n%s", sig)
	}
}

// TestSign_HeaderList checks the h= list: configured fields once per
// occurrence, over-signed fields once more, fields absent and not
// over-signed left out.
func TestSign_HeaderList(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	msg := testMessages["repeated"]
	sig := sign(t, s, msg)
	vs := mustVerify(t, recs, sig+msg, 2)
	count := make(map[string]int)
	for _, h := range vs[0].HeaderKeys {
		count[strings.ToLower(h)]++
	}
	want := map[string]int{
		"from": 2, "to": 3, "cc": 3, "subject": 2, "reply-to": 1, "sender": 1,
		"date": 1, "message-id": 1, "received": 0, "comments": 0, "in-reply-to": 0,
	}
	for name, n := range want {
		if count[name] != n {
			t.Errorf("h= has %s %d times, want %d (h=%v)", name, count[name], n, vs[0].HeaderKeys)
		}
	}
}

func TestSign_DetectsTampering(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	msg := testMessages["plain"]
	sig := sign(t, s, msg)
	hdr, body, _ := strings.Cut(msg, "\r\n\r\n")
	cases := []struct {
		name   string
		msg    string
		passes bool
	}{
		{"unchanged", sig + msg, true},
		{"Received added on top", "Received: from x.test by y.test; Mon, 23 Nov 2026 10:01:00 +0000\r\n" + sig + msg, true},
		{"unsigned field added", sig + "X-Mailer: test\r\n" + msg, true},
		{"header white space refolded", sig + strings.Replace(msg, "Subject: Hello", "Subject:\r\n     Hello  ", 1), true},
		{"body trailing empty lines added", sig + msg + "\r\n\r\n", true},
		{"second Subject added on top", sig + "Subject: Pay now\r\n" + msg, false},
		{"second Subject added at the end", sig + hdr + "\r\nSubject: Pay now\r\n\r\n" + body, false},
		{"Reply-To added", sig + "Reply-To: evil@attacker.test\r\n" + msg, false},
		{"second From added", sig + "From: ceo@example.test\r\n" + msg, false},
		{"Content-Type added", sig + hdr + "\r\nContent-Type: text/html\r\n\r\n" + body, false},
		{"Subject changed", sig + strings.Replace(msg, "Subject: Hello", "Subject: Hellp", 1), false},
		{"body changed", sig + strings.Replace(msg, "Hello Bob.", "Hello Eve.", 1), false},
		{"body appended", sig + msg + "P.S. send money\r\n", false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			vs := verify(t, recs, c.msg)
			if len(vs) != 2 {
				t.Fatalf("got %d signatures, want 2", len(vs))
			}
			for _, v := range vs {
				if got := v.Err == nil; got != c.passes {
					t.Errorf("d=%s verified=%v (err %v), want %v", v.Domain, got, v.Err, c.passes)
				}
			}
		})
	}
}

func TestSign_NoKeyReturnsNilAndConsumesMessage(t *testing.T) {
	ks, _ := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	cases := map[string]string{
		"no From":        "Subject: x\r\n\r\nbody\r\n",
		"foreign domain": "From: a@foreign.test\r\n\r\nbody\r\n",
		"subdomain":      "From: a@news.example.test\r\n\r\nbody\r\n",
		"unparsable":     "From: nothing useful here\r\n\r\nbody\r\n",
		"no header":      "\r\nbody only\r\n",
		"empty":          "",
	}
	for name, msg := range cases {
		t.Run(name, func(t *testing.T) {
			var spool bytes.Buffer
			sig, err := s.Sign(context.Background(), io.TeeReader(strings.NewReader(msg), &spool))
			if err != nil {
				t.Fatal(err)
			}
			if sig != nil {
				t.Fatalf("got a signature:\n%s", sig)
			}
			if spool.String() != msg {
				t.Fatalf("Sign read %q, want the whole message %q", spool.String(), msg)
			}
		})
	}
}

func TestSign_ConsumesWholeMessageWhenSigning(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	msg := testMessages["longline"] + strings.Repeat("more body text\r\n", 10000)
	var spool bytes.Buffer
	sig, err := s.Sign(context.Background(), io.TeeReader(strings.NewReader(msg), &spool))
	if err != nil {
		t.Fatal(err)
	}
	if spool.String() != msg {
		t.Fatalf("spooled %d bytes, want %d", spool.Len(), len(msg))
	}
	mustVerify(t, recs, string(sig)+spool.String(), 2)
}

func TestSign_ParentDomains(t *testing.T) {
	ks, recs := testKeys(t)
	msg := "From: a@news.mail.example.test\r\nSubject: sub\r\n\r\nbody\r\n"
	if sig := sign(t, newSigner(t, dkim.SignerConfig{Keys: ks}), msg); sig != "" {
		t.Fatalf("signed a subdomain without ParentDomains:\n%s", sig)
	}
	sig := sign(t, newSigner(t, dkim.SignerConfig{Keys: ks, ParentDomains: true}), msg)
	for _, v := range mustVerify(t, recs, sig+msg, 2) {
		if v.Domain != "example.test" {
			t.Errorf("d=%s, want example.test", v.Domain)
		}
	}
}

func TestSign_ParentDomainsStopsBeforeTopLevel(t *testing.T) {
	ks, err := dkim.NewKeyStore(loadKey(t, "test", "sel", "ed25519.pem"))
	if err != nil {
		t.Fatal(err)
	}
	s := newSigner(t, dkim.SignerConfig{Keys: ks, ParentDomains: true})
	if sig := sign(t, s, "From: a@example.test\r\n\r\nbody\r\n"); sig != "" {
		t.Fatalf("signed with a top-level domain key:\n%s", sig)
	}
	if sig := sign(t, s, "From: a@TEST\r\n\r\nbody\r\n"); sig == "" {
		t.Fatal("did not sign for the key's own domain")
	}
}

func TestSign_SeveralFromDomains(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	msg := "From: a@example.test, b@Other.Test, c@foreign.test\r\nSender: a@example.test\r\nSubject: two\r\n\r\nbody\r\n"
	sig := sign(t, s, msg)
	got := make(map[string]int)
	for _, v := range mustVerify(t, recs, sig+msg, 3) {
		got[v.Domain]++
	}
	if got["example.test"] != 2 || got["other.test"] != 1 {
		t.Errorf("signatures per domain %v, want example.test:2 other.test:1", got)
	}
}

func TestSign_HeaderTooLarge(t *testing.T) {
	ks, _ := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks, MaxHeaderBytes: 200})
	msg := "From: a@example.test\r\nX-Big: " + strings.Repeat("y", 300) + "\r\n\r\nbody\r\n"
	_, err := s.Sign(context.Background(), strings.NewReader(msg))
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 552 || se.EnhancedCode != (smtp.EnhancedCode{5, 3, 4}) {
		t.Fatalf("err = %#v, want a 552 5.3.4 SMTPError", err)
	}
	// Just under the limit is fine.
	msg = "From: a@example.test\r\nX-Big: " + strings.Repeat("y", 150) + "\r\n\r\nbody\r\n"
	if _, err := s.Sign(context.Background(), strings.NewReader(msg)); err != nil {
		t.Fatal(err)
	}
}

func TestSign_ContextCanceled(t *testing.T) {
	ks, _ := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.Sign(ctx, strings.NewReader(testMessages["plain"]))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

type failingReader struct{ err error }

func (r failingReader) Read([]byte) (int, error) { return 0, r.err }

func TestSign_ReadErrorIsReturned(t *testing.T) {
	ks, _ := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	boom := errors.New("disk on fire")
	msg := io.MultiReader(strings.NewReader("From: a@example.test\r\n\r\nstart of body\r\n"), failingReader{boom})
	if _, err := s.Sign(context.Background(), msg); !errors.Is(err, boom) {
		t.Fatalf("err = %v, want %v", err, boom)
	}
}

func TestSign_CustomHeadersAlwaysIncludeFrom(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks, Headers: []string{"Subject"}, Oversign: []string{}})
	msg := testMessages["plain"]
	sig := sign(t, s, msg)
	vs := mustVerify(t, recs, sig+msg, 2)
	got := strings.Join(vs[0].HeaderKeys, ":")
	if got != "from:subject" {
		t.Errorf("h=%s, want from:subject", got)
	}
}

func TestNewSigner_RejectsBadHeaderNames(t *testing.T) {
	for _, h := range []string{"", "Bad Name", "a:b", "DKIM-Signature"} {
		if _, err := dkim.NewSigner(dkim.SignerConfig{Headers: []string{h}}); err == nil {
			t.Errorf("header %q accepted", h)
		}
	}
	if _, err := dkim.NewSigner(dkim.SignerConfig{Expiration: -time.Second}); err == nil {
		t.Error("negative Expiration accepted")
	}
}

func TestSign_Concurrent(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			msg := testMessages["folded"] + strings.Repeat("line\r\n", i*100)
			sig, err := s.Sign(context.Background(), strings.NewReader(msg))
			if err != nil {
				errs <- err
				return
			}
			vs := verify(t, recs, string(sig)+msg)
			for _, v := range vs {
				if v.Err != nil {
					errs <- v.Err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// smtpSink is a go-smtp backend that keeps the DATA of each message.
type smtpSink struct {
	mu   sync.Mutex
	msgs [][]byte
}

func (b *smtpSink) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{b: b}, nil }

type sinkSession struct{ b *smtpSink }

func (s *sinkSession) Reset()                               {}
func (s *sinkSession) Logout() error                        { return nil }
func (s *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }

func (s *sinkSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	s.b.mu.Lock()
	s.b.msgs = append(s.b.msgs, b)
	s.b.mu.Unlock()
	return err
}

// TestSign_SurvivesSMTPTransfer sends signed messages through a real SMTP
// session (dot-stuffing, line handling) and verifies what the receiving
// go-smtp server got.
func TestSign_SurvivesSMTPTransfer(t *testing.T) {
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})

	sink := &smtpSink{}
	srv := smtp.NewServer(sink)
	srv.Domain = "sink.test"
	srv.AllowInsecureAuth = true
	srv.MaxLineLength = 4000
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	names := []string{"plain", "folded", "repeated", "8bit", "longline", "dots", "emptybody", "noeol"}
	sent := make([]string, 0, len(names))
	c, err := smtp.Dial(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		msg := testMessages[name]
		full := sign(t, s, msg) + msg
		sent = append(sent, full)
		if err := c.Mail("alice@example.test", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt("bob@dest.test", nil); err != nil {
			t.Fatal(err)
		}
		w, err := c.Data()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.WriteString(w, full); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
	}
	if err := c.Quit(); err != nil {
		t.Fatal(err)
	}
	sink.mu.Lock()
	defer sink.mu.Unlock()
	if len(sink.msgs) != len(names) {
		t.Fatalf("sink got %d messages, want %d", len(sink.msgs), len(names))
	}
	for i, got := range sink.msgs {
		t.Run(names[i], func(t *testing.T) {
			want := sent[i]
			if !strings.HasSuffix(want, "\r\n") {
				want += "\r\n" // SMTP ends the data on a line of its own
			}
			if string(got) != want {
				t.Errorf("received message differs from the sent one\n got %q\nwant %q", got, want)
			}
			mustVerify(t, recs, string(got), 2)
		})
	}
}
