package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
)

func TestServer_BuiltInPolicies_OverSMTP(t *testing.T) {
	conns := policy.NewConnLimit(&policy.ConnLimitConfig{PerIP: 2})
	throttle := policy.NewAuthThrottle(&policy.AuthThrottleConfig{
		MaxPerConn: 2,
		Sleep:      func(ctx context.Context, d time.Duration) error { return ctx.Err() },
	})
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AllowInsecureAuth = true
		c.MaxAuthFailures = -1 // leave it to AuthThrottle
		c.Policy = policy.Chain{
			conns,
			throttle,
			policy.NewClosedRelay(nil),
			policy.NewSenders(nil),
			policy.NewLimits(&policy.LimitsConfig{MaxRecipients: 2}),
			policy.NewRateLimit(&policy.RateLimitConfig{PerIdentity: policy.Rate{Messages: 1, Per: time.Hour}}),
		}
	})
	a := stDial(t, ts.addr)
	b := stDial(t, ts.addr)
	c := stDialNoGreeting(t, ts.addr)
	if code, text := c.reply(); code != 421 || !strings.HasPrefix(text, "4.7.0 ") {
		t.Errorf("third connection from one address: %d %s", code, text)
	}
	c.waitClosed()

	b.expect("EHLO b.test", 250, "")
	b.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 535, "5.7.8")
	b.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 421, "4.7.0")
	b.waitClosed()

	a.expect("EHLO a.test", 250, "")
	a.expect("MAIL FROM:<alice@sender.test>", 530, "5.7.0")
	a.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00"+stPassword), 235, "2.0.0")
	a.expect("MAIL FROM:<alice@sender.test>", 250, "")
	a.expect("RCPT TO:<r1@dest.test>", 250, "")
	a.expect("RCPT TO:<r2@dest.test>", 250, "")
	a.expect("RCPT TO:<r3@dest.test>", 452, "4.5.3")
	a.expect("DATA", 354, "")
	a.send("From: alice@sender.test\r\n\r\nx\r\n.\r\n")
	if code, text := a.reply(); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	a.expect("MAIL FROM:<alice@sender.test>", 450, "4.7.1")

	// Disconnect released the count: a new connection is welcome.
	a.expect("QUIT", 221, "")
	a.waitClosed()
	for i := 0; conns.Open(netip.MustParseAddr("127.0.0.1")) != 0; i++ {
		if i > 1000 {
			t.Fatalf("%d connections still counted", conns.Open(netip.MustParseAddr("127.0.0.1")))
		}
		time.Sleep(time.Millisecond)
	}
	d := stDial(t, ts.addr)
	d.expect("EHLO d.test", 250, "")
}

func TestCheckPath(t *testing.T) {
	good := []string{
		"<a@b.test>", "<a.b-c+d@x.y.test>", "a@b.test", "<a@b.test> SIZE=10", "<>", "<> BODY=8BITMIME",
		`<"a b"@c.test>`, `<"a\"b"@c.test>`, `<"a@b"@c.test>`, "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>",
		"<@r.test:a@b.test>", "<@r.test,@s.test:a@b.test>", "<a%b@c.test>", "<b!a@c.test>",
		"<jörg@bücher.test>", "<" + strings.Repeat("a", 64) + "@b.test>", "<a@b>",
	}
	for _, s := range good {
		if err := checkPath(s, true); err != nil {
			t.Errorf("checkPath(%q) = %v, want nil", s, err)
		}
	}
	bad := []string{
		"", "<", "<>x", "<a>", "<a@>", "<@b.test>", "<a@b.test", "a@b.test>", "<a@b.test>x", "<a..b@c.test>",
		"<.a@c.test>", "<a.@c.test>", `<"a@c.test>`, `<""@c.test>`, "<a@b..test>", "<a@.b.test>", "<a@b.test.>",
		"<a@-b.test>", "<a@b-.test>", "<a@b_c.test>", "<a@[1.2.3]>", "<a@[IPv6:1.2.3.4]>", "<a@[::1]>",
		"<a@[IPv6:fe80::1%eth0]>", "<@r.test a@b.test>", "<@:a@b.test>", "<@r..test:a@b.test>",
		"<" + strings.Repeat("a", 65) + "@b.test>", "<a@" + strings.Repeat("b", 64) + ".test>",
		"<a@" + strings.Repeat(strings.Repeat("b", 60)+".", 5) + "test>", "<a\xff@b.test>", "<a b@c.test>",
		"<a@b.test >", "<a,b@c.test>", "<a:b@c.test>",
	}
	for _, s := range bad {
		if err := checkPath(s, true); err == nil {
			t.Errorf("checkPath(%q) = nil, want an error", s)
		}
	}
	if checkPath("<>", false) == nil {
		t.Errorf("null path accepted for a recipient")
	}
}

