package relay

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/mxtest"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

// recMetrics records every Metrics call.
type recMetrics struct {
	*eventLog
	mu       sync.Mutex
	attempts []recAttempt
	conns    int
	tls      []uint16
	replies  map[int]int
	authFail map[string]int
	refused  map[string]int // "stage/reason"
}

type recAttempt struct {
	dest    string
	elapsed time.Duration
	codes   []int
	host    string
}

func newRecMetrics() *recMetrics {
	return &recMetrics{eventLog: newEventLog(), replies: map[int]int{}, authFail: map[string]int{}, refused: map[string]int{}}
}

func (m *recMetrics) DeliveryAttempt(dest string, elapsed time.Duration, res *DeliveryResult) {
	a := recAttempt{dest: dest, elapsed: elapsed, host: res.Host}
	for _, r := range res.Replies {
		a.codes = append(a.codes, r.Code)
	}
	m.mu.Lock()
	m.attempts = append(m.attempts, a)
	m.mu.Unlock()
}
func (m *recMetrics) ServerConnection()    { m.mu.Lock(); m.conns++; m.mu.Unlock() }
func (m *recMetrics) ServerTLS(v uint16)   { m.mu.Lock(); m.tls = append(m.tls, v); m.mu.Unlock() }
func (m *recMetrics) ServerReply(c int)    { m.mu.Lock(); m.replies[c]++; m.mu.Unlock() }
func (m *recMetrics) AuthFailure(s string) { m.mu.Lock(); m.authFail[s]++; m.mu.Unlock() }
func (m *recMetrics) Refused(stage, reason string) {
	m.mu.Lock()
	m.refused[stage+"/"+reason]++
	m.mu.Unlock()
}

var _ Metrics = (*recMetrics)(nil)

