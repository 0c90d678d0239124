package relay

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/mail"
	"strings"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

const stBody = "From: alice@sender.test\r\nTo: bob@dest.test\r\nSubject: hello\r\n\r\nHello Bob.\r\n..dot line\r\n"

// sendRaw runs one transaction over c and returns the final reply.
func (rc *stClient) sendMessage(from string, to []string, body string) (int, string) {
	rc.t.Helper()
	rc.expect("MAIL FROM:<"+from+">", 250, "2.0.0")
	for _, r := range to {
		rc.expect("RCPT TO:<"+r+">", 250, "2.0.0")
	}
	rc.expect("DATA", 354, "")
	rc.send(body + ".\r\n")
	return rc.reply()
}

func TestServer_AllowListed_MessageQueuedWithFixUps(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	code, text := rc.sendMessage("alice@sender.test", []string{"bob@dest.test", "carol@dest.test"}, stBody)
	if code != 250 || !strings.HasPrefix(text, "2.0.0 OK queued as ") {
		t.Fatalf("end of data: %d %s", code, text)
	}
	id := strings.TrimPrefix(text, "2.0.0 OK queued as ")
	msgs := ts.messages()
	if len(msgs) != 1 {
		t.Fatalf("%d messages queued, want 1", len(msgs))
	}
	m := msgs[0]
	if string(m.ID) != id {
		t.Errorf("reply names %q, queue holds %q", id, m.ID)
	}
	if m.Envelope.From != "alice@sender.test" || len(m.Envelope.To) != 2 || m.Envelope.To[1].Addr != "carol@dest.test" {
		t.Errorf("envelope %+v", m.Envelope)
	}
	if m.Envelope.Identity != "loopback" || m.Envelope.Held {
		t.Errorf("identity %q held %v", m.Envelope.Identity, m.Envelope.Held)
	}
	if !strings.HasPrefix(m.Body, "Received: from client.test ([127.0.0.1])\r\n\tby relay.test (baton) with ESMTP;\r\n") {
		t.Errorf("body does not start with the Received header:\n%s", m.Body)
	}
	msg, err := mail.ReadMessage(strings.NewReader(m.Body))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := msg.Header.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	mid := msg.Header.Get("Message-ID")
	if !strings.HasPrefix(mid, "<") || !strings.HasSuffix(mid, "@relay.test>") {
		t.Errorf("Message-ID %q", mid)
	}
	if _, err := mail.ParseAddress(mid); err != nil {
		t.Errorf("Message-ID %q is not addr-spec shaped: %v", mid, err)
	}
	// The original fields come first, unchanged, then the fix-ups, then
	// the body with dot-stuffing undone.
	want := "From: alice@sender.test\r\nTo: bob@dest.test\r\nSubject: hello\r\nDate: "
	if !strings.Contains(m.Body, want) {
		t.Errorf("original header not kept in order before the fix-ups:\n%s", m.Body)
	}
	if !strings.HasSuffix(m.Body, ">\r\n\r\nHello Bob.\r\n.dot line\r\n") {
		t.Errorf("body end:\n%q", m.Body)
	}
	rc.expect("QUIT", 221, "2.0.0")
}

func TestServer_FixUps_KeepsExistingDateAndMessageID(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	body := "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-Id: <keep@sender.test>\r\nFrom: a@sender.test\r\n\r\nx\r\n"
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, body); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	m := ts.messages()[0]
	_, rest, _ := strings.Cut(m.Body, "\r\nDate: ")
	if "Date: "+rest != body {
		t.Errorf("message changed beyond the Received header:\n%q", m.Body)
	}
	if strings.Count(m.Body, "Message-I") != 1 || strings.Count(m.Body, "Date:") != 1 {
		t.Errorf("duplicate fix-ups:\n%s", m.Body)
	}
}

