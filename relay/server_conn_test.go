package relay

import (
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/queue"
)

// smugglingPayloads are end-of-data look-alikes that some servers accept
// (SMTP smuggling, CVE-2023-51764 and relatives). Each is put between a
// first message and a second, smuggled one.
var smugglingPayloads = []string{
	"\n.\n",
	"\r.\r",
	"\r\n.\n",
	"\n.\r\n",
	"\r\r\n.\r\n",
	"\r\n.\r",
	"\r.\r\n",
	"\n\r.\r\n",
}

func TestServer_Smuggling_NeverTwoMessages(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	for _, payload := range smugglingPayloads {
		t.Run(fmt.Sprintf("%q", payload), func(t *testing.T) {
			before := len(ts.messages())
			rc := stDial(t, ts.addr)
			rc.expect("EHLO client.test", 250, "")
			rc.expect("MAIL FROM:<a@sender.test>", 250, "")
			rc.expect("RCPT TO:<b@dest.test>", 250, "")
			rc.expect("DATA", 354, "")
			rc.send("Subject: first\r\n\r\nfirst" + payload +
				"MAIL FROM:<admin@sender.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
			code, text := rc.reply()
			if code != 554 || !strings.HasPrefix(text, "5.6.0 ") {
				t.Errorf("end of data: %d %s, want 554 5.6.0", code, text)
			}
			// The session is in step: the next command is a command.
			rc.expect("NOOP", 250, "2.0.0")
			if got := len(ts.messages()); got != before {
				t.Errorf("%d messages queued, want none", got-before)
			}
		})
	}
	t.Run("BDAT", func(t *testing.T) {
		for _, payload := range smugglingPayloads {
			rc := stDial(t, ts.addr)
			rc.expect("EHLO client.test", 250, "")
			rc.expect("MAIL FROM:<a@sender.test>", 250, "")
			rc.expect("RCPT TO:<b@dest.test>", 250, "")
			chunk := "Subject: first\r\n\r\nfirst" + payload + "MAIL FROM:<x@y.test>\r\n"
			rc.send(fmt.Sprintf("BDAT %d LAST\r\n", len(chunk)) + chunk)
			code, text := rc.reply()
			if code != 554 {
				t.Errorf("%q: BDAT: %d %s, want 554", payload, code, text)
			}
			rc.expect("NOOP", 250, "")
		}
		if n := len(ts.messages()); n != 0 {
			t.Errorf("%d messages queued", n)
		}
	})
}

func TestServer_BDAT_Accepted(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxMessageBytes = 5000
	})
	rc := stDial(t, ts.addr)
	if text := rc.expect("EHLO client.test", 250, ""); !strings.Contains(text, "\nCHUNKING") {
		t.Fatalf("CHUNKING not offered:\n%s", text)
	}
	// A refused DATA with a bare LF first: its mark must not stick to the
	// next transaction.
	if code, _ := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\nbare\nlf\r\n"); code != 554 {
		t.Fatalf("bare LF: %d", code)
	}
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	part1 := "Subject: chunks\r\n\r\nline one\r\n.RCPT TO:<x@y.test>\r\n"
	part2 := "line two without CRLF"
	rc.send(fmt.Sprintf("BDAT %d\r\n", len(part1)) + part1)
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("BDAT: %d %s", code, text)
	}
	rc.send(fmt.Sprintf("BDAT %d LAST\r\n", len(part2)) + part2)
	code, text := rc.reply()
	if code != 250 || !strings.HasPrefix(text, "2.0.0 OK queued as ") {
		t.Fatalf("BDAT LAST: %d %s", code, text)
	}
	rc.expect("NOOP", 250, "")
	// Too big, over two chunks: refused while streaming, in step after.
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	big := strings.Repeat(strings.Repeat("b", 98)+"\r\n", 30)
	rc.send(fmt.Sprintf("BDAT %d\r\n", len(big)) + big)
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("first chunk: %d %s", code, text)
	}
	rc.send(fmt.Sprintf("BDAT %d LAST\r\n", len(big)) + big)
	if code, text := rc.reply(); code != 552 || !strings.HasPrefix(text, "5.3.4 ") {
		t.Fatalf("oversized BDAT: %d %s", code, text)
	}
	rc.expect("NOOP", 250, "")
	if n := len(ts.messages()); n != 1 {
		t.Fatalf("%d messages, want 1", n)
	}
	m := ts.messages()[0]
	if !strings.HasSuffix(m.Body, "\r\n\r\nline one\r\n.RCPT TO:<x@y.test>\r\nline two without CRLF\r\n") {
		t.Errorf("body:\n%q", m.Body)
	}
}

