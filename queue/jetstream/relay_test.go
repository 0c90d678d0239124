package jetstream_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
	"github.com/batonmail/baton/relay"
)

// sink is a destination MX on 127.0.0.1 that counts the messages it
// accepts by their Message-ID.
type sink struct {
	port int
	mu   sync.Mutex
	got  map[string]int
	n    int
	more chan struct{} // closed and replaced on every accepted message
}

func startSink(t *testing.T) *sink {
	t.Helper()
	s := &sink{got: map[string]int{}, more: make(chan struct{})}
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &sinkSession{s: s}, nil }))
	srv.Domain = "sink.test"
	srv.ReadTimeout = 10 * time.Second
	srv.WriteTimeout = 10 * time.Second
	srv.ErrorLog = log.New(io.Discard, "", 0)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.port = l.Addr().(*net.TCPAddr).Port
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return s
}

// waitFor waits until the sink has accepted n messages in all, or fails
// the test after limit (a bound against hanging, not a measurement).
func (s *sink) waitFor(t *testing.T, n int, limit time.Duration) map[string]int {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		total, more := s.n, s.more
		got := make(map[string]int, len(s.got))
		for k, v := range s.got {
			got[k] = v
		}
		s.mu.Unlock()
		if total >= n {
			return got
		}
		select {
		case <-more:
		case <-deadline.C:
			t.Fatalf("sink accepted %d messages, want %d", total, n)
		}
	}
}

type sinkSession struct{ s *sink }