func TestServer_HeaderOnlyAndEmptyMessages(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: only a header\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, ""); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	for _, m := range ts.messages() {
		msg, err := mail.ReadMessage(strings.NewReader(m.Body))
		if err != nil {
			t.Fatalf("%v:\n%s", err, m.Body)
		}
		if msg.Header.Get("Message-Id") == "" || msg.Header.Get("Date") == "" {
			t.Errorf("fix-ups missing:\n%s", m.Body)
		}
		if b, _ := io.ReadAll(msg.Body); len(b) != 0 {
			t.Errorf("body %q, want empty", b)
		}
	}
}

func TestServer_MalformedHeader_Refused(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "this is not a header\r\n\r\nbody\r\n")
	if code != 554 || !strings.HasPrefix(text, "5.6.0 ") {
		t.Fatalf("got %d %s, want 554 5.6.0", code, text)
	}
	if n := len(ts.messages()); n != 0 {
		t.Fatalf("%d messages queued", n)
	}
	rc.expect("NOOP", 250, "2.0.0") // still in step
}

func TestServer_HeaderTooBig_Refused(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxHeaderBytes = 1024
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	body := strings.Repeat("X-Filler: "+strings.Repeat("y", 60)+"\r\n", 40) + "\r\nbody\r\n"
	code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, body)
	if code != 552 || !strings.HasPrefix(text, "5.3.4 ") {
		t.Fatalf("got %d %s, want 552 5.3.4", code, text)
	}
	rc.expect("NOOP", 250, "2.0.0")
}

