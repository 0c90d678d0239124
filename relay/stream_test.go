package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// streamSink is a go-smtp destination on 127.0.0.1 that takes delay per
// message. It counts messages and concurrent deliveries per class (the
// recipient's local part up to '-', and its domain: "bulk@dest.test") and
// keeps the body each recipient got.
type streamSink struct {
	delay time.Duration
	addr  netip.AddrPort
	srv   *smtp.Server

	mu        sync.Mutex
	delivered map[string]int
	inflight  map[string]int
	maxIn     map[string]int
	bodies    map[string][]byte
	arrived   map[string]chan struct{}
	changed   chan struct{}
}

func newStreamSink(t *testing.T, delay time.Duration) *streamSink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &streamSink{delay: delay, addr: ln.Addr().(*net.TCPAddr).AddrPort(),
		delivered: map[string]int{}, inflight: map[string]int{}, maxIn: map[string]int{},
		bodies: map[string][]byte{}, arrived: map[string]chan struct{}{}, changed: make(chan struct{})}
	s.srv = smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return &streamSinkSession{s: s}, nil }))
	s.srv.Domain = "sink.dest.test"
	s.srv.ErrorLog = sdNopLogger{}
	go s.srv.Serve(ln)
	t.Cleanup(func() { s.srv.Close() })
	return s
}

// sinkClass is the class of a recipient address.
func sinkClass(rcpt string) string {
	local, dom, _ := strings.Cut(rcpt, "@")
	prefix, _, _ := strings.Cut(local, "-")
	return prefix + "@" + dom
}

// route returns a route for domain to the sink.
func (s *streamSink) resolver() mx.Resolver {
	return mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
		return &mx.Route{Domain: domain, Key: "mx:" + domain, TLS: mx.TLSNone,
			Hosts: []mx.Host{{Name: "sink." + domain, Port: int(s.addr.Port()), Addrs: []netip.Addr{s.addr.Addr()}}}}, nil
	})
}

// wait returns a channel closed once a message for rcpt has arrived.
func (s *streamSink) wait(rcpt string) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	ch := s.arrived[rcpt]
	if ch == nil {
		ch = make(chan struct{})
		s.arrived[rcpt] = ch
	}
	return ch
}

// count returns the messages delivered for class.
func (s *streamSink) count(class string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.delivered[class]
}

// maxConcurrent returns the most deliveries of class in progress at once.
func (s *streamSink) maxConcurrent(class string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxIn[class]
}

// body returns what rcpt got.
func (s *streamSink) body(rcpt string) []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bodies[rcpt]
}

// waitCount waits until class has at least n messages.
func (s *streamSink) waitCount(t *testing.T, ctx context.Context, class string, n int) {
	t.Helper()
	for {
		s.mu.Lock()
		got, ch := s.delivered[class], s.changed
		s.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatalf("%s: %d messages delivered, waited for %d: %v", class, got, n, ctx.Err())
		}
	}
}

type streamSinkSession struct {
	s     *streamSink
	rcpts []string
}

func (ss *streamSinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss *streamSinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.rcpts = append(ss.rcpts, to)
	return nil
}
func (ss *streamSinkSession) Reset()        { ss.rcpts = nil }
func (ss *streamSinkSession) Logout() error { return nil }

func (ss *streamSinkSession) Data(r io.Reader) error {
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s := ss.s
	class := sinkClass(ss.rcpts[0])
	s.mu.Lock()
	s.inflight[class]++
	s.maxIn[class] = max(s.maxIn[class], s.inflight[class])
	s.mu.Unlock()
	time.Sleep(s.delay)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inflight[class]--
	for _, rc := range ss.rcpts {
		s.delivered[sinkClass(rc)]++
		s.bodies[rc] = body
		if ch := s.arrived[rc]; ch != nil && ch != closedChan {
			close(ch)
		}
		s.arrived[rc] = closedChan
	}
	close(s.changed)
	s.changed = make(chan struct{})
	return nil
}

var closedChan = func() chan struct{} { c := make(chan struct{}); close(c); return c }()