func (ss *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (ss *sinkSession) Reset()                               {}
func (ss *sinkSession) Logout() error                        { return nil }
func (ss *sinkSession) Data(r io.Reader) error {
	id := ""
	br := bufio.NewReader(r)
	for {
		line, err := br.ReadString('\n')
		if k, v, ok := strings.Cut(strings.TrimRight(line, "\r\n"), ":"); ok && strings.EqualFold(k, "Message-ID") {
			id = strings.TrimSpace(v)
		}
		if err != nil {
			break
		}
	}
	ss.s.mu.Lock()
	ss.s.got[id]++
	ss.s.n++
	close(ss.s.more)
	ss.s.more = make(chan struct{})
	ss.s.mu.Unlock()
	return nil
}

// route sends every domain to the sink.
func (s *sink) route() mx.Resolver {
	return mx.ResolverFunc(func(_ context.Context, domain string) (*mx.Route, error) {
		return &mx.Route{Domain: domain, Key: "route:sink", TLS: mx.TLSNone,
			Hosts: []mx.Host{{Name: "sink.test", Port: s.port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}}, nil
	})
}

// countingDeliverer counts the deliveries one node makes.
type countingDeliverer struct {
	n    atomic.Int64
	next relay.Deliverer
}

func (c *countingDeliverer) Deliver(ctx context.Context, d *relay.Delivery) *relay.DeliveryResult {
	c.n.Add(1)
	return c.next.Deliver(ctx, d)
}

func newRelay(t *testing.T, cfg relay.Config) *relay.Relay {
	t.Helper()
	r, err := relay.New(cfg)
	if err != nil {
		t.Fatalf("relay.New: %v", err)
	}
	return r
}

// shutdown stops a relay, abandoning deliveries still running after a
// few seconds (a failed test must not hang on them).
func shutdown(r *relay.Relay) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.Shutdown(ctx)
}

func submit(t *testing.T, r *relay.Relay, i int) {
	t.Helper()
	env := &queue.Envelope{From: "sender@example.test", To: []queue.Recipient{{Addr: fmt.Sprintf("rcpt%d@dest.test", i)}}}
	body := fmt.Sprintf("Message-ID: <%d@example.test>\r\nSubject: message %d\r\n\r\nbody %d\r\n", i, i, i)
	if _, err := r.Submit(context.Background(), env, strings.NewReader(body)); err != nil {
		t.Fatalf("Submit %d: %v", i, err)
	}
}

// waitEmpty waits until the queue has no messages left (every lease
// settled), failing the test after limit.
func waitEmpty(t *testing.T, q queue.Queue, limit time.Duration) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		n := 0
		if err := q.List(context.Background(), queue.Filter{}, func(*queue.Message) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue still holds %d messages", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func checkOnce(t *testing.T, got map[string]int, n int) {
	t.Helper()
	for i := range n {
		id := fmt.Sprintf("<%d@example.test>", i)
		if got[id] != 1 {
			t.Errorf("message %s arrived %d times, want once", id, got[id])
		}
	}
	if len(got) != n {
		t.Errorf("sink saw %d distinct messages, want %d", len(got), n)
	}
}

// TestRelays_SharedQueue_EachMessageDeliveredOnce runs two relays, each
// with its own NATS connection to one queue, and submits to both.
func TestRelays_SharedQueue_EachMessageDeliveredOnce(t *testing.T) {
	url := startNATS(t)
	sk := startSink(t)
	prefix := uniquePrefix()
	var counts [2]*countingDeliverer
	var relays [2]*relay.Relay
	for i, node := range []string{"node-a", "node-b"} {
		q := openQueue(t, url, jetstream.Config{Prefix: prefix, Node: node})
		d := relay.NewSMTPDeliverer(relay.SMTPDelivererConfig{Hostname: node + ".test"})
		t.Cleanup(func() { d.Close() })
		counts[i] = &countingDeliverer{next: d}
		relays[i] = newRelay(t, relay.Config{Hostname: node + ".test", Queue: q, Resolver: sk.route(), Deliverer: counts[i]})
	}
	defer func() {
		for _, r := range relays {
			shutdown(r)
		}
	}()
	const n = 40
	for i := range n {
		submit(t, relays[i%2], i)
	}
	got := sk.waitFor(t, n, 30*time.Second)
	waitEmpty(t, relays[0].Queue(), 10*time.Second)
	got = sk.waitFor(t, n, time.Second) // anything delivered while settling
	checkOnce(t, got, n)
	a, b := counts[0].n.Load(), counts[1].n.Load()
	if a+b != n {
		t.Errorf("nodes made %d + %d deliveries, want %d in all", a, b, n)
	}
	t.Logf("node-a delivered %d, node-b %d", a, b)
}

// TestRelays_DeadNode_LeasesTakenOverAfterExpiry: one relay leases every
// message and its deliverer never returns (the node is as good as dead);
// a second relay delivers the messages once the leases expire.
func TestRelays_DeadNode_LeasesTakenOverAfterExpiry(t *testing.T) {
	url := startNATS(t)
	sk := startSink(t)
	prefix := uniquePrefix()
	const n = 5
	const leaseTime = 2 * time.Second // the relay keeps 1s of it for settling

	stuck := make(chan struct{})    // closed when the test ends
	entered := make(chan string, n) // one per delivery the dead node starts
	dead := relay.DelivererFunc(func(ctx context.Context, d *relay.Delivery) *relay.DeliveryResult {
		entered <- string(d.ID)
		<-stuck // ignores ctx: hung, not merely slow
		res := &relay.DeliveryResult{}
		for range d.Rcpts {
			res.Replies = append(res.Replies, queue.Reply{Code: 451, Enhanced: "4.4.2", Text: "hung"})
		}
		return res
	})
	qa := openQueue(t, url, jetstream.Config{Prefix: prefix, Node: "node-a"})
	ra := newRelay(t, relay.Config{Hostname: "node-a.test", Queue: qa, Resolver: sk.route(), Deliverer: dead,
		LeaseTime: leaseTime, Workers: n, MaxInFlight: n})
	defer func() {
		close(stuck)
		shutdown(ra)
	}()
	for i := range n {
		submit(t, ra, i)
	}
	held := map[string]bool{}
	for len(held) < n {
		select {
		case id := <-entered:
			held[id] = true
		case <-time.After(30 * time.Second):
			t.Fatalf("dead node started %d deliveries, want %d", len(held), n)
		}
	}

	qb := openQueue(t, url, jetstream.Config{Prefix: prefix, Node: "node-b"})
	st, err := qb.Stats(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// All n are there, leased by a (unless the leases already ran out on
	// a slow machine: the test does not depend on when b starts).
	if st.ByState[queue.StateLeased]+st.ByState[queue.StateQueued] != n {
		t.Fatalf("node b sees %v, want %d messages", st.ByState, n)
	}
	d := relay.NewSMTPDeliverer(relay.SMTPDelivererConfig{Hostname: "node-b.test"})
	defer d.Close()
	cb := &countingDeliverer{next: d}
	rb := newRelay(t, relay.Config{Hostname: "node-b.test", Queue: qb, Resolver: sk.route(), Deliverer: cb, LeaseTime: time.Minute})
	defer shutdown(rb)

	got := sk.waitFor(t, n, 30*time.Second)
	waitEmpty(t, qb, 10*time.Second)
	checkOnce(t, got, n)
	if c := cb.n.Load(); c != n {
		t.Errorf("node b made %d deliveries, want %d", c, n)
	}
	if len(entered) != 0 {
		t.Errorf("dead node leased %d messages again", len(entered))
	}
}