// TestServer_OpenRelayProbes sends the classic relay tests from an
// unauthenticated client (refused, nothing queued) and from an
// allow-listed one (accepted, addresses kept as given).
func TestServer_OpenRelayProbes(t *testing.T) {
	probes := []struct {
		name, from, to, want string
	}{
		{"plain foreign", "a@relay.test", "<victim@foreign.test>", "victim@foreign.test"},
		{"percent hack", "a@relay.test", "<victim%foreign.test@relay.test>", "victim%foreign.test@relay.test"},
		{"bang path", "a@relay.test", "<foreign.test!victim@relay.test>", "foreign.test!victim@relay.test"},
		{"bang path percent", "a@relay.test", "<foreign.test!victim%other.test@relay.test>", "foreign.test!victim%other.test@relay.test"},
		{"source route", "a@relay.test", "<@relay.test:victim@foreign.test>", "victim@foreign.test"},
		{"source route two hops", "a@relay.test", "<@relay.test,@hop.test:victim@foreign.test>", "victim@foreign.test"},
		{"quoted local with @", "a@relay.test", `<"victim@foreign.test"@relay.test>`, `"victim@foreign.test"@relay.test`},
		{"quoted local with percent", "a@relay.test", `<"victim%foreign.test"@relay.test>`, `victim%foreign.test@relay.test`}, // quoting not needed: canonical form,
		{"ip literal", "a@relay.test", "<victim@[192.0.2.1]>", "victim@[192.0.2.1]"},
		{"ipv6 literal", "a@relay.test", "<victim@[IPv6:2001:db8::1]>", "victim@[IPv6:2001:db8::1]"},
		{"mixed case", "a@relay.test", "<Victim@FOREIGN.Test>", "Victim@foreign.test"},
		{"local domain mixed case", "a@relay.test", "<victim@RELAY.TEST>", "victim@relay.test"},
		{"null sender", "", "<victim@foreign.test>", "victim@foreign.test"},
		{"sender from foreign", "a@foreign.test", "<victim@foreign.test>", "victim@foreign.test"},
		{"no brackets", "a@relay.test", "victim@foreign.test", "victim@foreign.test"},
	}
	t.Run("unauthenticated", func(t *testing.T) {
		ts := startTestServer(t, nil)
		for _, p := range probes {
			t.Run(p.name, func(t *testing.T) {
				rc := stDial(t, ts.addr)
				rc.expect("EHLO probe.test", 250, "")
				if code, text := rc.cmd("MAIL FROM:<" + p.from + ">"); code != 530 || !strings.HasPrefix(text, "5.7.0 ") {
					t.Errorf("MAIL: %d %s, want 530 5.7.0", code, text)
				}
				if code, text := rc.cmd("RCPT TO:" + p.to); code/100 != 5 {
					t.Errorf("RCPT: %d %s, want a refusal", code, text)
				}
				if code, text := rc.cmd("DATA"); code/100 != 5 {
					t.Errorf("DATA: %d %s, want a refusal", code, text)
				}
				rc.expect("RSET", 250, "")
			})
		}
		if n := len(ts.messages()); n != 0 {
			t.Fatalf("%d messages queued from an unauthenticated client", n)
		}
	})
	t.Run("unauthenticated with local domains", func(t *testing.T) {
		// A relay that also receives mail for its own domain: strangers
		// reach MAIL, and policy.ClosedRelay decides at RCPT.
		ts := startTestServer(t, func(c *ServerConfig) {
			c.AllowUnauthenticated = true
			c.Policy = policy.NewClosedRelay(&policy.ClosedRelayConfig{LocalDomains: []string{"relay.test"}})
		})
		for _, p := range probes {
			if p.name == "local domain mixed case" {
				continue
			}
			t.Run(p.name, func(t *testing.T) {
				rc := stDial(t, ts.addr)
				rc.expect("EHLO probe.test", 250, "")
				rc.expect("MAIL FROM:<"+p.from+">", 250, "")
				if code, text := rc.cmd("RCPT TO:" + p.to); code/100 != 5 {
					t.Errorf("RCPT: %d %s, want a refusal", code, text)
				}
				if code, text := rc.cmd("DATA"); code/100 != 5 {
					t.Errorf("DATA: %d %s, want a refusal", code, text)
				}
			})
		}
		if n := len(ts.messages()); n != 0 {
			t.Fatalf("%d messages queued", n)
		}
		rc := stDial(t, ts.addr)
		rc.expect("EHLO probe.test", 250, "")
		if code, text := rc.sendMessage("a@foreign.test", []string{"user@Relay.Test"}, "Subject: in\r\n\r\nx\r\n"); code != 250 {
			t.Fatalf("mail to the local domain: %d %s", code, text)
		}
	})
	t.Run("trailing dot refused as malformed", func(t *testing.T) {
		ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
		rc := stDial(t, ts.addr)
		rc.expect("EHLO probe.test", 250, "")
		rc.expect("MAIL FROM:<a@relay.test>", 250, "")
		rc.expect("RCPT TO:<victim@foreign.test.>", 501, "5.1.3")
	})
	t.Run("allow-listed", func(t *testing.T) {
		ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
		for _, p := range probes {
			t.Run(p.name, func(t *testing.T) {
				before := len(ts.messages())
				rc := stDial(t, ts.addr)
				rc.expect("EHLO probe.test", 250, "")
				rc.expect("MAIL FROM:<"+p.from+">", 250, "2.0.0")
				rc.expect("RCPT TO:"+p.to, 250, "2.0.0")
				rc.expect("DATA", 354, "")
				rc.send("Subject: probe\r\n\r\nbody\r\n.\r\n")
				if code, text := rc.reply(); code != 250 {
					t.Fatalf("end of data: %d %s", code, text)
				}
				msgs := ts.messages()
				if len(msgs) != before+1 {
					t.Fatalf("%d messages, want %d", len(msgs), before+1)
				}
				for _, m := range msgs {
					if m.Envelope.To[0].Addr == p.want && m.Envelope.From == p.from {
						return
					}
				}
				t.Errorf("no message from %q to %q", p.from, p.want)
			})
		}
	})
}