// streamTestQueue returns a queue.Dir when it can lease by stream (it is
// being taught to), else a queue.Memory. The caller closes it.
func streamTestQueue(t *testing.T) (queue.Queue, string) {
	t.Helper()
	d, err := queue.OpenDir(queue.DirConfig{Path: t.TempDir(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := any(d).(queue.StreamLeaser); ok {
		return d, "Dir"
	}
	d.Close()
	return queue.NewMemory(queue.MemoryConfig{}), "Memory"
}

// newStreamRelay starts a relay delivering to sink over SMTP.
func newStreamRelay(t *testing.T, cfg Config, sink *streamSink) *Relay {
	t.Helper()
	d := NewSMTPDeliverer(SMTPDelivererConfig{Hostname: "relay.example.test"})
	cfg.Hostname = "relay.example.test"
	cfg.Resolver = sink.resolver()
	cfg.Deliverer = d
	if cfg.Logger == nil {
		// Warnings only: a line per delivery would flood the test log.
		w := &stLogWriter{t: t}
		t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
		cfg.Logger = slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		r.Shutdown(ctx)
		d.Close()
	})
	return r
}

const streamBody = "From: sender@example.test\r\nSubject: hello\r\n\r\nhello\r\n"

func streamEnv(stream string, to ...string) *queue.Envelope {
	env := &queue.Envelope{From: "sender@example.test", Stream: stream}
	for _, a := range to {
		env.To = append(env.To, queue.Recipient{Addr: a})
	}
	return env
}

// A backlog of 10,000 bulk messages, all to the destination the
// transactional message goes to, does not hold the transactional message
// back: it is delivered while most of the backlog is still queued.
func TestStreams_TransactionalOvertakesBulkBacklog(t *testing.T) {
	const backlog = 10000
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute) // a guard, not a threshold
	defer cancel()
	sink := newStreamSink(t, 30*time.Millisecond)
	q, kind := streamTestQueue(t)
	t.Cleanup(func() { q.Close() }) // after the relay's own cleanup, which shuts it down
	t.Logf("queue: %s", kind)
	for i := range backlog {
		if _, err := q.Enqueue(ctx, streamEnv(StreamBulk, fmt.Sprintf("bulk-%d@dest.test", i)), strings.NewReader(streamBody)); err != nil {
			t.Fatal(err)
		}
	}
	r := newStreamRelay(t, Config{Queue: q, Workers: 20}, sink)
	sink.waitCount(t, ctx, "bulk@dest.test", 100)

	arrived := sink.wait("tx-1@dest.test")
	start := time.Now()
	if _, err := r.Submit(ctx, streamEnv("", "tx-1@dest.test"), strings.NewReader(streamBody)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-arrived:
	case <-ctx.Done():
		t.Fatalf("transactional message not delivered; %d bulk messages were", sink.count("bulk@dest.test"))
	}
	delay := time.Since(start)
	bulk := sink.count("bulk@dest.test")
	t.Logf("transactional message delivered %v after Submit, with %d of %d bulk messages delivered (queue %s)", delay, bulk, backlog, kind)
	if bulk >= backlog/2 {
		t.Errorf("transactional message delivered only after %d of %d bulk messages", bulk, backlog)
	}
	if got, cap := sink.maxConcurrent("bulk@dest.test"), 10; got > cap {
		t.Errorf("bulk reached %d concurrent deliveries, want at most %d (half of Workers)", got, cap)
	}
}

// The stream header chooses the stream and never reaches the destination;
// every other header field arrives byte for byte.
func TestStreams_HeaderChoosesStreamAndIsRemoved(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sink := newStreamSink(t, 0)
	events := newEventLog()
	r := newStreamRelay(t, Config{Observer: events}, sink)
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Submitter = r
		c.AddrAuthenticator = stLoopbackAllowList(t)
	})
	head := "From: sender@example.test\r\nX-Baton-Stream:  Bulk \r\nSubject: folded\r\n  subject\r\nx-baton-stream: transactional\r\n"
	rc := stDial(t, ts.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<sender@example.test>", 250, "")
	rc.expect("RCPT TO:<h-1@dest.test>", 250, "")
	rc.expect("DATA", 354, "")
	rc.send(head + "\r\nbody line\r\n.\r\n")
	if code, text := rc.reply(); code != 250 {
		t.Fatalf("DATA: %d %s", code, text)
	}
	select {
	case <-sink.wait("h-1@dest.test"):
	case <-ctx.Done():
		t.Fatal("message not delivered")
	}
	ev := events.wait(ctx, t, "delivered", func(e Event) bool { return e.Kind == EventDelivered && e.Rcpt == "h-1@dest.test" })
	if ev.Stream != StreamBulk {
		t.Errorf("delivered in stream %q, want bulk", ev.Stream)
	}
	got := sink.body("h-1@dest.test")
	if bytes.Contains(bytes.ToLower(got), []byte("x-baton-stream")) {
		t.Errorf("the stream header reached the destination:\n%s", got)
	}
	want := "From: sender@example.test\r\nSubject: folded\r\n  subject\r\n"
	if !bytes.Contains(got, []byte(want)) || !bytes.HasSuffix(got, []byte("\r\n\r\nbody line\r\n")) {
		t.Errorf("destination got:\n%q\nwant it to contain %q and end with the body", got, want)
	}
}

