package prommetrics

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/internal/mxtest"
	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// sink is a go-smtp server on loopback standing for every destination:
// it refuses temp@ with 451 4.2.0 and bad@ with 550 5.1.1 at RCPT and
// accepts everyone else.
type sink struct {
	mu   sync.Mutex
	rcpt []string
}

func (s *sink) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{s: s}, nil }

type sinkSession struct {
	s  *sink
	to []string
}

func (ss *sinkSession) Reset()                               { ss.to = nil }
func (ss *sinkSession) Logout() error                        { return nil }
func (ss *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss *sinkSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	ss.s.mu.Lock()
	ss.s.rcpt = append(ss.s.rcpt, ss.to...)
	ss.s.mu.Unlock()
	return nil
}
func (ss *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	switch {
	case strings.HasPrefix(to, "temp@"):
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "Mailbox busy"}
	case strings.HasPrefix(to, "bad@"):
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
	}
	ss.to = append(ss.to, to)
	return nil
}

func startSink(t *testing.T) (*sink, int) {
	s := &sink{}
	srv := smtp.NewServer(s)
	srv.Domain = "sink.test"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s, ln.Addr().(*net.TCPAddr).Port
}

// client speaks SMTP line by line and tallies the reply codes it reads.
type client struct {
	t      *testing.T
	c      net.Conn
	r      *bufio.Reader
	tally  map[int]int
	tallyM *sync.Mutex
}

func dial(t *testing.T, addr string, tally map[int]int, mu *sync.Mutex) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute)) // a guard against a hung test
	cl := &client{t: t, c: c, r: bufio.NewReader(c), tally: tally, tallyM: mu}
	cl.want(220)
	return cl
}

func (cl *client) want(code int) {
	cl.t.Helper()
	var got int
	for {
		line, err := cl.r.ReadString('\n')
		if err != nil || len(line) < 4 {
			cl.t.Fatalf("reply: %q %v", line, err)
		}
		got, _ = strconv.Atoi(line[:3])
		if line[3] == ' ' {
			break
		}
	}
	cl.tallyM.Lock()
	cl.tally[got]++
	cl.tallyM.Unlock()
	if got != code {
		cl.t.Fatalf("got %d, want %d", got, code)
	}
}

func (cl *client) cmd(line string, code int) {
	cl.t.Helper()
	if _, err := io.WriteString(cl.c, line+"\r\n"); err != nil {
		cl.t.Fatal(err)
	}
	cl.want(code)
}

func (cl *client) startTLS(cfg *tls.Config) {
	cl.t.Helper()
	cl.cmd("STARTTLS", 220)
	tc := tls.Client(cl.c, cfg)
	if err := tc.Handshake(); err != nil {
		cl.t.Fatal(err)
	}
	cl.c, cl.r = tc, bufio.NewReader(tc)
}

func plain(user, pass string) string {
	return base64.StdEncoding.EncodeToString([]byte("\x00" + user + "\x00" + pass))
}