func TestServer_MalformedAddresses_Refused(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	badSenders := []string{
		"<a@>", "<@relay.test>", "<a..b@relay.test>", "<.a@relay.test>", "<a.@relay.test>",
		"<a b@relay.test>", "<a@relay..test>", "<a@-relay.test>", "<a@relay-.test>",
		"<a@relay.test", "<a@[300.1.1.1]>", "<a@[IPv6:zz::1]>", "<a@[192.0.2.1>", `<"a@relay.test>`,
		"<" + strings.Repeat("a", 65) + "@relay.test>", "<a@" + strings.Repeat("l", 64) + ".test>",
		"<a@relay.test>x", "<a@relay_test.test>", "<a(comment)@relay.test>",
	}
	for _, s := range badSenders {
		if code, text := rc.cmd("MAIL FROM:" + s); code != 501 || !strings.HasPrefix(text, "5.1.7 ") {
			t.Errorf("MAIL FROM:%s: %d %s, want 501 5.1.7", s, code, text)
		}
	}
	rc.expect("RSET", 250, "")
	rc.expect("MAIL FROM:<a@relay.test>", 250, "")
	for _, s := range badSenders {
		if s == "<a@>" {
			continue
		}
		if code, text := rc.cmd("RCPT TO:" + s); code != 501 || !strings.HasPrefix(text, "5.1.3 ") {
			t.Errorf("RCPT TO:%s: %d %s, want 501 5.1.3", s, code, text)
		}
		rc.expect("RSET", 250, "") // keep the junk counter low
		rc.expect("MAIL FROM:<a@relay.test>", 250, "")
	}
	// Control characters are refused before the address is looked at.
	rc.expect("RCPT TO:<a\x01b@relay.test>", 500, "5.5.2")
	if code, _ := rc.cmd("RCPT TO:<>"); code != 501 {
		t.Errorf("RCPT TO:<>: %d, want 501", code)
	}
}

func TestServer_Postmaster_AcceptedWithoutDomain(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<PostMaster>", 250, "2.0.0")
	rc.expect("DATA", 354, "")
	rc.send("Subject: x\r\n\r\nRCPT TO:<postmaster>\r\n.\r\n")
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	m := ts.messages()[0]
	if m.Envelope.To[0].Addr != "postmaster@relay.test" {
		t.Errorf("recipient %q", m.Envelope.To[0].Addr)
	}
	if !strings.HasSuffix(m.Body, "\r\n\r\nRCPT TO:<postmaster>\r\n") {
		t.Errorf("body line rewritten:\n%s", m.Body)
	}
}

func TestServer_DuplicateRecipients_Collapsed(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test", "B@DEST.test", "b@dest.test", "c@dest.test"}, "Subject: x\r\n\r\nx\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	m := ts.messages()[0]
	if len(m.Envelope.To) != 2 || m.Envelope.To[0].Addr != "b@dest.test" || m.Envelope.To[1].Addr != "c@dest.test" {
		t.Errorf("recipients %+v", m.Envelope.To)
	}
}