// An identity's stream wins over the header, which is removed all the same.
func TestStreams_IdentityPinsStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sink := newStreamSink(t, 0)
	events := newEventLog()
	r := newStreamRelay(t, Config{Observer: events}, sink)
	allow, err := auth.NewAllowList([]auth.AllowEntry{{Identity: auth.Identity{Name: "newsletters", Stream: StreamBulk}, Networks: []string{"127.0.0.1/32"}}})
	if err != nil {
		t.Fatal(err)
	}
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Submitter = r
		c.AddrAuthenticator = allow
	})
	for i, head := range []string{"X-Baton-Stream: transactional\r\n", "X-Baton-Stream: nosuch\r\n", ""} {
		rcpt := fmt.Sprintf("p-%d@dest.test", i)
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("MAIL FROM:<sender@example.test>", 250, "")
		rc.expect("RCPT TO:<"+rcpt+">", 250, "")
		rc.expect("DATA", 354, "")
		rc.send("From: sender@example.test\r\n" + head + "Subject: hi\r\n\r\nhi\r\n.\r\n")
		if code, text := rc.reply(); code != 250 {
			t.Fatalf("header %q: DATA: %d %s", head, code, text)
		}
		ev := events.wait(ctx, t, "delivered", func(e Event) bool { return e.Kind == EventDelivered && e.Rcpt == rcpt })
		if ev.Stream != StreamBulk {
			t.Errorf("header %q: delivered in stream %q, want the identity's bulk", head, ev.Stream)
		}
		if b := sink.body(rcpt); bytes.Contains(b, []byte("X-Baton-Stream")) {
			t.Errorf("header %q reached the destination:\n%s", head, b)
		}
	}
}

// A header naming a stream the relay does not deliver is refused with
// 554 5.6.0 and nothing is queued; an identity pinned to such a stream is
// a configuration error, answered 451 4.3.5 at MAIL.
func TestStreams_UnknownStreamRefusedOverSMTP(t *testing.T) {
	sink := newStreamSink(t, 0)
	q := queue.NewMemory(queue.MemoryConfig{})
	t.Cleanup(func() { q.Close() }) // after the relay's own cleanup, which shuts it down
	r := newStreamRelay(t, Config{Queue: q}, sink)
	ts := startTestServer(t, func(c *ServerConfig) {
		c.Submitter = r
		c.AddrAuthenticator = stLoopbackAllowList(t)
		c.StreamHeader = "X-Stream"
	})
	for _, v := range []string{"nosuch", "Bad Name!", ""} {
		rc := stDial(t, ts.addr)
		rc.expect("EHLO client.test", 250, "")
		rc.expect("MAIL FROM:<sender@example.test>", 250, "")
		rc.expect("RCPT TO:<u@dest.test>", 250, "")
		rc.expect("DATA", 354, "")
		rc.send("From: sender@example.test\r\nX-Stream: " + v + "\r\n\r\nhi\r\n.\r\n")
		if code, text := rc.reply(); code != 554 || !strings.HasPrefix(text, "5.6.0 ") {
			t.Errorf("stream %q: got %d %s, want 554 5.6.0", v, code, text)
		}
	}
	if st, err := q.Stats(context.Background()); err != nil || st.ByState[queue.StateQueued]+st.ByState[queue.StateLeased] != 0 {
		t.Errorf("queue after refusals: %+v, %v", st, err)
	}

	pinned, err := auth.NewAllowList([]auth.AllowEntry{{Identity: auth.Identity{Name: "old", Stream: "gone"}, Networks: []string{"127.0.0.1/32"}}})
	if err != nil {
		t.Fatal(err)
	}
	ts2 := startTestServer(t, func(c *ServerConfig) {
		c.Submitter = r
		c.AddrAuthenticator = pinned
	})
	rc := stDial(t, ts2.addr)
	rc.expect("EHLO client.test", 250, "")
	rc.expect("MAIL FROM:<sender@example.test>", 451, "4.3.5")

	// Go callers get the same refusal from Submit.
	_, err = r.Submit(context.Background(), streamEnv("nosuch", "u@dest.test"), strings.NewReader(streamBody))
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 554 || se.EnhancedCode != (smtp.EnhancedCode{5, 6, 0}) {
		t.Errorf("Submit to an unknown stream: %v, want 554 5.6.0", err)
	}
}