// TestMetrics_RelayReportsAttemptsAndEvents delivers one message over SMTP
// to a loopback server that takes one recipient and refuses the other,
// and checks what the relay told its Metrics: every event (alongside the
// Observer) and one attempt per destination with its replies.
func TestMetrics_RelayReportsAttemptsAndEvents(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	peer := &dsnMX{}
	srv := smtp.NewServer(peer)
	srv.Domain = "mx.test"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	events := newEventLog()
	met := newRecMetrics()
	r, err := New(Config{
		Hostname: "relay.example.test",
		Observer: events,
		Metrics:  met,
		Streams:  map[string]StreamConfig{"news": {}},
		Resolver: mxtest.Loopback(port),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	env := &queue.Envelope{From: "sender@example.test", Stream: "news",
		To: []queue.Recipient{{Addr: "known@dest.test"}, {Addr: "unknown@dest.test"}}}
	id, err := r.Submit(ctx, env, strings.NewReader("Subject: m\r\n\r\nhi\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	sent := met.wait(ctx, t, "dsn_sent", func(e Event) bool { return e.Kind == EventDSNSent && e.ID == id })
	met.wait(ctx, t, "DSN delivered", func(e Event) bool { return e.Kind == EventDelivered && e.ID == sent.DSNID })

	count := func(l *eventLog, k EventKind, id queue.ID) (n int, dests []string) {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, e := range l.events {
			if e.Kind == k && e.ID == id {
				n++
				dests = append(dests, e.Stream+"|"+e.Dest)
			}
		}
		return n, dests
	}
	for _, l := range []*eventLog{events, met.eventLog} {
		if n, _ := count(l, EventAccepted, id); n != 2 {
			t.Errorf("accepted events = %d, want 2 (one per recipient)", n)
		}
		if n, d := count(l, EventDelivered, id); n != 1 || d[0] != "news|mx:dest.test" {
			t.Errorf("delivered events = %d %v", n, d)
		}
		if n, d := count(l, EventFailed, id); n != 1 || d[0] != "news|mx:dest.test" {
			t.Errorf("failed events = %d %v", n, d)
		}
	}

	met.mu.Lock()
	defer met.mu.Unlock()
	if len(met.attempts) != 2 {
		t.Fatalf("attempts = %+v, want the message's and the DSN's", met.attempts)
	}
	a, d := met.attempts[0], met.attempts[1]
	if a.dest != "mx:dest.test" || fmt.Sprint(a.codes) != "[250 550]" || a.host != "mx.dest.test" || a.elapsed <= 0 {
		t.Errorf("message attempt = %+v", a)
	}
	if d.dest != "mx:example.test" || fmt.Sprint(d.codes) != "[250]" || d.elapsed <= 0 {
		t.Errorf("DSN attempt = %+v", d)
	}
	t.Logf("attempt durations: %v, %v", a.elapsed, d.elapsed)
}

// TestMetrics_ServerHooks runs real SMTP sessions against a server with
// a connection limit, a rate limit and an AUTH failure cap, tallies
// every reply the clients read, and checks that the server reported the
// same replies and each connection, TLS handshake, AUTH failure and
// refusal once.
func TestMetrics_ServerHooks(t *testing.T) {
	met := newRecMetrics()
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Metrics = met
		c.AllowInsecureAuth = true
		c.MaxAuthFailures = 1
		c.Policy = policy.Chain{
			policy.NewConnLimit(&policy.ConnLimitConfig{PerIP: 2}),
			DefaultServerPolicy(),
			policy.NewRateLimit(&policy.RateLimitConfig{PerIP: policy.Rate{Messages: 1, Per: time.Hour}}),
		}
	})
	seen := map[int]int{}
	var seenMu sync.Mutex
	tally := func(code int) int {
		seenMu.Lock()
		seen[code]++
		seenMu.Unlock()
		return code
	}
	// B over STARTTLS: one message, then a second MAIL over the rate.
	b := stDial(t, ts.addr)
	tally(220)
	tally(b.expectCode("EHLO b.test", 250))
	b.startTLS(ts.clientConfig())
	tally(220)
	tally(b.expectCode("EHLO b.test", 250))
	tally(b.expectCode("AUTH PLAIN "+b64("\x00"+stUser+"\x00"+stPassword), 235))
	tally(b.expectCode("MAIL FROM:<x@example.test>", 250))
	tally(b.expectCode("RCPT TO:<y@dest.test>", 250))
	tally(b.expectCode("DATA", 354))
	tally(b.expectCode("Subject: t\r\n\r\nhi\r\n.", 250))
	tally(b.expectCode("MAIL FROM:<x@example.test>", 450))

	// C over implicit TLS is the second connection from 127.0.0.1; D,
	// the third, is over PerIP.
	c := stDialTLS(t, ts.tlsAddr, ts.clientConfig())
	tally(220)
	d := stDialNoGreeting(t, ts.addr)
	code, _ := d.reply()
	if tally(code) != 421 {
		t.Fatalf("third connection: %d, want 421", code)
	}
	d.waitClosed()

	// C: two wrong passwords; the second passes MaxAuthFailures.
	tally(c.expectCode("EHLO c.test", 250))
	tally(c.expectCode("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 535))
	tally(c.expectCode("AUTH PLAIN "+b64("\x00"+stUser+"\x00wrong"), 421))
	c.waitClosed()
	tally(b.expectCode("QUIT", 221))
	b.waitClosed()

	met.mu.Lock()
	defer met.mu.Unlock()
	seenMu.Lock()
	defer seenMu.Unlock()
	if fmt.Sprint(met.replies) != fmt.Sprint(seen) {
		t.Errorf("replies reported %v, clients read %v", met.replies, seen)
	}
	if met.conns != 3 {
		t.Errorf("connections = %d, want 3", met.conns)
	}
	if len(met.tls) != 2 || met.tls[0] != tls.VersionTLS13 || met.tls[1] != tls.VersionTLS13 {
		t.Errorf("TLS handshakes = %v, want two TLS 1.3", met.tls)
	}
	if fmt.Sprint(met.authFail) != "map[PLAIN:2]" {
		t.Errorf("auth failures = %v", met.authFail)
	}
	want := map[string]int{"auth/auth_limit": 1, "mail/rate_limit": 1, "connect/connection_limit": 1}
	if fmt.Sprint(met.refused) != fmt.Sprint(want) {
		t.Errorf("refusals = %v, want %v", met.refused, want)
	}
}

// expectCode sends a command and fails unless the reply has code; it
// returns the code, for tallies.
func (rc *stClient) expectCode(line string, code int) int {
	rc.t.Helper()
	rc.expect(line, code, "")
	return code
}

func TestMetrics_ServerMaxConnsRefusal(t *testing.T) {
	met := newRecMetrics()
	ts := startTestServer(t, func(c *ServerConfig) { c.Metrics = met; c.MaxConns = 1 })
	a := stDial(t, ts.addr)
	b := stDialNoGreeting(t, ts.addr)
	if code, _ := b.reply(); code != 421 {
		t.Fatalf("second connection: %d, want 421", code)
	}
	a.expect("QUIT", 221, "")
	met.mu.Lock()
	defer met.mu.Unlock()
	if met.conns != 1 || met.refused["connect/connection_limit"] != 1 || met.replies[421] != 1 || met.replies[220] != 1 || met.replies[221] != 1 {
		t.Errorf("conns %d refused %v replies %v", met.conns, met.refused, met.replies)
	}
}

func TestMetrics_ServerCommandFlood(t *testing.T) {
	met := newRecMetrics()
	ts := startTestServer(t, func(c *ServerConfig) { c.Metrics = met; c.MaxJunkCommands = 2 })
	a := stDial(t, ts.addr)
	a.expect("NOOP", 250, "")
	a.expect("NOOP", 250, "")
	a.expect("NOOP", 421, "4.7.0")
	a.waitClosed()
	met.mu.Lock()
	defer met.mu.Unlock()
	if met.refused["command/command_flood"] != 1 || met.replies[250] != 2 || met.replies[421] != 1 {
		t.Errorf("refused %v replies %v", met.refused, met.replies)
	}
}

// TestMetrics_ServerSizeRefusals: a message too big, declared with SIZE
// at MAIL or found in the DATA, is a refusal by a limit (reason policy),
// as the Metrics documentation says.
func TestMetrics_ServerSizeRefusals(t *testing.T) {
	met := newRecMetrics()
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Metrics = met
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.MaxMessageBytes = 2000
	})
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<a@sender.test> SIZE=2001", 552, "5.3.4")
	big := "Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("z", 70)+"\r\n", 40)
	if code, text := rc.sendMessage("a@sender.test", []string{"b@dest.test"}, big); code != 552 {
		t.Fatalf("got %d %s, want 552", code, text)
	}
	rc.expect("QUIT", 221, "")
	met.mu.Lock()
	defer met.mu.Unlock()
	want := map[string]int{"mail/policy": 1, "data/policy": 1}
	if fmt.Sprint(met.refused) != fmt.Sprint(want) {
		t.Errorf("refusals = %v, want %v", met.refused, want)
	}
}

func TestRefusalReason(t *testing.T) {
	for _, c := range []struct {
		stage string
		reply *smtp.SMTPError
		want  string
	}{
		{StageMail, policy.Reject(450, [3]int{4, 7, 1}, "Rate limit exceeded"), RefusedRateLimit},
		{StageRcpt, policy.Reject(450, [3]int{4, 7, 1}, "Rate limit exceeded"), RefusedRateLimit},
		{StageConnect, policy.Reject(421, [3]int{4, 7, 0}, "Too many connections"), RefusedConnLimit},
		{StageAuth, policy.Reject(421, [3]int{4, 7, 0}, "Too many failures"), RefusedAuthLimit},
		{StageRcpt, policy.Reject(554, [3]int{5, 7, 1}, "Relay access denied"), RefusedPolicy},
		{StageRcpt, policy.Reject(452, [3]int{4, 5, 3}, "Too many recipients"), RefusedPolicy},
		{StageMail, &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCodeNotSet, Message: "x"}, RefusedPolicy},
	} {
		if got := refusalReason(c.stage, c.reply); got != c.want {
			t.Errorf("%s %d %v: %q, want %q", c.stage, c.reply.Code, c.reply.EnhancedCode, got, c.want)
		}
	}
}

func TestNopMetrics_DefaultForNilConfig(t *testing.T) {
	r, err := New(Config{Hostname: "relay.test", Resolver: mx.ResolverFunc(func(context.Context, string) (*mx.Route, error) {
		return nil, &mx.Error{Temporary: true, Reason: "test"}
	})})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())
	if _, ok := r.metrics.(NopMetrics); !ok {
		t.Errorf("metrics = %T, want NopMetrics", r.metrics)
	}
	s, err := NewServer(ServerConfig{Submitter: r})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.metrics.(NopMetrics); !ok {
		t.Errorf("server metrics = %T, want NopMetrics", s.metrics)
	}
}