func TestServer_DSNParameters_KeptInEnvelope(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	if text := rc.expect("EHLO client.test", 250, ""); !strings.Contains(text, "\nDSN") {
		t.Errorf("DSN not offered:\n%s", text)
	}
	rc.expect("MAIL FROM:<a@sender.test> RET=HDRS ENVID=env+2Bid-1 BODY=8BITMIME", 250, "")
	rc.expect("RCPT TO:<b@dest.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+40orig.test", 250, "")
	rc.expect("RCPT TO:<c@dest.test> NOTIFY=NEVER", 250, "")
	rc.expect("RCPT TO:<d@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("Subject: x\r\n\r\nx\r\n.\r\n")
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	env := ts.messages()[0].Envelope
	if env.Ret != queue.RetHeaders || env.EnvID != "env+id-1" || !env.EightBit {
		t.Errorf("MAIL parameters: %+v", env)
	}
	want := []queue.Recipient{
		{Addr: "b@dest.test", Notify: queue.NotifySuccess | queue.NotifyFailure, ORCPT: "rfc822;b@orig.test"},
		{Addr: "c@dest.test", Notify: queue.NotifyNever},
		{Addr: "d@dest.test"},
	}
	for i, r := range want {
		if env.To[i] != r {
			t.Errorf("recipient %d: %+v, want %+v", i, env.To[i], r)
		}
	}
}

func TestServer_MailBeforeAuth_530(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<alice@sender.test>", 530, "5.7.0")
	rc.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00"+stPassword), 235, "2.0.0")
	rc.expect("MAIL FROM:<alice@sender.test>", 250, "2.0.0")
}

func TestServer_AuthOverPlaintext_Refused(t *testing.T) {
	ts := startTestServer(t, nil)
	rc := stDial(t, ts.addr)
	text := rc.expect("EHLO client.test", 250, "")
	if strings.Contains(text, "AUTH") {
		t.Errorf("AUTH offered over plaintext:\n%s", text)
	}
	if !strings.Contains(text, "\nSTARTTLS") {
		t.Errorf("STARTTLS not offered:\n%s", text)
	}
	if strings.Contains(text, "REQUIRETLS") {
		t.Errorf("REQUIRETLS offered over plaintext:\n%s", text)
	}
	rc.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00"+stPassword), 538, "5.7.11")
	rc.expect("AUTH LOGIN", 538, "5.7.11")
	rc.expect("MAIL FROM:<alice@sender.test>", 530, "5.7.0")
}

func TestServer_AuthPlainAndLogin_OverSTARTTLSAndImplicitTLS(t *testing.T) {
	ts := startTestServer(t, nil)
	mechs := map[string]sasl.Client{
		"PLAIN": sasl.NewPlainClient("", stUser, stPassword),
		"LOGIN": sasl.NewLoginClient(stUser, stPassword),
	}
	for name := range mechs {
		for _, implicit := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/implicit=%v", name, implicit), func(t *testing.T) {
				var c *smtp.Client
				var err error
				if implicit {
					c, err = smtp.DialTLS(ts.tlsAddr, ts.clientConfig())
				} else {
					c, err = smtp.DialStartTLS(ts.addr, ts.clientConfig())
				}
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if ok, params := c.Extension("AUTH"); !ok || !strings.Contains(params, "PLAIN") || !strings.Contains(params, "LOGIN") {
					t.Fatalf("AUTH over TLS: %v %q", ok, params)
				}
				if ok, _ := c.Extension("REQUIRETLS"); !ok {
					t.Errorf("REQUIRETLS not offered over TLS")
				}
				if ok, _ := c.Extension("STARTTLS"); ok {
					t.Errorf("STARTTLS offered again over TLS")
				}
				mech := sasl.NewPlainClient("", stUser, stPassword)
				if name == "LOGIN" {
					mech = sasl.NewLoginClient(stUser, stPassword)
				}
				if err := c.Auth(mech); err != nil {
					t.Fatal(err)
				}
				if err := c.SendMail("alice@sender.test", []string{"bob@dest.test"}, strings.NewReader(stBody)); err != nil {
					t.Fatal(err)
				}
				if err := c.Quit(); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
	msgs := ts.messages()
	if len(msgs) != 4 {
		t.Fatalf("%d messages, want 4", len(msgs))
	}
	for _, m := range msgs {
		if m.Envelope.Identity != stUser {
			t.Errorf("identity %q", m.Envelope.Identity)
		}
		first, _, _ := strings.Cut(m.Body, ";")
		if !strings.Contains(first, "with ESMTPSA\r\n\t(using TLS 1.3 with cipher TLS_") {
			t.Errorf("Received header does not show TLS and AUTH:\n%s", first)
		}
		if strings.Contains(first, stUser) {
			t.Errorf("Received header names the user:\n%s", first)
		}
	}
}

func TestServer_BadCredentials_535ThenClosed(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true; c.MaxAuthFailures = 2 })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 535, "5.7.8")
	rc.expect("AUTH PLAIN "+b64("\x00nobody\x00"+stPassword), 535, "5.7.8")
	rc.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 421, "4.7.0")
	if got := rc.waitClosed(); len(got) != 0 {
		t.Errorf("after 421: %q", got)
	}
}