// A stream's worker cap and its per-destination limits hold at the
// destination, and do not limit the other streams.
func TestStreams_PerStreamLimitsObserved(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	sink := newStreamSink(t, 50*time.Millisecond)
	q := queue.NewMemory(queue.MemoryConfig{})
	t.Cleanup(func() { q.Close() }) // after the relay's own cleanup, which shuts it down
	const n = 40
	for i := range n {
		for _, to := range []string{"bulk-%d@a.test", "bulk-%d@b.test", "tx-%d@b.test"} {
			stream := StreamBulk
			if strings.HasPrefix(to, "tx") {
				stream = ""
			}
			if _, err := q.Enqueue(ctx, streamEnv(stream, fmt.Sprintf(to, i)), strings.NewReader(streamBody)); err != nil {
				t.Fatal(err)
			}
		}
	}
	newStreamRelay(t, Config{Queue: q, Workers: 40, Streams: map[string]StreamConfig{
		StreamBulk: {Workers: 6, Destinations: map[string]Limits{"b.test": {MaxConcurrent: 2}}},
	}}, sink)
	for _, c := range []string{"bulk@a.test", "bulk@b.test", "tx@b.test"} {
		sink.waitCount(t, ctx, c, n)
	}
	a, b, tx := sink.maxConcurrent("bulk@a.test"), sink.maxConcurrent("bulk@b.test"), sink.maxConcurrent("tx@b.test")
	t.Logf("most concurrent deliveries: bulk to a.test %d, bulk to b.test %d, transactional to b.test %d", a, b, tx)
	if a > 6 {
		t.Errorf("bulk ran %d deliveries to a.test at once, want at most its 6 workers", a)
	}
	if b > 2 {
		t.Errorf("bulk ran %d deliveries to b.test at once, want at most 2", b)
	}
	if tx <= 2 {
		// Not a timing threshold: 40 transactional messages with 40
		// workers and 20 slots at b.test never ran more than two at
		// once, so bulk's limit applied to them.
		t.Errorf("transactional reached only %d concurrent deliveries to b.test; bulk's limit leaked into it", tx)
	}
}

// Messages of a stream the configuration does not name (left from an
// earlier one) are still delivered, though Submit refuses new ones.
func TestStreams_UnknownStreamInQueueDelivered(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sink := newStreamSink(t, 0)
	q := queue.NewMemory(queue.MemoryConfig{})
	t.Cleanup(func() { q.Close() }) // after the relay's own cleanup, which shuts it down
	if _, err := q.Enqueue(ctx, streamEnv("legacy", "old-1@dest.test"), strings.NewReader(streamBody)); err != nil {
		t.Fatal(err)
	}
	r := newStreamRelay(t, Config{Queue: q}, sink)
	select {
	case <-sink.wait("old-1@dest.test"):
	case <-ctx.Done():
		t.Fatal("message of an unconfigured stream not delivered")
	}
	if r.HasStream("legacy") {
		t.Error("HasStream(legacy) = true for a stream only found in the queue")
	}
	if !r.HasStream("") || !r.HasStream(StreamTransactional) || !r.HasStream(StreamBulk) {
		t.Error("the built-in streams are missing")
	}
}

// hideStreams hides a queue's StreamLeaser.
type hideStreams struct{ queue.Queue }

