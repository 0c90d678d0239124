// Package e2e holds end-to-end tests of the whole pipeline: a real SMTP
// client submits over STARTTLS with AUTH to relay.Server, the Relay queues
// and delivers through MX records served by an in-process DNS server to
// go-smtp destinations on 127.0.0.1.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/internal/dnstest"
	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// harness is a relay with its submission server, DNS and destinations.
type harness struct {
	t      *testing.T
	dns    *dnstest.Server
	relay  *relay.Relay
	server *relay.Server
	addr   string // submission listener
	ca     *testcert.CA
	q      queue.Queue

	mu     sync.Mutex
	ports  map[string]int // MX host name → port on 127.0.0.1
	events []relay.Event
}

type harnessConfig struct {
	signer relay.Signer
	queue  queue.Queue
	limits relay.Limits
	dests  map[string]relay.Limits
}

func newHarness(t *testing.T, hc harnessConfig) *harness {
	t.Helper()
	h := &harness{t: t, dns: dnstest.Start(t), ports: map[string]int{}, ca: testcert.NewCA()}
	logger := slog.New(slog.DiscardHandler)
	if testing.Verbose() {
		logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	dns, err := mx.NewDNS(mx.DNSConfig{Servers: []string{h.dns.Addr()}, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// Destinations all listen on 127.0.0.1, each on its own port: the
	// resolver's answer is real DNS, and only the port comes from the map.
	resolver := mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
		rt, err := dns.Resolve(ctx, domain)
		if err != nil {
			return nil, err
		}
		h.mu.Lock()
		defer h.mu.Unlock()
		for i := range rt.Hosts {
			p, ok := h.ports[rt.Hosts[i].Name]
			if !ok {
				p = closedPort(t)
			}
			rt.Hosts[i].Port = p
		}
		return rt, nil
	})
	h.q = hc.queue
	if h.q == nil {
		h.q = queue.NewMemory(queue.MemoryConfig{Schedule: queue.Schedule{Min: 100 * time.Millisecond, Max: 300 * time.Millisecond, Jitter: -1}})
	}
	h.relay, err = relay.New(relay.Config{
		Hostname:      "relay.test",
		Queue:         h.q,
		Resolver:      resolver,
		Signer:        hc.signer,
		Logger:        logger,
		RouteCacheTTL: -1,
		Limits:        hc.limits,
		Destinations:  hc.dests,
		Deliverer: relay.NewSMTPDeliverer(relay.SMTPDelivererConfig{
			Hostname: "relay.test", Logger: logger,
			Timeouts: relay.Timeouts{Connect: 2 * time.Second},
		}),
		Observer: relay.ObserverFunc(func(ctx context.Context, e relay.Event) {
			h.mu.Lock()
			h.events = append(h.events, e)
			h.mu.Unlock()
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	h.server, err = relay.NewServer(relay.ServerConfig{
		Hostname:  "relay.test",
		Submitter: h.relay,
		Authenticator: auth.AuthenticatorFunc(func(ctx context.Context, user, pass string) (*auth.Identity, error) {
			if user == "app" && pass == "s3cret" {
				return &auth.Identity{Name: "app"}, nil
			}
			return nil, auth.ErrInvalidCredentials
		}),
		TLSConfig: h.ca.ServerConfig("relay.test"),
		Logger:    logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = l.Addr().String()
	go h.server.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		h.server.Shutdown(ctx)
		h.relay.Shutdown(ctx)
		h.q.Close()
	})
	return h
}

// mx publishes MX records for domain pointing at the named sinks (in
// preference order) and A records for the sinks.
func (h *harness) mx(domain string, hosts ...*sink) {
	for i, s := range hosts {
		h.dns.Add(fmt.Sprintf("%s. 300 IN MX %d %s.", domain, 10*(i+1), s.name))
		h.host(s)
	}
}

// host publishes an A record for the sink and maps its name to its port.
func (h *harness) host(s *sink) {
	h.dns.Add(fmt.Sprintf("%s. 300 IN A 127.0.0.1", s.name))
	h.mu.Lock()
	h.ports[s.name] = s.port
	h.mu.Unlock()
}

// submit sends one message over STARTTLS with AUTH PLAIN, as an
// application would.
func (h *harness) submit(from string, to []string, body string) error {
	h.t.Helper()
	c, err := smtp.DialStartTLS(h.addr, h.ca.ClientConfig("relay.test"))
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", "app", "s3cret")); err != nil {
		return err
	}
	if err := c.SendMail(from, to, strings.NewReader(body)); err != nil {
		return err
	}
	return c.Quit()
}

func (h *harness) eventsFor(kind relay.EventKind, rcpt string) []relay.Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []relay.Event
	for _, e := range h.events {
		if e.Kind == kind && (rcpt == "" || e.Rcpt == rcpt) {
			out = append(out, e)
		}
	}
	return out
}

// waitEvent waits for an event of kind for rcpt.
func (h *harness) waitEvent(kind relay.EventKind, rcpt string) relay.Event {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if ev := h.eventsFor(kind, rcpt); len(ev) > 0 {
			return ev[0]
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.t.Fatalf("no %v event for %s", kind, rcpt)
	return relay.Event{}
}

// waitEmpty waits until the queue holds no message.
func (h *harness) waitEmpty() {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		n := 0
		h.q.List(context.Background(), queue.Filter{}, func(*queue.Message) error { n++; return nil })
		if n == 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.t.Fatal("queue did not drain")
}

const testBody = "From: App <app@sender.test>\r\nTo: rcpt@dest.test\r\nSubject: hello\r\n\r\nHello from the pipeline.\r\nSecond line, 8-bit: caf\xc3\xa9.\r\n"

func TestPipeline_SubmitOverSTARTTLSWithAuth_DeliveredViaMX(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "mx1.dest.test")
	h.mx("dest.test", dest)

	if err := h.submit("app@sender.test", []string{"rcpt@dest.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	got := dest.wait(1, 10*time.Second)[0]
	if got.From != "app@sender.test" || len(got.To) != 1 || got.To[0] != "rcpt@dest.test" {
		t.Fatalf("envelope at destination = %q → %q", got.From, got.To)
	}
	if !bytes.Contains(got.Body, []byte("Hello from the pipeline.\r\nSecond line, 8-bit: caf\xc3\xa9.\r\n")) {
		t.Fatalf("body not delivered intact:\n%s", got.Body)
	}
	if headerValue(got.Body, "Subject") != "hello" {
		t.Fatalf("Subject lost:\n%s", got.Body)
	}
	h.waitEmpty()
	if ev := h.waitEvent(relay.EventDelivered, "rcpt@dest.test"); ev.Reply.Code != 250 {
		t.Fatalf("delivered event reply = %+v", ev.Reply)
	}
}

func TestPipeline_TemporaryFailure_RetriedAndDeliveredOnce(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "mx1.dest.test")
	dest.dataReply = func(n int) *smtp.SMTPError {
		if n == 1 {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "try later"}
		}
		return nil
	}
	h.mx("dest.test", dest)
	if err := h.submit("app@sender.test", []string{"rcpt@dest.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	dest.wait(1, 10*time.Second)
	h.waitEmpty()
	time.Sleep(300 * time.Millisecond) // room for a wrongful second delivery
	if n := len(dest.messages()); n != 1 {
		t.Fatalf("destination got %d copies, want 1", n)
	}
	if ev := h.eventsFor(relay.EventDeferred, "rcpt@dest.test"); len(ev) != 1 || ev[0].Reply.Code != 451 {
		t.Fatalf("deferred events = %+v", ev)
	}
	if ev := h.waitEvent(relay.EventDelivered, "rcpt@dest.test"); ev.Attempts != 2 {
		t.Fatalf("delivered after %d attempts, want 2", ev.Attempts)
	}
}

func TestPipeline_OneRecipientRejected_OtherDelivered_SenderBounced(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "mx1.dest.test")
	dest.rcptReply = func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "nobody@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
		}
		return nil
	}
	senderMX := startSink(t, "mx.sender.test")
	h.mx("dest.test", dest)
	h.mx("sender.test", senderMX)

	if err := h.submit("app@sender.test", []string{"rcpt@dest.test", "nobody@dest.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	got := dest.wait(1, 10*time.Second)[0]
	if len(got.To) != 1 || got.To[0] != "rcpt@dest.test" {
		t.Fatalf("delivered to %q, want only rcpt@dest.test", got.To)
	}
	fail := h.waitEvent(relay.EventFailed, "nobody@dest.test")
	if fail.Reply.Code != 550 || fail.Reply.Enhanced != "5.1.1" {
		t.Fatalf("failed event reply = %+v", fail.Reply)
	}
	// The sender gets a DSN naming the failed recipient only.
	dsn := senderMX.wait(1, 10*time.Second)[0]
	if dsn.From != "" || dsn.To[0] != "app@sender.test" {
		t.Fatalf("DSN envelope %q → %q", dsn.From, dsn.To)
	}
	if !bytes.Contains(dsn.Body, []byte("Final-Recipient: rfc822;nobody@dest.test")) &&
		!bytes.Contains(dsn.Body, []byte("Final-Recipient: rfc822; nobody@dest.test")) {
		t.Fatalf("DSN does not name the failed recipient:\n%s", dsn.Body)
	}
	if bytes.Contains(dsn.Body, []byte("rfc822;rcpt@dest.test")) || bytes.Contains(dsn.Body, []byte("rfc822; rcpt@dest.test")) {
		t.Fatalf("DSN names the delivered recipient:\n%s", dsn.Body)
	}
	h.waitEmpty()
}

func TestPipeline_NoMX_ImplicitMXToARecord(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "implicit.test")
	h.host(dest) // an A record for the domain itself, no MX
	if err := h.submit("app@sender.test", []string{"rcpt@implicit.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	if got := dest.wait(1, 10*time.Second)[0]; got.To[0] != "rcpt@implicit.test" {
		t.Fatalf("delivered to %q", got.To)
	}
}

func TestPipeline_NullMX_FailsPermanently(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	senderMX := startSink(t, "mx.sender.test")
	h.mx("sender.test", senderMX)
	h.dns.Add("nomail.test. 300 IN MX 0 .")
	if err := h.submit("app@sender.test", []string{"rcpt@nomail.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	ev := h.waitEvent(relay.EventFailed, "rcpt@nomail.test")
	if ev.Reply.Code/100 != 5 || ev.Reply.Enhanced != "5.1.10" {
		t.Fatalf("null MX reply = %+v, want 556 5.1.10", ev.Reply)
	}
	if ev.Attempts != 1 {
		t.Fatalf("null MX tried %d times, want 1", ev.Attempts)
	}
	senderMX.wait(1, 10*time.Second)
	h.waitEmpty()
}

func TestPipeline_FirstMXDown_SecondDelivers(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	down := &sink{name: "mx1.dest.test"} // published, nothing listening
	h.dns.Add("mx1.dest.test. 300 IN A 127.0.0.1")
	h.mu.Lock()
	h.ports[down.name] = closedPort(t)
	h.mu.Unlock()
	h.dns.Add("dest.test. 300 IN MX 10 mx1.dest.test.")
	up := startSink(t, "mx2.dest.test")
	h.dns.Add("dest.test. 300 IN MX 20 mx2.dest.test.")
	h.host(up)
	if err := h.submit("app@sender.test", []string{"rcpt@dest.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	up.wait(1, 10*time.Second)
	if ev := h.waitEvent(relay.EventDelivered, "rcpt@dest.test"); !strings.HasPrefix(ev.Host, "mx2.dest.test") || ev.Attempts != 1 {
		t.Fatalf("delivered event = host %q after %d attempts, want mx2.dest.test after 1", ev.Host, ev.Attempts)
	}
}

func TestPipeline_GoAPISubmit_Delivered(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "mx1.dest.test")
	h.mx("dest.test", dest)
	id, err := h.relay.Submit(context.Background(), &queue.Envelope{From: "app@sender.test", To: []queue.Recipient{{Addr: "rcpt@dest.test"}}}, strings.NewReader(testBody))
	if err != nil || id == "" {
		t.Fatalf("Submit = %q, %v", id, err)
	}
	got := dest.wait(1, 10*time.Second)[0]
	if !bytes.HasSuffix(got.Body, []byte(testBody[strings.Index(testBody, "\r\n\r\n"):])) {
		t.Fatalf("body changed:\n%q", got.Body)
	}
}

// TestPipeline_ZeroConfig shows promise 5: New with a zero Config works.
func TestPipeline_ZeroConfig_StartsAndStops(t *testing.T) {
	r, err := relay.New(relay.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := r.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}