func TestServer_AuthLogin_Dialogue(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	if text := rc.expect("AUTH LOGIN", 334, ""); text != b64("Username:") {
		t.Errorf("challenge %q", text)
	}
	if text := rc.expect(b64(stUser), 334, ""); text != b64("Password:") {
		t.Errorf("challenge %q", text)
	}
	rc.expect(b64("wrong"), 535, "5.7.8")
	rc.expect("AUTH LOGIN "+b64(stUser), 334, "")
	rc.expect(b64(stPassword), 235, "2.0.0")
	rc.expect("AUTH LOGIN", 503, "5.5.1")
}

func TestServer_AuthBackendFailure_454WithoutDetails(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	text := rc.expect("AUTH PLAIN "+b64("\x00broken\x00"+stPassword), 454, "4.7.0")
	if strings.Contains(text, "secret") || strings.Contains(text, "backend") {
		t.Errorf("internal error in reply: %q", text)
	}
	rc.expect("AUTH PLAIN "+b64("other\x00"+stUser+"\x00"+stPassword), 535, "5.7.8") // authzid of someone else
	rc.expect("AUTH PLAIN "+b64("garbage"), 501, "5.5.2")
}

func TestServer_Scopes_And_Sandbox(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true })
	for _, tc := range []struct {
		user string
		code int
		held bool
	}{{"readkey", 550, false}, {"sendkey", 250, false}, {"sandbox", 250, true}} {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("AUTH PLAIN "+b64("\x00"+tc.user+"\x00"+stPassword), 235, "2.0.0")
		code, text := rc.cmd("MAIL FROM:<a@sender.test>")
		if code != tc.code {
			t.Fatalf("%s: MAIL %d %s, want %d", tc.user, code, text, tc.code)
		}
		if code != 250 {
			continue
		}
		rc.expect("RCPT TO:<b@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		rc.send("Subject: x\r\n\r\nx\r\n.\r\n")
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("%d %s", code, text)
		}
		var m *queue.Message
		ts.q.List(context.Background(), queue.Filter{}, func(mm *queue.Message) error {
			if mm.Envelope.Identity == tc.user {
				m = mm
			}
			return nil
		})
		if m == nil || m.Envelope.Held != tc.held || (m.State == queue.StateHeld) != tc.held {
			t.Errorf("%s: message %+v", tc.user, m)
		}
	}
}