// Without StreamLeaser one lease loop serves every stream.
func TestStreams_SharedLoopWithoutStreamLeaser(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sink := newStreamSink(t, 0)
	q := queue.NewMemory(queue.MemoryConfig{})
	t.Cleanup(func() { q.Close() }) // after the relay's own cleanup, which shuts it down
	for _, e := range []*queue.Envelope{streamEnv(StreamBulk, "s-1@dest.test"), streamEnv("", "s-2@dest.test"), streamEnv("legacy", "s-3@dest.test")} {
		if _, err := q.Enqueue(ctx, e, strings.NewReader(streamBody)); err != nil {
			t.Fatal(err)
		}
	}
	newStreamRelay(t, Config{Queue: hideStreams{q}}, sink)
	for _, rc := range []string{"s-1@dest.test", "s-2@dest.test", "s-3@dest.test"} {
		select {
		case <-sink.wait(rc):
		case <-ctx.Done():
			t.Fatalf("%s not delivered", rc)
		}
	}
}

// Other streams never take the transactional reserve, however many of
// them there are.
func TestWorkerPool_Reserve(t *testing.T) {
	p := newWorkerPool(4)
	tx := p.add(1)
	bulk, other := p.add(0), p.add(0)
	ctx := context.Background()
	for range 2 {
		if err := p.acquire(ctx, bulk); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.acquire(ctx, other); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithCancel(ctx)
	cancel()
	if err := p.acquire(short, other); err == nil {
		t.Fatal("a fourth worker went to another stream: the transactional reserve is gone")
	}
	if err := p.acquire(short, tx); err != nil {
		t.Fatalf("transactional could not use its reserve: %v", err)
	}
	// Once transactional uses its reserve and one other worker frees,
	// that worker may go to any stream.
	p.release(bulk)
	if err := p.acquire(short, other); err != nil {
		t.Fatalf("a free worker outside the reserve was refused: %v", err)
	}
	p.release(tx)
	if err := p.acquire(short, bulk); err == nil {
		t.Fatal("bulk took the transactional reserve once it was free again")
	}
}

func TestStreams_ConfigChecked(t *testing.T) {
	for name, cfg := range map[string]Config{
		"bad name":     {Streams: map[string]StreamConfig{"Bulk Mail": {}}},
		"over reserve": {Workers: 4, Streams: map[string]StreamConfig{"a": {Reserved: 2}, StreamTransactional: {Reserved: 2}}},
		"nothing left": {Workers: 1, Streams: map[string]StreamConfig{StreamTransactional: {Reserved: 1}}},
	} {
		cfg.Resolver = mx.ResolverFunc(func(context.Context, string) (*mx.Route, error) { return nil, errors.New("unused") })
		if r, err := New(cfg); err == nil {
			r.Shutdown(context.Background())
			t.Errorf("%s: New accepted the config", name)
		}
	}
}

// Bulk deliveries holding every connection the pool allows to a
// destination do not keep a transactional delivery from it.
func TestSMTPDeliver_StreamsHaveTheirOwnConnections(t *testing.T) {
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(m *sdMsg) error {
		if strings.HasPrefix(m.To[0], "bulk") {
			entered <- struct{}{}
			<-release
		}
		return nil
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{MaxConnsPerDest: 1})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	bulkEnv := sdEnv("bulk-1@example.test")
	bulkEnv.Stream = StreamBulk
	done := make(chan *DeliveryResult)
	go func() { done <- d.Deliver(t.Context(), sdDelivery(route, bulkEnv, []byte(sdBody))) }()
	<-entered // bulk holds the destination's only connection
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("tx-1@example.test"), []byte(sdBody))), 250)
	close(release)
	wantCodes(t, <-done, 250)
}

func TestStreams_Defaults(t *testing.T) {
	for _, c := range []struct {
		name                            string
		workers                         int
		wantWorkers, wantRes, wantLease int
	}{
		{StreamTransactional, 100, 100, 25, 400},
		{StreamBulk, 100, 50, 0, 200},
		{"other", 100, 50, 0, 200},
		{StreamTransactional, 1, 1, 0, 4}, // a lone worker is never reserved
		{StreamBulk, 1, 1, 0, 4},
	} {
		got := streamDefaults(c.name, StreamConfig{}, c.workers, 4*c.workers)
		if got.Workers != c.wantWorkers || got.Reserved != c.wantRes || got.MaxInFlight != c.wantLease {
			t.Errorf("%s with %d workers: %+v", c.name, c.workers, got)
		}
	}
}
