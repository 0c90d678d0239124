package relay

import (
	"context"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// suppressPeer is a scripted destination for the relay: it refuses
// unknown@dest.test with 550 5.1.1, accepts everything else, and keeps
// the DSNs delivered to the sender.
type suppressPeer struct {
	mu       sync.Mutex
	attempts map[string]int // per recipient, lower case
	dsns     [][]byte
}

func (p *suppressPeer) Deliver(ctx context.Context, d *Delivery) *DeliveryResult {
	res := &DeliveryResult{Host: "mx." + d.Route.Domain}
	var body []byte
	if d.Envelope.From == "" {
		rc, err := d.Open(ctx)
		if err == nil {
			body, err = io.ReadAll(rc)
			rc.Close()
		}
		if err != nil {
			for range d.Rcpts {
				res.Replies = append(res.Replies, queue.Reply{Code: 451, Enhanced: "4.3.0", Text: "read failed", Host: res.Host})
			}
			return res
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range d.Rcpts {
		p.attempts[strings.ToLower(r.Addr)]++
		if strings.EqualFold(r.Addr, "unknown@dest.test") {
			res.Replies = append(res.Replies, queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user here", Host: res.Host})
			continue
		}
		res.Replies = append(res.Replies, queue.Reply{Code: 250, Enhanced: "2.0.0", Text: "OK", Host: res.Host})
	}
	if body != nil {
		p.dsns = append(p.dsns, body)
	}
	return res
}

func (p *suppressPeer) count(addr string) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.attempts[addr]
}

// eventLog is a non-blocking Observer that lets a test wait for events.
type eventLog struct {
	mu     sync.Mutex
	events []Event
	wake   chan struct{}
}

func newEventLog() *eventLog { return &eventLog{wake: make(chan struct{})} }

func (l *eventLog) Observe(_ context.Context, e Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	close(l.wake)
	l.wake = make(chan struct{})
	l.mu.Unlock()
}

// wait returns the first event matching ok, waiting until ctx is done.
func (l *eventLog) wait(ctx context.Context, t *testing.T, what string, ok func(Event) bool) Event {
	t.Helper()
	for {
		l.mu.Lock()
		for _, e := range l.events {
			if ok(e) {
				l.mu.Unlock()
				return e
			}
		}
		wake := l.wake
		l.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			t.Fatalf("no %s event: %v", what, ctx.Err())
		}
	}
}

func TestRelaySuppression_BounceThenSuppressWithDSN(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	peer := &suppressPeer{attempts: map[string]int{}}
	events := newEventLog()
	sups := NewSuppressionMemory(SuppressionConfig{})
	r, err := New(Config{
		Hostname:     "relay.example.test",
		Deliverer:    peer,
		Observer:     events,
		Suppressions: sups,
		Resolver: mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
			return &mx.Route{Domain: domain, Key: "mx:" + domain, TLS: mx.TLSNone,
				Hosts: []mx.Host{{Name: "mx." + domain, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}}, nil
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	submit := func(to ...string) queue.ID {
		env := &queue.Envelope{From: "sender@example.test"}
		for _, a := range to {
			env.To = append(env.To, queue.Recipient{Addr: a})
		}
		id, err := r.Submit(ctx, env, strings.NewReader("From: sender@example.test\r\nSubject: hi\r\n\r\nhello\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	dsnDelivered := func(id queue.ID, rcpt string) {
		t.Helper()
		sent := events.wait(ctx, t, "dsn_sent", func(e Event) bool { return e.Kind == EventDSNSent && e.ID == id && e.Rcpt == rcpt })
		events.wait(ctx, t, "DSN delivered", func(e Event) bool {
			return e.Kind == EventDelivered && e.ID == sent.DSNID && e.Rcpt == "sender@example.test"
		})
	}

	// First message: a real 550 5.1.1 bounces and records a suppression.
	id1 := submit("unknown@dest.test", "ok@dest.test")
	dsnDelivered(id1, "unknown@dest.test")
	if s, ok, err := sups.Lookup(ctx, "unknown@dest.test"); !ok || err != nil || s.Reply.Enhanced != "5.1.1" {
		t.Fatalf("suppression after 5.1.1 = %+v, %v, %v", s, ok, err)
	}

	// Second message: not attempted, failed with the suppressed reply,
	// reported by an event and a DSN.
	id2 := submit("Unknown@dest.test")
	sup := events.wait(ctx, t, "suppressed", func(e Event) bool { return e.Kind == EventSuppressed && e.ID == id2 })
	if sup.Reply.Code != 550 || sup.Reply.Enhanced != "5.1.1" || !strings.Contains(sup.Reply.Text, "suppressed") {
		t.Errorf("suppressed event reply = %+v", sup.Reply)
	}
	dsnDelivered(id2, "Unknown@dest.test")
	if n := peer.count("unknown@dest.test"); n != 1 {
		t.Errorf("the suppressed address was attempted %d times, want 1 (only the first message)", n)
	}

	peer.mu.Lock()
	dsns := append([][]byte(nil), peer.dsns...)
	peer.mu.Unlock()
	if len(dsns) != 2 {
		t.Fatalf("%d DSNs delivered, want 2", len(dsns))
	}
	v1 := dsnPythonParse(t, dsns[0])
	if rs := v1.Parts[1].Recipients; len(rs) != 1 || rs[0]["Final-Recipient"] != "rfc822; unknown@dest.test" || rs[0]["Status"] != "5.1.1" ||
		rs[0]["Diagnostic-Code"] != "smtp; 550 5.1.1 No such user here" || rs[0]["Action"] != "failed" {
		t.Errorf("first DSN recipients = %v", rs)
	}
	v2 := dsnPythonParse(t, dsns[1])
	rs := v2.Parts[1].Recipients
	if len(rs) != 1 || rs[0]["Final-Recipient"] != "rfc822; Unknown@dest.test" || rs[0]["Status"] != "5.1.1" ||
		!strings.HasPrefix(rs[0]["Diagnostic-Code"], "X-Baton; 550 5.1.1 Recipient suppressed") {
		t.Errorf("second DSN recipients = %v", rs)
	}
	// The suppression was not renewed by the second message.
	if s, _, _ := sups.Lookup(ctx, "unknown@dest.test"); s == nil || s.ID != "" && s.ID != id1 || strings.Contains(s.Reply.Text, "suppressed") {
		t.Errorf("suppression after the second message = %+v", s)
	}
}