// TestServer_RefusedBDAT_ChunkNotTakenForCommands sends chunks that
// go-smtp refuses before reading them; their content must be skipped, not
// executed.
func TestServer_RefusedBDAT_ChunkNotTakenForCommands(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	chunk := "STARTTLS\r\nMAIL FROM:<bad address>\r\nRCPT TO:<postmaster>\r\nNOOP\r\n"
	rc.send(fmt.Sprintf("BDAT %d LAST\r\n", len(chunk)) + chunk)
	if code, text := rc.reply(); code != 502 {
		t.Fatalf("BDAT without a transaction: %d %s", code, text)
	}
	rc.expect("NOOP", 250, "2.0.0")
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\nx\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
}

func TestServer_IdleTimeout_ClosesConnection(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.IdleTimeout = 100 * time.Millisecond
	})
	t.Run("between commands", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		got := rc.waitClosed()
		if len(got) != 1 || !strings.HasPrefix(got[0], "421 4.4.2 ") {
			t.Errorf("got %q, want one 421 4.4.2", got)
		}
	})
	t.Run("inside a body", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("MAIL FROM:<a@sender.test>", 250, "")
		rc.expect("RCPT TO:<b@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		// The rest of this body would be commands if the server read on.
		rc.send("Subject: x\r\n\r\nbody\r\nQUIT\r\n")
		got := rc.waitClosed()
		if len(got) != 1 || !strings.HasPrefix(got[0], "421 4.4.2 ") {
			t.Errorf("got %q, want one 421 4.4.2", got)
		}
		if n := len(ts.messages()); n != 0 {
			t.Errorf("%d messages queued", n)
		}
	})
	t.Run("server still serves", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
	})
}

func TestServer_CommandFlood_421(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxJunkCommands = 10
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "") // 1
	for range 4 {
		rc.expect("NOOP", 250, "")
		rc.expect("VRFY someone", 252, "")
	} // 9
	// A message is progress: the count starts again.
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, "Subject: x\r\n\r\nx\r\n"); code != 250 {
		t.Fatalf("%d %s", code, text)
	}
	for range 10 {
		rc.expect("NOOP", 250, "")
	}
	rc.expect("NOOP", 421, "4.7.0")
	if got := rc.waitClosed(); len(got) != 0 {
		t.Errorf("after 421: %q", got)
	}
	t.Run("refused commands count", func(t *testing.T) {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("MAIL FROM:<a@sender.test>", 250, "")
		for range 9 {
			rc.expect("RCPT TO:<bad address>", 501, "5.1.3")
		}
		rc.expect("RCPT TO:<b@dest.test>", 421, "4.7.0")
	})
}

func TestServer_Shutdown_ClosesIdleAndFinishesData(t *testing.T) {
	release := make(chan struct{})
	submitting := make(chan struct{}, 1)
	q := queue.NewMemory(queue.MemoryConfig{})
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.AllowInsecureAuth = true
		c.Submitter = SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
			submitting <- struct{}{}
			<-release
			return q.Enqueue(ctx, env, body)
		})
	})
	idle := stDial(t, ts.addr)
	idle.expect("EHLO idle.test", 250, "")
	idle.expect("MAIL FROM:<a@sender.test>", 250, "") // mid-transaction but waiting: idle
	inAuth := stDial(t, ts.addr)
	inAuth.expect("EHLO auth.test", 250, "")
	inAuth.expect("AUTH LOGIN", 334, "") // the server waits for the user name
	busy := stDial(t, ts.addr)
	busy.expect("EHLO busy.test", 250, "")
	busy.expect("MAIL FROM:<a@sender.test>", 250, "")
	busy.expect("RCPT TO:<b@dest.test>", 250, "")
	busy.expect("DATA", 354, "")
	busy.send("Subject: in flight\r\n\r\nbody\r\n.\r\n")
	<-submitting

	done := make(chan error, 1)
	go func() { done <- ts.srv.Shutdown(context.Background()) }()

	got := idle.waitClosed()
	if len(got) != 1 || !strings.HasPrefix(got[0], "421 4.3.2 ") {
		t.Errorf("idle client got %q, want one 421 4.3.2", got)
	}
	got = inAuth.waitClosed()
	if len(got) != 1 || !strings.HasPrefix(got[0], "421 4.3.2 ") {
		t.Errorf("client in AUTH got %q, want one 421 4.3.2", got)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v while a message was being submitted", err)
	default:
	}
	close(release)
	if code, text := busy.reply(); code != 250 {
		t.Errorf("in-flight message: %d %s", code, text)
	}
	got = busy.waitClosed()
	if len(got) != 1 || !strings.HasPrefix(got[0], "421 4.3.2 ") {
		t.Errorf("busy client after its message got %q", got)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	var n int
	q.List(context.Background(), queue.Filter{}, func(*queue.Message) error { n++; return nil })
	if n != 1 {
		t.Errorf("%d messages queued, want 1", n)
	}
	if c, err := net.Dial("tcp", ts.addr); err == nil {
		c.Close()
		t.Errorf("still accepting after Shutdown")
	}
}