func TestServer_SenderRestrictions_DefaultPolicy(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		l, _ := auth.NewAllowList([]auth.AllowEntry{{Identity: auth.Identity{Name: "app", SenderDomains: []string{"app.test"}}, Networks: []string{"127.0.0.1"}}})
		c.AddrAuthenticator = l
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<x@other.test>", 553, "5.7.1")
	rc.expect("MAIL FROM:<x@app.test>", 250, "")
	rc.expect("RCPT TO:<y@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("From: x@other.test\r\n\r\nx\r\n.\r\n")
	if code, text := rc.reply(); code != 553 {
		t.Fatalf("From of another domain: %d %s", code, text)
	}
}

func TestServer_RequireTLS(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test> REQUIRETLS", 530, "5.7.10")
	rc.startTLS(ts.clientConfig())
	if text := rc.expect("EHLO client.test", 250, ""); !strings.Contains(text, "\nREQUIRETLS") {
		t.Errorf("REQUIRETLS not offered over TLS:\n%s", text)
	}
	rc.expect("MAIL FROM:<a@sender.test> REQUIRETLS", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("Subject: x\r\n\r\nx\r\n.\r\n")
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	m := ts.messages()[0]
	if !m.Envelope.RequireTLS {
		t.Errorf("RequireTLS not kept")
	}
	if !strings.Contains(m.Body, "with ESMTPS\r\n\t(using TLS") {
		t.Errorf("Received:\n%s", m.Body)
	}
}

func TestServer_STARTTLS_ForgetsStateAndRefusesInjection(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AllowInsecureAuth = true })
	t.Run("state reset", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("AUTH PLAIN "+b64("\x00"+stUser+"\x00"+stPassword), 235, "")
		rc.startTLS(ts.clientConfig())
		// RFC 3207 §4.2: the client must EHLO again and is no longer
		// authenticated.
		rc.expect("MAIL FROM:<a@sender.test>", 502, "5.5.1")
		rc.expect("EHLO client.test", 250, "")
		rc.expect("MAIL FROM:<a@sender.test>", 530, "5.7.0")
		rc.expect("STARTTLS", 503, "5.5.1")
	})
	t.Run("plaintext pipelined after STARTTLS", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.send("STARTTLS\r\nAUTH PLAIN " + b64("\x00"+stUser+"\x00"+stPassword) + "\r\n")
		if code, _ := rc.reply(); code != 220 {
			t.Fatalf("STARTTLS: %d", code)
		}
		if got := rc.waitClosed(); len(got) != 0 {
			t.Errorf("after injection: %q", got)
		}
	})
}

func TestServer_Oversized_552(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxMessageBytes = 2000
	})
	rc := stDial(t, ts.addr)
	if text := rc.expect("EHLO client.test", 250, ""); !strings.Contains(text, "\nSIZE 2000") {
		t.Errorf("SIZE not advertised:\n%s", text)
	}
	rc.expect("MAIL FROM:<a@sender.test> SIZE=2001", 552, "5.3.4")
	big := "Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("z", 70)+"\r\n", 40)
	code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, big)
	if code != 552 || !strings.HasPrefix(text, "5.3.4 ") {
		t.Fatalf("got %d %s, want 552 5.3.4", code, text)
	}
	// Exactly the limit, and within it, in the same session.
	exact := "Subject: exact\r\n\r\n" + strings.Repeat("e", 2000-len("Subject: exact\r\n\r\n")-2) + "\r\n"
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, exact); code != 250 {
		t.Fatalf("message of exactly the limit: %d %s", code, text)
	}
	rc.expect("MAIL FROM:<a@sender.test> SIZE=2000", 250, "")
	rc.expect("RSET", 250, "")
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: small\r\n\r\nok\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	if n := len(ts.messages()); n != 2 {
		t.Fatalf("%d messages, want 2", n)
	}
}

func TestServer_IdentityMaxSize_552(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		l, _ := auth.NewAllowList([]auth.AllowEntry{{Identity: auth.Identity{Name: "small", MaxSize: 100}, Networks: []string{"127.0.0.1"}}})
		c.AddrAuthenticator = l
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test> SIZE=101", 552, "5.3.4")
	code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\n"+strings.Repeat("y", 100)+"\r\n")
	if code != 552 || !strings.HasPrefix(text, "5.3.4 ") {
		t.Fatalf("got %d %s, want 552 5.3.4", code, text)
	}
}

func TestServer_TooManyRecipients(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxRecipients = 3
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	for i := range 3 {
		rc.expect(fmt.Sprintf("RCPT TO:<r%d@dest.test>", i), 250, "")
	}
	rc.expect("RCPT TO:<r4@dest.test>", 452, "4.5.3")
	rc.expect("DATA", 354, "")
	rc.send("Subject: x\r\n\r\nx\r\n.\r\n")
	if code, _ := rc.reply(); code != 250 {
		t.Fatal(code)
	}
	if to := ts.messages()[0].Envelope.To; len(to) != 3 {
		t.Errorf("%d recipients", len(to))
	}
}