func TestCanonicalAddr(t *testing.T) {
	for in, want := range map[string]string{
		"a@B.Test":             "a@b.test",
		"A.b@x.test":           "A.b@x.test",
		"a b@c.test":           `"a b"@c.test`,
		`a"b@c.test`:           `"a\"b"@c.test`,
		"victim@foreign@re":    `"victim@foreign"@re`,
		"a@[IPv6:2001:DB8::1]": "a@[IPv6:2001:DB8::1]",
		"x%y@z.test":           "x%y@z.test",
	} {
		if got := canonicalAddr(in); got != want {
			t.Errorf("canonicalAddr(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestBodyReader(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      error
		limit    int64
	}{
		{in: "a\r\nb\r\n", want: "a\r\nb\r\n"},
		{in: "", want: ""},
		{in: "a\r\nno end", want: "a\r\nno end\r\n"},
		{in: "a\nb\r\n", err: errBareNewline},
		{in: "a\rb\r\n", err: errBareNewline},
		{in: "a\r\n\r", err: errBareNewline},
		{in: "\n", err: errBareNewline},
		{in: "a\r\r\n", err: errBareNewline},
		{in: "12345\r\n", limit: 7, want: "12345\r\n"},
		{in: "123456\r\n", limit: 7, err: errTooBig},
	} {
		for name, r := range map[string]io.Reader{
			"whole":    strings.NewReader(tc.in),
			"one byte": iotest.OneByteReader(strings.NewReader(tc.in)),
		} {
			br := newBodyReader(r, tc.limit)
			got, err := io.ReadAll(br)
			if !errors.Is(err, tc.err) || err == nil && string(got) != tc.want {
				t.Errorf("%q (%s): %q, %v; want %q, %v", tc.in, name, got, err, tc.want, tc.err)
			}
		}
	}
	// A read error is passed on and remembered.
	br := newBodyReader(iotest.ErrReader(io.ErrUnexpectedEOF), 0)
	if _, err := io.ReadAll(br); !errors.Is(err, io.ErrUnexpectedEOF) || br.err == nil {
		t.Errorf("read error: %v", err)
	}
}

func TestReadHeaderBlock(t *testing.T) {
	long := "X-Long: " + strings.Repeat("y", 5000) + "\r\n"
	for _, tc := range []struct {
		in, raw, rest string
		blank         bool
		err           error
	}{
		{in: "A: 1\r\nB: 2\r\n\r\nbody\r\n", raw: "A: 1\r\nB: 2\r\n", rest: "body\r\n", blank: true},
		{in: "\r\nbody\r\n", raw: "", rest: "body\r\n", blank: true},
		{in: "A: 1\r\n", raw: "A: 1\r\n"},
		{in: long + "\r\nb\r\n", raw: long, rest: "b\r\n", blank: true},
		{in: "A: 1\r\n B: folded\r\n\r\n", raw: "A: 1\r\n B: folded\r\n", blank: true},
		{in: strings.Repeat("A: 1\r\n", 200), err: errHeaderTooBig},
	} {
		br := bufio.NewReaderSize(strings.NewReader(tc.in), 16)
		raw, blank, err := readHeaderBlock(br, 1024*8)
		if tc.err != nil && len(tc.in) > 1024 {
			raw, blank, err = readHeaderBlock(bufio.NewReader(strings.NewReader(tc.in)), 1000)
		}
		rest, _ := io.ReadAll(br)
		if !errors.Is(err, tc.err) {
			t.Errorf("%q: err %v, want %v", tc.in, err, tc.err)
			continue
		}
		if err == nil && (string(raw) != tc.raw || blank != tc.blank || string(rest) != tc.rest) {
			t.Errorf("%q: raw %q blank %v rest %q", tc.in, raw, blank, rest)
		}
	}
	if _, err := parseHeader([]byte("no colon here\r\n")); err == nil {
		t.Errorf("malformed header accepted")
	}
	h, err := parseHeader([]byte("Subject: a\r\n b\r\nMessage-ID: <x@y>\r\n"))
	if err != nil || h.Get("Subject") != "a b" || !h.Has("Message-Id") {
		t.Errorf("parseHeader: %v %q", err, h.Get("Subject"))
	}
}

func TestReceivedHeader(t *testing.T) {
	now := time.Date(2026, 11, 23, 15, 4, 5, 0, time.UTC)
	st := &tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256}
	for _, tc := range []struct {
		info traceInfo
		want string
	}{
		{traceInfo{Helo: "client.test", Addr: netip.MustParseAddr("192.0.2.7"), Host: "relay.test", ESMTP: true, Auth: true, TLS: st, Received: now},
			"Received: from client.test ([192.0.2.7])\r\n\tby relay.test (baton) with ESMTPSA\r\n\t(using TLS 1.3 with cipher TLS_AES_128_GCM_SHA256);\r\n\tMon, 23 Nov 2026 15:04:05 +0000\r\n"},
		{traceInfo{Helo: "x y (z)", Addr: netip.MustParseAddr("2001:db8::1"), Host: "relay.test", ESMTP: true, Received: now},
			"Received: from unknown ([IPv6:2001:db8::1])\r\n\tby relay.test (baton) with ESMTP;\r\n\tMon, 23 Nov 2026 15:04:05 +0000\r\n"},
		{traceInfo{Helo: "[192.0.2.7]", Host: "relay.test", Received: now},
			"Received: from [192.0.2.7] (unknown)\r\n\tby relay.test (baton) with SMTP;\r\n\tMon, 23 Nov 2026 15:04:05 +0000\r\n"},
		{traceInfo{Helo: "c.test", Addr: netip.MustParseAddr("192.0.2.7"), Host: "relay.test", ESMTP: true, UTF8: true, TLS: st, Received: now},
			"Received: from c.test ([192.0.2.7])\r\n\tby relay.test (baton) with UTF8SMTPS\r\n\t(using TLS 1.3 with cipher TLS_AES_128_GCM_SHA256);\r\n\tMon, 23 Nov 2026 15:04:05 +0000\r\n"},
	} {
		if got := receivedHeader(&tc.info); got != tc.want {
			t.Errorf("got\n%q\nwant\n%q", got, tc.want)
		}
	}
}

func TestSASLServers(t *testing.T) {
	var gotUser, gotPass string
	check := func(u, p string) error {
		gotUser, gotPass = u, p
		if p != "pw" {
			return smtp.ErrAuthFailed
		}
		return nil
	}
	// LOGIN without and with an initial response.
	s := newLoginServer(check)
	if ch, done, err := s.Next(nil); string(ch) != "Username:" || done || err != nil {
		t.Fatalf("LOGIN step 1: %q %v %v", ch, done, err)
	}
	if ch, done, err := s.Next([]byte("u")); string(ch) != "Password:" || done || err != nil {
		t.Fatalf("LOGIN step 2: %q %v %v", ch, done, err)
	}
	if _, done, err := s.Next([]byte("pw")); !done || err != nil || gotUser != "u" || gotPass != "pw" {
		t.Fatalf("LOGIN step 3: %v %v %q %q", done, err, gotUser, gotPass)
	}
	if _, _, err := s.Next([]byte("again")); err == nil {
		t.Errorf("LOGIN accepted a fourth message")
	}
	s = newLoginServer(check)
	if ch, _, _ := s.Next([]byte("v")); string(ch) != "Password:" {
		t.Fatalf("LOGIN with initial response: %q", ch)
	}
	if _, _, err := s.Next([]byte("bad")); err != smtp.ErrAuthFailed || gotUser != "v" {
		t.Errorf("LOGIN bad password: %v %q", err, gotUser)
	}
	// PLAIN.
	p := newPlainServer(check)
	if ch, done, err := p.Next(nil); len(ch) != 0 || ch == nil || done || err != nil {
		t.Fatalf("PLAIN without initial response: %q %v %v", ch, done, err)
	}
	if _, done, err := p.Next([]byte("\x00u\x00pw")); !done || err != nil {
		t.Fatalf("PLAIN: %v %v", done, err)
	}
	for _, resp := range []string{"u\x00pw", "a\x00b\x00c\x00d"} {
		if _, _, err := newPlainServer(check).Next([]byte(resp)); err != errSASLMalformed {
			t.Errorf("PLAIN %q: %v", resp, err)
		}
	}
	if _, _, err := newPlainServer(check).Next([]byte("other\x00u\x00pw")); err != smtp.ErrAuthFailed {
		t.Errorf("PLAIN with a foreign authzid: %v", err)
	}
	if _, _, err := newPlainServer(check).Next([]byte("u\x00u\x00pw")); err != nil {
		t.Errorf("PLAIN with own authzid: %v", err)
	}
}

func TestPolicyClient(t *testing.T) {
	id := &auth.Identity{
		Name: "app", SenderDomains: []string{"app.test"}, SenderAddrs: []string{"x@y.test"}, MaxSize: 10,
		Rate: auth.Rate{Messages: 5, Recipients: 50, Per: time.Minute}, Sandbox: true, Scopes: []string{"send"},
	}
	c := PolicyClient(id)
	if !c.Authenticated || c.Identity != "app" || c.SenderDomains[0] != "app.test" || c.SenderAddrs[0] != "x@y.test" ||
		c.MaxSize != 10 || c.Rate != (policy.Rate{Messages: 5, Recipients: 50, Per: time.Minute}) || !c.Sandbox || c.Scopes[0] != "send" {
		t.Errorf("PolicyClient: %+v", c)
	}
	id.SenderDomains[0] = "changed.test"
	if c.SenderDomains[0] != "app.test" {
		t.Errorf("PolicyClient shares slices with the identity")
	}
	if c := PolicyClient(nil); c.Authenticated || c.Identity != "" {
		t.Errorf("PolicyClient(nil): %+v", c)
	}
	if !maySend(&policy.Client{}) || !maySend(&policy.Client{Scopes: []string{"read", "send"}}) || maySend(&policy.Client{Scopes: []string{"read"}}) ||
		maySend(&policy.Client{Scopes: []string{}}) || !maySend(&policy.Client{Scopes: []string{"send:sandbox"}, Sandbox: true}) ||
		maySend(&policy.Client{Scopes: []string{"send:sandbox"}}) {
		t.Errorf("maySend")
	}
}

func TestServer_UTF8Addresses_NeedSMTPUTF8(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	if text := rc.expect("EHLO client.test", 250, ""); !strings.Contains(text, "\nSMTPUTF8") {
		t.Errorf("SMTPUTF8 not offered:\n%s", text)
	}
	rc.expect("MAIL FROM:<jörg@sender.test>", 553, "5.6.7")
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<jörg@dest.test>", 553, "5.6.7")
	rc.expect("RSET", 250, "")
	rc.expect("MAIL FROM:<jörg@sender.test> SMTPUTF8", 250, "")
	rc.expect("RCPT TO:<ü@bücher.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("Subject: x\r\n\r\nx\r\n.\r\n")
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	m := ts.messages()[0]
	if !m.Envelope.SMTPUTF8 || m.Envelope.To[0].Addr != "ü@bücher.test" {
		t.Errorf("envelope %+v", m.Envelope)
	}
	if !strings.Contains(m.Body, "with UTF8SMTP;") {
		t.Errorf("Received:\n%s", m.Body)
	}
}

func TestServer_HELO_ProtocolSMTP(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("HELO client.test", 250, "")
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\nx\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	if m := ts.messages()[0]; !strings.Contains(m.Body, "with SMTP;") {
		t.Errorf("Received:\n%s", m.Body)
	}
}

func TestNewServer_Config(t *testing.T) {
	if _, err := NewServer(ServerConfig{}); err == nil {
		t.Errorf("no Submitter accepted")
	}
	sub := SubmitterFunc(nil)
	if _, err := NewServer(ServerConfig{Submitter: sub, Postmaster: "not an address"}); err == nil {
		t.Errorf("bad Postmaster accepted")
	}
	s, err := NewServer(ServerConfig{Submitter: sub})
	if err != nil {
		t.Fatal(err)
	}
	if s.cfg.Hostname == "" || s.cfg.MaxMessageBytes != DefaultMaxMessageBytes || s.cfg.IdleTimeout != DefaultIdleTimeout ||
		s.cfg.MaxRecipients != DefaultMaxRecipients || s.policy == nil {
		t.Errorf("defaults not applied: %+v", s.cfg)
	}
	if err := s.ServeTLS(stListen(t)); err == nil {
		t.Errorf("ServeTLS without TLSConfig accepted")
	}
	if err := s.Shutdown(context.Background()); err != nil {
		t.Errorf("Shutdown of an idle server: %v", err)
	}
	if err := s.Serve(stListen(t)); !errors.Is(err, ErrServerClosed) {
		t.Errorf("Serve after Shutdown: %v", err)
	}
}

func TestCleanReply(t *testing.T) {
	se := cleanReply(&smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{5, 3, 1}, Message: "a\r\nb"})
	if se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) || se.Message != "a  b" {
		t.Errorf("%+v", se)
	}
	orig := policy.Reject(550, [3]int{5, 1, 1}, "fine")
	if cleanReply(orig) != orig {
		t.Errorf("a clean reply was copied")
	}
}