func TestServer_Shutdown_DeadlineClosesEverything(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{}, 1)
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.Submitter = SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
			started <- struct{}{}
			select {
			case <-ctx.Done():
				return "", ctx.Err()
			case <-release:
				return "x", nil
			}
		})
	})
	busy := stDial(t, ts.addr)
	busy.expect("EHLO busy.test", 250, "")
	busy.expect("MAIL FROM:<a@sender.test>", 250, "")
	busy.expect("RCPT TO:<b@dest.test>", 250, "")
	busy.expect("DATA", 354, "")
	busy.send("Subject: stuck\r\n\r\nbody\r\n.\r\n")
	<-started
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := ts.srv.Shutdown(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("Shutdown: %v, want context.Canceled", err)
	}
	busy.waitClosed()
}

func TestServer_MaxConns_421(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.MaxConns = 2 })
	a := stDial(t, ts.addr)
	b := stDial(t, ts.addr)
	c := stDialNoGreeting(t, ts.addr)
	if code, text := c.reply(); code != 421 || !strings.HasPrefix(text, "4.7.0 ") {
		t.Errorf("third connection: %d %s", code, text)
	}
	a.expect("QUIT", 221, "")
	a.waitClosed()
	b.expect("NOOP", 250, "")
	// A slot is free again once the first client has gone.
	for i := 0; ; i++ {
		d := stDialNoGreeting(t, ts.addr)
		if code, _ := d.reply(); code == 220 {
			break
		}
		if i > 1000 {
			t.Fatal("slot never freed")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestServer_MisbehavingClient_OthersServed runs a client that sends
// garbage, a huge line, binary data and half commands next to well-behaved
// clients.
func TestServer_MisbehavingClient_OthersServed(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	bad := []string{
		strings.Repeat("A", 10000) + "\r\n",
		"\x00\x01\x02\xff\xfe\r\n\r\n\r\n\r\n",
		"EHLO x\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\nDATA\r\nno end",
		"EHLO x\r\nBDAT 99999999999\r\nBDAT 10 LAST\r\nshort",
		"EHLO x\r\nAUTH PLAIN\r\n!!!notbase64\r\n",
		"STARTTLS\r\nnot a handshake\r\n",
	}
	var wg sync.WaitGroup
	for _, b := range bad {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rc := stDialNoGreeting(t, ts.addr)
			rc.send(b)
			rc.c.(interface{ CloseWrite() error }).CloseWrite()
			io.Copy(io.Discard, rc.c)
		}()
	}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := smtp.Dial(ts.addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			if err := c.SendMail("a@sender.test", []string{"b@dest.test"}, strings.NewReader(stBody)); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if n := len(ts.messages()); n != 4 {
		t.Errorf("%d messages, want 4", n)
	}
	rc := stDial(t, ts.addr)
	rc.expect("EHLO after.test", 250, "")
}

// TestServer_PythonSmtplib drives the server with Python's smtplib: AUTH
// LOGIN and PLAIN over STARTTLS and over implicit TLS.
func TestServer_PythonSmtplib(t *testing.T) {
	py, err := exec.LookPath("/usr/bin/python3")
	if err != nil {
		t.Skip("no /usr/bin/python3")
	}
	ts := startTestServer(t, nil)
	caFile := t.TempDir() + "/ca.pem"
	writePEM(t, caFile, ts.ca.Cert.Raw)
	script := `
import smtplib, ssl, sys
host, port, tlsport, ca, user, pw = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
ctx = ssl.create_default_context(cafile=ca)
msg = "From: alice@sender.test\r\nTo: bob@dest.test\r\nSubject: from python\r\n\r\nhi\r\n"
for mech in ("LOGIN", "PLAIN"):
    s = smtplib.SMTP("127.0.0.1", port)
    s.ehlo("py.test")
    assert not s.has_extn("auth"), "AUTH offered before TLS"
    s.starttls(context=ctx)
    s.ehlo("py.test")
    assert mech in s.esmtp_features["auth"], s.esmtp_features
    s.user, s.password = user, pw
    code, resp = s.auth(mech, getattr(s, "auth_" + mech.lower()), initial_response_ok=(mech == "PLAIN"))
    assert code == 235, (code, resp)
    refused = s.sendmail("alice@sender.test", ["bob@dest.test"], msg)
    assert not refused
    s.quit()
    s = smtplib.SMTP_SSL("127.0.0.1", tlsport, context=ctx)
    s.ehlo("py.test")
    s.login(user, pw)
    s.sendmail("alice@sender.test", ["bob@dest.test"], msg)
    s.quit()
try:
    s = smtplib.SMTP_SSL("127.0.0.1", tlsport, context=ctx)
    s.login(user, "wrong")
    raise SystemExit("bad password accepted")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535 and e.smtp_error.startswith(b"5.7.8"), e
print("ok")
`
	_, port, _ := strings.Cut(ts.addr, ":")
	_, tlsPort, _ := strings.Cut(ts.tlsAddr, ":")
	out, err := exec.Command(py, "-c", script, stHost, port, tlsPort, caFile, stUser, stPassword).CombinedOutput()
	if err != nil || strings.TrimSpace(string(out)) != "ok" {
		t.Fatalf("python: %v\n%s", err, out)
	}
	if n := len(ts.messages()); n != 4 {
		t.Errorf("%d messages, want 4", n)
	}
}

func writePEM(t *testing.T, path string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestServer_StreamsBodyToSubmitter shows that the body is not held
// whole: the Submitter receives the start of the message while the client
// has not yet sent the rest.
func TestServer_StreamsBodyToSubmitter(t *testing.T) {
	gotStart := make(chan struct{})
	var total atomic.Int64
	ts := startTestServer(t, func(c *ServerConfig) {
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.Submitter = SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
			buf := make([]byte, 64)
			n, err := io.ReadFull(body, buf)
			if err != nil {
				return "", err
			}
			close(gotStart)
			rest, err := io.Copy(io.Discard, body)
			total.Store(int64(n) + rest)
			return "STREAMED", err
		})
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	// go-smtp's DATA reader fills whole buffers, so send a few of them
	// before waiting for the Submitter.
	line := strings.Repeat("s", 98) + "\r\n"
	rc.send("Subject: streaming\r\n\r\nfirst part\r\n" + strings.Repeat(line, 100))
	select {
	case <-gotStart:
	case <-time.After(30 * time.Second): // a hang guard, not a timing assertion
		t.Fatal("the Submitter saw nothing before the end of the message")
	}
	for range 1000 {
		rc.send(line)
	}
	rc.send(".\r\n")
	if code, text := rc.reply(); code != 250 || text != "2.0.0 OK queued as STREAMED" {
		t.Fatalf("%d %s", code, text)
	}
	if min := int64(len("Subject: streaming\r\n\r\nfirst part\r\n") + 1100*len(line)); total.Load() < min {
		t.Errorf("submitter read %d bytes, want at least %d", total.Load(), min)
	}
}

func TestServer_LongBodyLine_RefusedAndClosed(t *testing.T) {
	ts := startTestServer(t, func(c *ServerConfig) { c.AddrAuthenticator = stLoopbackAllowList(t) })
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test>", 250, "")
	rc.expect("RCPT TO:<b@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send("Subject: long\r\n\r\n" + strings.Repeat("L", 10000) + "\r\nQUIT\r\n.\r\n")
	got := rc.waitClosed()
	if len(got) != 1 || !strings.HasPrefix(got[0], "500 5.5.2 ") {
		t.Errorf("got %q, want one 500 5.5.2", got)
	}
	if n := len(ts.messages()); n != 0 {
		t.Errorf("%d messages queued", n)
	}
}