// TestMetrics_ScrapedAfterKnownDeliveries runs a real relay (memory
// queue, SMTP deliverer) behind a real SMTP server, submits a known
// sequence of messages over SMTP (with STARTTLS, a failed AUTH and a
// rate-limited MAIL) and one in-process, lets a loopback go-smtp sink
// accept, defer and refuse recipients, then scrapes /metrics over HTTP
// and checks every counter against the sequence.
func TestMetrics_ScrapedAfterKnownDeliveries(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, port := startSink(t)

	q := queue.NewMemory(queue.MemoryConfig{}) // retries after 5 minutes: none during the test
	defer q.Close()
	met := New(Config{Queue: q, NoRuntime: true})
	counts := &relay.EventCounter{}
	r, err := relay.New(relay.Config{
		Hostname: "relay.test",
		Queue:    q,
		Observer: counts,
		Metrics:  met,
		Streams:  map[string]relay.StreamConfig{"news": {}},
		Resolver: mxtest.Loopback(port),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	ca := testcert.NewCA()
	srv, err := relay.NewServer(relay.ServerConfig{
		Hostname:  "relay.test",
		Submitter: r,
		Metrics:   met,
		TLSConfig: ca.ServerConfig("relay.test"),
		Authenticator: auth.AuthenticatorFunc(func(ctx context.Context, user, pass string) (*auth.Identity, error) {
			if user == "alice" && pass == "secret" {
				return &auth.Identity{Name: "alice"}, nil
			}
			return nil, auth.ErrInvalidCredentials
		}),
		Policy: policy.Chain{relay.DefaultServerPolicy(),
			policy.NewRateLimit(&policy.RateLimitConfig{PerIP: policy.Rate{Messages: 2, Per: time.Hour}})},
	})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()

	tally := map[int]int{}
	var mu sync.Mutex
	tlsCfg := ca.ClientConfig("relay.test")
	send := func(cl *client, from string, to ...string) {
		t.Helper()
		cl.cmd("MAIL FROM:<"+from+">", 250)
		for _, rc := range to {
			cl.cmd("RCPT TO:<"+rc+">", 250)
		}
		cl.cmd("DATA", 354)
		cl.cmd("From: <"+from+">\r\nSubject: metrics\r\n\r\nhello\r\n.", 250)
	}
	// Session 1: a wrong password, then a message to four recipients at
	// a.test (two delivered, one deferred, one failed and bounced to
	// s.test).
	c1 := dial(t, ln.Addr().String(), tally, &mu)
	c1.cmd("EHLO client.test", 250)
	c1.startTLS(tlsCfg)
	c1.cmd("EHLO client.test", 250)
	c1.cmd("AUTH PLAIN "+plain("alice", "wrong"), 535)
	c1.cmd("AUTH PLAIN "+plain("alice", "secret"), 235)
	send(c1, "sender@s.test", "ok1@a.test", "ok2@a.test", "temp@a.test", "bad@a.test")
	c1.cmd("QUIT", 221)
	// Session 2: one message to b.test, then a third MAIL over the rate
	// limit.
	c2 := dial(t, ln.Addr().String(), tally, &mu)
	c2.cmd("EHLO client.test", 250)
	c2.startTLS(tlsCfg)
	c2.cmd("EHLO client.test", 250)
	c2.cmd("AUTH PLAIN "+plain("alice", "secret"), 235)
	send(c2, "sender@s.test", "ok3@b.test")
	c2.cmd("MAIL FROM:<sender@s.test>", 450)
	c2.cmd("QUIT", 221)
	// In-process: one message on the "news" stream to b.test.
	if _, err := r.Submit(ctx, &queue.Envelope{From: "sender@s.test", Stream: "news", To: []queue.Recipient{{Addr: "ok4@b.test"}}},
		strings.NewReader("Subject: news\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}

	// Wait for the outcomes: ok1, ok2, ok3, ok4 and the bounce delivered,
	// temp deferred, bad failed.
	for counts.Count(relay.EventDelivered) < 5 || counts.Count(relay.EventDeferred) < 1 || counts.Count(relay.EventFailed) < 1 {
		select {
		case <-ctx.Done():
			t.Fatalf("deliveries did not finish: delivered %d deferred %d failed %d", counts.Count(relay.EventDelivered),
				counts.Count(relay.EventDeferred), counts.Count(relay.EventFailed))
		case <-time.After(10 * time.Millisecond):
		}
	}

	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	fams := scrape(t, hs.URL)

	mu.Lock()
	wantReplies := map[string]float64{}
	for code, n := range tally {
		wantReplies[strconv.Itoa(code/100)+"xx"] += float64(n)
	}
	mu.Unlock()
	t.Logf("client read replies %v", tally)

	checks := []struct {
		name   string
		labels string
		want   float64
	}{
		{"baton_recipients_total", "event=accepted,stream=transactional", 5},
		{"baton_recipients_total", "event=accepted,stream=news", 1},
		{"baton_recipients_total", "dest=mx:a.test,event=delivered,stream=transactional", 2},
		{"baton_recipients_total", "dest=mx:a.test,event=deferred,stream=transactional", 1},
		{"baton_recipients_total", "dest=mx:a.test,event=failed,stream=transactional", 1},
		{"baton_recipients_total", "event=dsn_sent,stream=transactional", 1},
		{"baton_recipients_total", "dest=mx:b.test,event=delivered,stream=transactional", 1},
		{"baton_recipients_total", "dest=mx:b.test,event=delivered,stream=news", 1},
		{"baton_recipients_total", "dest=mx:s.test,event=delivered,stream=transactional", 1}, // the bounce
		{"baton_delivery_duration_seconds", "dest=mx:a.test", 1},                             // sample count
		{"baton_delivery_duration_seconds", "dest=mx:b.test", 2},
		{"baton_delivery_duration_seconds", "dest=mx:s.test", 1},
		{"baton_delivery_replies_total", "class=2xx", 5},
		{"baton_delivery_replies_total", "class=4xx", 1},
		{"baton_delivery_replies_total", "class=5xx", 1},
		{"baton_delivery_tls_total", "tls=none", 4},
		{"baton_delivery_tls_total", "tls=encrypted", 0},
		{"baton_smtp_connections_total", "", 2},
		{"baton_smtp_tls_total", "version=TLS 1.3", 2},
		{"baton_smtp_auth_failures_total", "mechanism=PLAIN", 1},
		{"baton_smtp_refusals_total", "reason=rate_limit,stage=mail", 1},
		{"baton_smtp_replies_total", "class=2xx", wantReplies["2xx"]},
		{"baton_smtp_replies_total", "class=3xx", wantReplies["3xx"]},
		{"baton_smtp_replies_total", "class=4xx", wantReplies["4xx"]},
		{"baton_smtp_replies_total", "class=5xx", wantReplies["5xx"]},
		{"baton_queue_messages", "state=deferred", 1}, // the message waiting to retry temp@
		{"baton_queue_messages", "state=queued", 0},
		{"baton_queue_messages", "state=leased", 0},
		{"baton_queue_messages", "state=held", 0},
		{"baton_queue_stream_messages", "stream=transactional", 1},
		{"baton_queue_stats_errors_total", "", 0},
	}
	for _, c := range checks {
		got, ok := value(fams, c.name, c.labels)
		if !ok || got != c.want {
			t.Errorf("%s{%s} = %v (found %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	// Every recipient series is one of the above: nothing counted twice.
	var total float64
	for _, m := range fams["baton_recipients_total"].GetMetric() {
		total += m.GetCounter().GetValue()
	}
	if total != 14 {
		t.Errorf("baton_recipients_total sums to %v, want 14", total)
	}
	if wantReplies["2xx"] == 0 || wantReplies["4xx"] != 1 || wantReplies["5xx"] != 1 {
		t.Errorf("the sessions did not go as scripted: %v", wantReplies)
	}
	if age, _ := value(fams, "baton_queue_oldest_age_seconds", "state=deferred"); age <= 0 {
		t.Errorf("oldest deferred age = %v, want > 0", age)
	}
	if age, ok := value(fams, "baton_queue_oldest_age_seconds", "state=queued"); !ok || age != 0 {
		t.Errorf("oldest queued age = %v %v, want 0 for an empty state", age, ok)
	}
}

// scrape GETs url and parses the text format.
func scrape(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// value finds the series of family name whose labels are exactly labels
// ("k=v,k=v" in name order; "" for none) and returns its value: a
// counter's or gauge's value, or a histogram's sample count.
func value(fams map[string]*dto.MetricFamily, name, labels string) (float64, bool) {
	for _, m := range fams[name].GetMetric() {
		var ls []string
		for _, l := range m.GetLabel() {
			if l.GetValue() != "" {
				ls = append(ls, l.GetName()+"="+l.GetValue())
			}
		}
		sort.Strings(ls)
		if strings.Join(ls, ",") != labels {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func TestMetrics_DestinationAndStreamLabelsCapped(t *testing.T) {
	met := New(Config{MaxDestinations: 2, MaxStreams: 1, NoRuntime: true})
	ctx := context.Background()
	for i, d := range []string{"mx:a.test", "mx:b.test", "mx:c.test", "mx:d.test", "mx:a.test"} {
		stream := "s" + strconv.Itoa(i%2)
		met.Observe(ctx, relay.Event{Kind: relay.EventDelivered, Stream: stream, Dest: d})
		met.DeliveryAttempt(d, time.Millisecond, &relay.DeliveryResult{})
	}
	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	fams := scrape(t, hs.URL)
	for labels, want := range map[string]float64{
		"dest=mx:a.test,event=delivered,stream=s0":    2,
		"dest=mx:b.test,event=delivered,stream=other": 1,
		"dest=other,event=delivered,stream=s0":        1,
		"dest=other,event=delivered,stream=other":     1,
	} {
		if got, ok := value(fams, "baton_recipients_total", labels); !ok || got != want {
			t.Errorf("baton_recipients_total{%s} = %v %v, want %v", labels, got, ok, want)
		}
	}
	if n := len(fams["baton_recipients_total"].GetMetric()); n != 4 {
		t.Errorf("%d recipient series, want 4", n)
	}
	for labels, want := range map[string]float64{"dest=mx:a.test": 2, "dest=mx:b.test": 1, "dest=other": 2} {
		if got, ok := value(fams, "baton_delivery_duration_seconds", labels); !ok || got != want {
			t.Errorf("baton_delivery_duration_seconds{%s} count = %v %v, want %v", labels, got, ok, want)
		}
	}
	// Attempts where no server answered count no reply and no TLS.
	if got, _ := value(fams, "baton_delivery_tls_total", "tls=none"); got != 0 {
		t.Errorf("tls=none = %v for attempts no server answered", got)
	}
}

// failingQueue is a queue whose Stats fails.
type failingQueue struct{ queue.Queue }

func (failingQueue) Stats(ctx context.Context) (*queue.Stats, error) {
	return nil, errors.New("stats unavailable")
}

func TestMetrics_QueueStatsFailureCountedNotFatal(t *testing.T) {
	met := New(Config{Queue: failingQueue{}, NoRuntime: true})
	met.ServerReply(250)
	met.ServerReply(554)
	met.ServerReply(0) // never a real reply; must not panic
	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	scrape(t, hs.URL)
	fams := scrape(t, hs.URL)
	if got, _ := value(fams, "baton_queue_stats_errors_total", ""); got != 2 {
		t.Errorf("stats errors = %v, want 2 after two scrapes", got)
	}
	if _, ok := fams["baton_queue_messages"]; ok {
		t.Error("queue gauges served although Stats failed")
	}
	for labels, want := range map[string]float64{"class=2xx": 1, "class=5xx": 1, "class=other": 1} {
		if got, _ := value(fams, "baton_smtp_replies_total", labels); got != want {
			t.Errorf("replies{%s} = %v, want %v", labels, got, want)
		}
	}
}

// slowQueue is a queue whose Stats waits for its context.
type slowQueue struct{ queue.Queue }

func (slowQueue) Stats(ctx context.Context) (*queue.Stats, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func TestMetrics_QueueStatsTimeoutBoundsScrape(t *testing.T) {
	met := New(Config{Queue: slowQueue{}, StatsTimeout: 50 * time.Millisecond, NoRuntime: true})
	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	start := time.Now()
	fams := scrape(t, hs.URL)
	t.Logf("scrape with a hung queue took %v", time.Since(start))
	if got, _ := value(fams, "baton_queue_stats_errors_total", ""); got != 1 {
		t.Errorf("stats errors = %v, want 1", got)
	}
}

func TestMetrics_HandlerIsOneHandler(t *testing.T) {
	met := New(Config{})
	if fmt.Sprintf("%p", met.Handler()) != fmt.Sprintf("%p", met.Handler()) {
		t.Error("Handler returned two handlers")
	}
	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	if fams := scrape(t, hs.URL); fams["go_goroutines"] == nil {
		t.Error("runtime metrics missing by default")
	}
}

func TestMetrics_AuthMechanismLabelBounded(t *testing.T) {
	met := New(Config{NoRuntime: true})
	met.AuthFailure("PLAIN")
	met.AuthFailure("XOAUTH-" + strings.Repeat("x", 100))
	hs := httptest.NewServer(met.Handler())
	defer hs.Close()
	fams := scrape(t, hs.URL)
	if got, _ := value(fams, "baton_smtp_auth_failures_total", "mechanism=other"); got != 1 {
		t.Errorf("unknown mechanism counted as %v under other", got)
	}
}

// stuckQueue is a queue whose Stats ignores its context, as a backend
// that walks a large store under a lock may, until release is closed.
type stuckQueue struct {
	queue.Queue
	n       atomic.Int32 // Stats calls
	release chan struct{}
}

func (q *stuckQueue) Stats(ctx context.Context) (*queue.Stats, error) {
	q.n.Add(1)
	<-q.release
	return &queue.Stats{ByState: map[queue.State]int{queue.StateQueued: 3}}, nil
}

// scrapeDirect serves one scrape through the handler, failing the test
// if it has not returned after a minute (a hung scrape).
func scrapeDirect(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	}()
	select {
	case <-done:
	case <-time.After(time.Minute):
		t.Fatal("scrape still hanging after a minute")
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// TestMetrics_QueueStatsIgnoringContextDoesNotHangScrapes: a Stats call
// that ignores its context must not hold the scrape past StatsTimeout,
// and scrapes meanwhile must not pile up Stats calls behind it.
func TestMetrics_QueueStatsIgnoringContextDoesNotHangScrapes(t *testing.T) {
	q := &stuckQueue{release: make(chan struct{})}
	met := New(Config{Queue: q, StatsTimeout: 20 * time.Millisecond, NoRuntime: true})
	for i := 1; i <= 3; i++ {
		fams := scrapeDirect(t, met.Handler())
		if got, _ := value(fams, "baton_queue_stats_errors_total", ""); got != float64(i) {
			t.Errorf("scrape %d: stats errors = %v, want %d", i, got, i)
		}
		if _, ok := fams["baton_queue_messages"]; ok {
			t.Errorf("scrape %d: queue gauges served although Stats has not answered", i)
		}
	}
	if n := q.n.Load(); n != 1 {
		t.Errorf("%d Stats calls while the first one hangs, want 1", n)
	}
	close(q.release)
	// Once the stuck call returns, a later scrape gets the gauges again.
	for i := 0; ; i++ {
		fams := scrapeDirect(t, met.Handler())
		if got, ok := value(fams, "baton_queue_messages", "state=queued"); ok {
			if got != 3 {
				t.Errorf("queued = %v, want 3", got)
			}
			t.Logf("gauges back after %d more scrapes; %d Stats calls in all", i+1, q.n.Load())
			break
		}
		if i == 1000 {
			t.Fatal("queue gauges never came back after Stats answered")
		}
	}
}

// TestMetrics_HotPathDoesNotAllocate: the methods the relay and the server
// call per reply, per event and per attempt allocate nothing once their
// label values have been seen.
func TestMetrics_HotPathDoesNotAllocate(t *testing.T) {
	m := New(Config{NoRuntime: true})
	ctx := context.Background()
	e := relay.Event{Kind: relay.EventDelivered, Stream: "transactional", Dest: "mx:example.com"}
	res := &relay.DeliveryResult{Host: "mx.example.com", Replies: []queue.Reply{{Code: 250}, {Code: 550}}}
	for name, f := range map[string]func(){
		"Observe":          func() { m.Observe(ctx, e) },
		"DeliveryAttempt":  func() { m.DeliveryAttempt(e.Dest, time.Millisecond, res) },
		"ServerReply":      func() { m.ServerReply(250) },
		"ServerConnection": func() { m.ServerConnection() },
		"Refused":          func() { m.Refused(relay.StageRcpt, relay.RefusedRateLimit) },
	} {
		f() // the first call creates the series
		// AllocsPerRun counts every goroutine's allocations: over 1000
		// runs, stray background ones average out below 1.
		if n := testing.AllocsPerRun(1000, f); n >= 1 {
			t.Errorf("%s: %v allocations per call", name, n)
		}
	}
}