func TestServer_SubmitErrors_Mapped(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		code int
		enh  string
		text string
	}{
		{"smtp error wrapped", fmt.Errorf("ctx: %w", policy.Reject(550, [3]int{5, 7, 1}, "Spam detected")), 550, "5.7.1", "Spam detected"},
		{"smtp error with wrong class", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{5, 3, 0}, Message: "later"}, 451, "4.3.0", "later"},
		{"no space", fmt.Errorf("write /var/spool/x: %w", queue.ErrNoSpace), 452, "4.3.1", "Insufficient system storage"},
		{"other", errors.New("open /var/spool/baton/secret: permission denied"), 451, "4.3.0", "Temporary local problem, please try again later"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := startTestServer(t, func(c *ServerConfig) {
				c.AddrAuthenticator = stLoopbackAllowList(t)
				c.Submitter = SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
					io.Copy(io.Discard, body)
					return "", tc.err
				})
			})
			rc := stDial(t, ts.addr)
			rc.expect("EHLO client.test", 250, "")
			code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\nx\r\n")
			if code != tc.code || text != tc.enh+" "+tc.text {
				t.Errorf("got %d %s, want %d %s %s", code, text, tc.code, tc.enh, tc.text)
			}
			rc.expect("NOOP", 250, "")
		})
	}
}

func TestServer_PolicyHooks_SeeHeaderAndClient(t *testing.T) {
	var seen []string
	pol := policy.Funcs{
		OnConnect: func(ctx context.Context, c *policy.Client) error {
			seen = append(seen, fmt.Sprintf("connect %v auth=%v", c.Addr, c.Authenticated))
			return nil
		},
		OnMail: func(ctx context.Context, c *policy.Client, from string) error {
			seen = append(seen, "mail "+from+" helo="+c.HELO+" id="+c.Identity)
			return nil
		},
		OnRcpt: func(ctx context.Context, c *policy.Client, from, to string) error {
			seen = append(seen, "rcpt "+to)
			if strings.HasPrefix(to, "deny") {
				return policy.Reject(550, [3]int{5, 1, 1}, "No such user")
			}
			return nil
		},
		OnData: func(ctx context.Context, c *policy.Client, m *policy.Message) error {
			seen = append(seen, "data subject="+m.Header.Get("Subject")+fmt.Sprintf(" size=%d", m.Size))
			if m.Header.Get("Subject") == "spam" {
				return policy.Reject(554, [3]int{5, 7, 1}, "Looks like spam")
			}
			return nil
		},
	}
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.Policy = pol
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test> SIZE=40", 250, "")
	rc.expect("RCPT TO:<deny@dest.test>", 550, "5.1.1")
	rc.expect("RCPT TO:<ok@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("Subject: spam\r\n\r\n" + strings.Repeat("body\r\n", 1000) + ".\r\n")
	rc.reply()
	want := []string{"connect 127.0.0.1 auth=true", "mail a@sender.test helo=client.test id=loopback", "rcpt deny@dest.test", "rcpt ok@dest.test", "data subject=spam size=40"}
	if strings.Join(seen, "|") != strings.Join(want, "|") {
		t.Errorf("hooks:\n%q\nwant\n%q", seen, want)
	}
	if n := len(ts.messages()); n != 0 {
		t.Errorf("%d messages queued", n)
	}
}

func TestServer_ConnectPolicyRefusal_ClosesWithReply(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Policy = policy.Funcs{OnConnect: func(ctx context.Context, c *policy.Client) error {
			return policy.Reject(554, [3]int{5, 7, 1}, "Go away")
		}}
	})
	rc := stDialNoGreeting(t, ts.addr)
	if code, text := rc.reply(); code != 554 || text != "5.7.1 Go away" {
		t.Errorf("got %d %s", code, text)
	}
	rc.waitClosed()
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }
