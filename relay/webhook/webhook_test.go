package webhook

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/mxtest"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

const testSecret = "s3cret-for-tests"

// post is one request the receiver got.
type post struct {
	batch   Batch
	attempt string
	status  int
}

// receiver is an httptest webhook endpoint that verifies every request's
// signature and answers as its script says.
type receiver struct {
	t      *testing.T
	srv    *httptest.Server
	secret string

	mu    sync.Mutex
	posts []post
	wake  chan struct{}
	// script answers request n (from 1): status, extra headers. Nil
	// means 200.
	script func(n int, w http.ResponseWriter) int
	// maxBody, if positive, is the largest body accepted: longer ones
	// are answered 413 before the script is asked.
	maxBody int
}

func newReceiver(t *testing.T, script func(n int, w http.ResponseWriter) int) *receiver {
	rv := &receiver{t: t, secret: testSecret, wake: make(chan struct{}), script: script}
	rv.srv = httptest.NewServer(http.HandlerFunc(rv.serve))
	t.Cleanup(rv.srv.Close)
	return rv
}

func (rv *receiver) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		rv.t.Errorf("receiver: read body: %v", err)
		return
	}
	if err := Verify(rv.secret, r.Header.Get(SignatureHeader), body, 5*time.Minute); err != nil {
		rv.t.Errorf("receiver: %v (header %q)", err, r.Header.Get(SignatureHeader))
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		rv.t.Errorf("receiver: Content-Type %q", ct)
	}
	var b Batch
	if err := json.Unmarshal(body, &b); err != nil {
		rv.t.Errorf("receiver: %v", err)
	}
	if r.Header.Get("Baton-Batch-Id") != b.BatchID {
		rv.t.Errorf("receiver: Baton-Batch-Id %q, body batch_id %q", r.Header.Get("Baton-Batch-Id"), b.BatchID)
	}
	rv.mu.Lock()
	n := len(rv.posts) + 1
	script, maxBody := rv.script, rv.maxBody
	rv.mu.Unlock()
	status := http.StatusOK
	if maxBody > 0 && len(body) > maxBody {
		status = http.StatusRequestEntityTooLarge
	} else if script != nil {
		status = script(n, w) // may block; outside the lock
	}
	// Recorded before the answer, so that what the sender counts as sent
	// is always here.
	rv.mu.Lock()
	rv.posts = append(rv.posts, post{batch: b, attempt: r.Header.Get("Baton-Attempt"), status: status})
	close(rv.wake)
	rv.wake = make(chan struct{})
	rv.mu.Unlock()
	w.WriteHeader(status)
}

// accepted returns the events of the batches answered with 2xx, in the
// order they were accepted.
func (rv *receiver) accepted() []Event {
	rv.mu.Lock()
	defer rv.mu.Unlock()
	var evs []Event
	for _, p := range rv.posts {
		if p.status/100 == 2 {
			evs = append(evs, p.batch.Events...)
		}
	}
	return evs
}

func (rv *receiver) requests() []post {
	rv.mu.Lock()
	defer rv.mu.Unlock()
	return append([]post(nil), rv.posts...)
}

// waitFor waits until ok holds for the requests received so far.
func (rv *receiver) waitFor(ctx context.Context, what string, ok func([]post) bool) {
	rv.t.Helper()
	for {
		rv.mu.Lock()
		done, wake := ok(rv.posts), rv.wake
		rv.mu.Unlock()
		if done {
			return
		}
		select {
		case <-wake:
		case <-ctx.Done():
			rv.t.Fatalf("waiting for %s: %v (%d requests)", what, ctx.Err(), len(rv.requests()))
		}
	}
}

func acceptedAtLeast(n int) func([]post) bool {
	return func(ps []post) bool {
		c := 0
		for _, p := range ps {
			if p.status/100 == 2 {
				c += len(p.batch.Events)
			}
		}
		return c >= n
	}
}

// waitStats polls s until ok holds: the counters change on the sender's
// goroutine with nothing to wait on.
func waitStats(ctx context.Context, t *testing.T, s *Sender, what string, ok func(Stats) bool) Stats {
	t.Helper()
	for {
		st := s.Stats()
		if ok(st) {
			return st
		}
		select {
		case <-time.After(time.Millisecond):
		case <-ctx.Done():
			t.Fatalf("waiting for %s: %v; stats %+v", what, ctx.Err(), st)
		}
	}
}

func testEvent(i int) relay.Event {
	return relay.Event{Kind: relay.EventDelivered, Time: time.Unix(1700000000, 0).UTC(), ID: queue.ID(fmt.Sprintf("q%04d", i)),
		From: "app@example.test", Rcpt: "user@example.test", Reply: queue.Reply{Code: 250, Enhanced: "2.0.0", Text: "OK"}}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// observe hands s the test events from..to-1.
func observe(ctx context.Context, s *Sender, from, to int) {
	for i := from; i < to; i++ {
		s.Observe(ctx, testEvent(i))
	}
}

// hangUntil is a receiver script that holds every request until release
// is closed (or ctx is done), then accepts it.
func hangUntil(ctx context.Context, release <-chan struct{}) func(int, http.ResponseWriter) int {
	return func(int, http.ResponseWriter) int {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return http.StatusOK
	}
}

// failFirst is a receiver script that answers the first request with
// status and accepts the others.
func failFirst(status int) func(int, http.ResponseWriter) int {
	return func(n int, _ http.ResponseWriter) int {
		if n == 1 {
			return status
		}
		return http.StatusOK
	}
}

// closeGivesUp closes s with a context that ends after 20ms and checks
// that Close gives up with the context's error.
func closeGivesUp(ctx context.Context, t *testing.T, s *Sender) {
	t.Helper()
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if err := s.Close(cctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close = %v, want DeadlineExceeded", err)
	}
}

func newTestSender(t *testing.T, cfg Config) *Sender {
	t.Helper()
	if cfg.Secret == "" {
		cfg.Secret = testSecret
	}
	if cfg.MinBackoff == 0 {
		cfg.MinBackoff, cfg.MaxBackoff = time.Millisecond, 4*time.Millisecond
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s
}

// checkInOrder checks evs are exactly the test events from..to-1.
func checkInOrder(t *testing.T, evs []Event, from, to int) {
	t.Helper()
	if len(evs) != to-from {
		t.Fatalf("got %d events, want %d", len(evs), to-from)
	}
	for i, e := range evs {
		if want := fmt.Sprintf("q%04d", from+i); e.QueueID != want {
			t.Fatalf("event %d is %s, want %s", i, e.QueueID, want)
		}
	}
}

func TestVerify_SignatureAndTampering(t *testing.T) {
	body := []byte(`{"batch_id":"b1","events":[]}`)
	now := time.Now()
	h := Sign(now, body, "new", "old")
	if err := Verify("new", h, body, time.Minute); err != nil {
		t.Errorf("new secret: %v", err)
	}
	if err := Verify("old", h, body, time.Minute); err != nil {
		t.Errorf("old secret: %v", err)
	}
	if err := VerifyAny([]string{"other", "old"}, Sign(now, body, "old"), body, time.Minute); err != nil {
		t.Errorf("rotation on the receiving side: %v", err)
	}
	tampered := append([]byte(nil), body...)
	tampered[len(tampered)-2] = '1'
	for name, err := range map[string]error{
		"tampered body":    Verify("new", h, tampered, time.Minute),
		"wrong secret":     Verify("wrong", h, body, time.Minute),
		"empty secret":     Verify("", Sign(now, body, ""), body, time.Minute),
		"too old":          Verify("new", Sign(now.Add(-time.Hour), body, "new"), body, time.Minute),
		"from the future":  Verify("new", Sign(now.Add(time.Hour), body, "new"), body, time.Minute),
		"no header":        Verify("new", "", body, time.Minute),
		"no signature":     Verify("new", "t="+strconv.FormatInt(now.Unix(), 10), body, time.Minute),
		"timestamp change": Verify("new", "t=1"+h[2:], body, 0),
	} {
		if !errors.Is(err, ErrSignature) {
			t.Errorf("%s: err = %v, want ErrSignature", name, err)
		}
	}
	// Tolerance 0 skips the age check only.
	if err := Verify("new", Sign(now.Add(-time.Hour), body, "new"), body, 0); err != nil {
		t.Errorf("no tolerance: %v", err)
	}
}

// TestSender_SignedRequestTamperedFails checks a real POST verifies, and
// fails once its body is changed.
func TestSender_SignedRequestTamperedFails(t *testing.T) {
	ctx := testContext(t)
	got := make(chan struct {
		header string
		body   []byte
	}, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		select {
		case got <- struct {
			header string
			body   []byte
		}{r.Header.Get(SignatureHeader), b}:
		default:
		}
	}))
	defer srv.Close()
	s := newTestSender(t, Config{URL: srv.URL, FlushInterval: time.Millisecond, PreviousSecrets: []string{"old"}})
	s.Observe(ctx, testEvent(1))
	var r struct {
		header string
		body   []byte
	}
	select {
	case r = <-got:
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	if err := Verify(testSecret, r.header, r.body, time.Minute); err != nil {
		t.Fatalf("verify: %v", err)
	}
	if err := Verify("old", r.header, r.body, time.Minute); err != nil {
		t.Fatalf("verify with the previous secret: %v", err)
	}
	tampered := []byte(string(r.body[:len(r.body)-1]) + " }")
	if err := Verify(testSecret, r.header, tampered, time.Minute); !errors.Is(err, ErrSignature) {
		t.Fatalf("tampered body: err = %v", err)
	}
}

func TestSender_Batches(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 10, FlushInterval: time.Hour})
	observe(ctx, s, 0, 25)
	// Two full batches go at once; the partial one waits for the flush
	// interval (an hour) or Close.
	rv.waitFor(ctx, "two batches", acceptedAtLeast(20))
	if ps := rv.requests(); len(ps) != 2 || len(ps[0].batch.Events) != 10 || len(ps[1].batch.Events) != 10 {
		t.Fatalf("requests before Close: %d", len(ps))
	}
	waitStats(ctx, t, s, "two batches sent", func(st Stats) bool { return st.Sent == 20 && st.Pending == 5 })
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	ps := rv.requests()
	if len(ps) != 3 || len(ps[2].batch.Events) != 5 {
		t.Fatalf("%d requests after Close", len(ps))
	}
	checkInOrder(t, rv.accepted(), 0, 25)
	ids := map[string]bool{}
	for _, p := range ps {
		if ids[p.batch.BatchID] {
			t.Errorf("batch id %s repeated", p.batch.BatchID)
		}
		ids[p.batch.BatchID] = true
		for _, e := range p.batch.Events {
			if ids[e.ID] || e.ID == "" {
				t.Errorf("event id %q repeated", e.ID)
			}
			ids[e.ID] = true
		}
	}
	if st := s.Stats(); st.Sent != 25 || st.Batches != 3 || st.Dropped != 0 || st.Pending != 0 || st.Retries != 0 {
		t.Errorf("stats = %+v", st)
	}
	// After Close, events are dropped and counted.
	s.Observe(ctx, testEvent(99))
	if st := s.Stats(); st.Dropped != 1 || st.Pending != 0 {
		t.Errorf("stats after an event past Close = %+v", st)
	}
}

func TestSender_FlushIntervalSendsPartialBatch(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 100, FlushInterval: 5 * time.Millisecond})
	observe(ctx, s, 0, 3)
	rv.waitFor(ctx, "a partial batch", acceptedAtLeast(3))
	checkInOrder(t, rv.accepted(), 0, 3)
}

func TestSender_KindsFilter(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	s := newTestSender(t, Config{URL: rv.srv.URL, Kinds: []relay.EventKind{relay.EventFailed, relay.EventDelayWarning}})
	for _, k := range []relay.EventKind{relay.EventAccepted, relay.EventFailed, relay.EventDelivered, relay.EventDelayWarning, relay.EventDSNSent} {
		e := testEvent(int(k))
		e.Kind = k
		s.Observe(ctx, e)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	evs := rv.accepted()
	if len(evs) != 2 || evs[0].Kind != "failed" || evs[1].Kind != "delay_warning" {
		t.Fatalf("events = %+v", evs)
	}

	// The default leaves out delay warnings only.
	rv2 := newReceiver(t, nil)
	s2 := newTestSender(t, Config{URL: rv2.srv.URL})
	for k := relay.EventAccepted; k <= relay.EventDelayWarning; k++ {
		e := testEvent(int(k))
		e.Kind = k
		s2.Observe(ctx, e)
	}
	if err := s2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, e := range rv2.accepted() {
		kinds = append(kinds, e.Kind)
	}
	if fmt.Sprint(kinds) != "[accepted delivered deferred failed expired suppressed dsn_sent]" {
		t.Errorf("default kinds sent: %v", kinds)
	}
}

// TestSender_ReceiverRecoversWithinWindow: the receiver fails with 500s
// for a while, during which events keep coming; once it recovers every
// event arrives, once, in order.
func TestSender_ReceiverRecoversWithinWindow(t *testing.T) {
	ctx := testContext(t)
	const failures = 6
	rv := newReceiver(t, nil)
	rv.script = func(n int, w http.ResponseWriter) int {
		if n <= failures {
			return http.StatusInternalServerError
		}
		return http.StatusNoContent
	}
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 5, FlushInterval: time.Millisecond, RetryWindow: time.Hour})
	for i := range 20 {
		s.Observe(ctx, testEvent(i))
		if i == 2 {
			rv.waitFor(ctx, "the first failures", func(ps []post) bool { return len(ps) >= 2 })
		}
	}
	rv.waitFor(ctx, "every event", acceptedAtLeast(20))
	checkInOrder(t, rv.accepted(), 0, 20)

	ps := rv.requests()
	first := ps[0].batch.BatchID
	for i := range failures + 1 {
		if ps[i].batch.BatchID != first || ps[i].attempt != strconv.Itoa(i+1) {
			t.Errorf("request %d: batch %s attempt %s, want the first batch (%s) attempt %d", i+1, ps[i].batch.BatchID, ps[i].attempt, first, i+1)
		}
	}
	// At least once, seen from a receiver that had stored the failed
	// posts' events too: deduplicated by id, nothing is missing and
	// nothing is out of order.
	var all []Event
	for _, p := range ps {
		all = append(all, p.batch.Events...)
	}
	seen := map[string]bool{}
	var dedup []Event
	for _, e := range all {
		if !seen[e.ID] {
			seen[e.ID] = true
			dedup = append(dedup, e)
		}
	}
	checkInOrder(t, dedup, 0, 20)
	st := waitStats(ctx, t, s, "sent", func(st Stats) bool { return st.Sent == 20 })
	if st.Retries != failures || st.Dropped != 0 || st.Pending != 0 {
		t.Errorf("stats = %+v, want %d retries", st, failures)
	}
	t.Logf("%d requests, stats %+v", len(ps), st)
}

// TestSender_RetryAfterHonoured checks the wait after a 429 or 503 is the
// receiver's Retry-After, longer than the backoff, with a recording clock.
func TestSender_RetryAfterHonoured(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, func(n int, w http.ResponseWriter) int {
		switch n {
		case 1:
			w.Header().Set("Retry-After", "7")
			return http.StatusTooManyRequests
		case 2:
			w.Header().Set("Retry-After", time.Now().Add(time.Hour).UTC().Format(http.TimeFormat))
			return http.StatusServiceUnavailable
		case 3:
			w.Header().Set("Retry-After", "9") // ignored on a 500
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	var mu sync.Mutex
	var waits []time.Duration
	s, err := newSender(Config{URL: rv.srv.URL, Secret: testSecret, MinBackoff: time.Millisecond, MaxBackoff: time.Millisecond, RetryWindow: 24 * time.Hour},
		func(ctx context.Context, d time.Duration) error {
			mu.Lock()
			waits = append(waits, d)
			mu.Unlock()
			return nil
		})
	if err != nil {
		t.Fatal(err)
	}
	s.Observe(ctx, testEvent(1))
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 1, 2)
	mu.Lock()
	defer mu.Unlock()
	if len(waits) != 3 || waits[0] != 7*time.Second || waits[1] < 59*time.Minute || waits[1] > time.Hour || waits[2] > time.Millisecond {
		t.Errorf("waits = %v, want [7s ~1h <=1ms]", waits)
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for v, want := range map[string]time.Duration{
		"":                              0,
		"0":                             0,
		"-3":                            0,
		"120":                           2 * time.Minute,
		"99999999":                      24 * time.Hour,
		"soon":                          0,
		"Fri, 02 Jan 2026 03:05:05 GMT": time.Minute,
		"Fri, 02 Jan 2026 03:00:00 GMT": 0,
	} {
		if got := parseRetryAfter(v, now); got != want {
			t.Errorf("parseRetryAfter(%q) = %v, want %v", v, got, want)
		}
	}
}

// TestSender_PermanentRejection: a 4xx other than 408 and 429 drops the
// batch without retrying it; the next batch still goes.
func TestSender_PermanentRejection(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, failFirst(http.StatusBadRequest))
	s := newTestSender(t, Config{URL: rv.srv.URL, FlushInterval: time.Millisecond})
	s.Observe(ctx, testEvent(1))
	waitStats(ctx, t, s, "the drop", func(st Stats) bool { return st.Dropped == 1 })
	s.Observe(ctx, testEvent(2))
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 2, 3)
	if st := s.Stats(); st.Retries != 0 || st.Sent != 1 || st.Dropped != 1 || len(rv.requests()) != 2 {
		t.Errorf("stats = %+v, %d requests", st, len(rv.requests()))
	}
}

// TestSender_RetryWindowDrops: a batch still failing after RetryWindow is
// dropped and counted, and the Sender goes on with the next one.
func TestSender_RetryWindowDrops(t *testing.T) {
	ctx := testContext(t)
	var mu sync.Mutex
	failing := true
	rv := newReceiver(t, func(n int, w http.ResponseWriter) int {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return http.StatusBadGateway
		}
		return http.StatusOK
	})
	s := newTestSender(t, Config{URL: rv.srv.URL, FlushInterval: time.Millisecond, RetryWindow: 20 * time.Millisecond})
	observe(ctx, s, 0, 3)
	st := waitStats(ctx, t, s, "the drop", func(st Stats) bool { return st.Dropped == 3 })
	if st.Retries == 0 || st.Sent != 0 {
		t.Errorf("stats = %+v", st)
	}
	mu.Lock()
	failing = false
	mu.Unlock()
	s.Observe(ctx, testEvent(3))
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 3, 4)
	t.Logf("%d requests in the window; stats %+v", len(rv.requests()), s.Stats())
}

// TestSender_ObserveNeverBlocks: with the receiver hanging, Observe still
// returns at once; the buffer keeps the oldest MaxBuffered events and
// counts the rest as dropped; they go out once the receiver answers.
func TestSender_ObserveNeverBlocks(t *testing.T) {
	ctx := testContext(t)
	release := make(chan struct{})
	var once sync.Once
	unblock := func() { once.Do(func() { close(release) }) }
	defer unblock()
	rv := newReceiver(t, hangUntil(ctx, release))
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 5, MaxBuffered: 10, FlushInterval: time.Hour, Timeout: time.Hour})
	const n = 10000
	start := time.Now()
	observe(ctx, s, 0, n)
	t.Logf("%d Observe calls with the receiver hanging: %v", n, time.Since(start))
	if st := s.Stats(); st.Dropped != n-10 || st.Pending != 10 || st.Sent != 0 {
		t.Fatalf("stats = %+v, want %d dropped and 10 pending", st, n-10)
	}
	unblock()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 0, 10)
	if st := s.Stats(); st.Sent != 10 || st.Dropped != n-10 || st.Pending != 0 {
		t.Errorf("stats after Close = %+v", st)
	}
}

// TestSender_CloseGivesUpWithContext: Close waits no longer than its
// context, and counts what it abandons.
func TestSender_CloseGivesUpWithContext(t *testing.T) {
	ctx := testContext(t)
	release := make(chan struct{})
	defer close(release)
	rv := newReceiver(t, hangUntil(ctx, release))
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 2, FlushInterval: time.Hour, Timeout: time.Hour})
	observe(ctx, s, 0, 5)
	closeGivesUp(ctx, t, s)
	if st := s.Stats(); st.Dropped != 5 || st.Pending != 0 || st.Sent != 0 {
		t.Errorf("stats = %+v", st)
	}
}

func TestNew_Validates(t *testing.T) {
	for name, cfg := range map[string]Config{
		"no url":       {Secret: "x"},
		"ftp url":      {URL: "ftp://example.test/", Secret: "x"},
		"no host":      {URL: "http:///path", Secret: "x"},
		"no secret":    {URL: "http://example.test/"},
		"bad kind":     {URL: "http://example.test/", Secret: "x", Kinds: []relay.EventKind{0}},
		"kind too big": {URL: "http://example.test/", Secret: "x", Kinds: []relay.EventKind{64}},
	} {
		if s, err := New(cfg); err == nil {
			s.Close(context.Background())
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseKinds(t *testing.T) {
	kinds, err := ParseKinds([]string{"Delivered", " dsn_sent", "delay_warning"})
	if err != nil || fmt.Sprint(kinds) != "[delivered dsn_sent delay_warning]" {
		t.Errorf("ParseKinds = %v, %v", kinds, err)
	}
	all, err := ParseKinds([]string{"*"})
	if err != nil || len(all) != 8 {
		t.Errorf("ParseKinds(*) = %v, %v", all, err)
	}
	if _, err := ParseKinds([]string{"bounced"}); err == nil {
		t.Error("unknown kind accepted")
	}
}

// TestPayload_Schema pins the JSON field names, which receivers depend
// on.
func TestPayload_Schema(t *testing.T) {
	e := relay.Event{Kind: relay.EventFailed, Time: time.Date(2026, 11, 23, 17, 0, 0, 0, time.UTC), ID: "Q1", From: "app@example.com",
		Rcpt: "nobody@example.net", Host: "mx1.example.net", TLS: relay.TLSInfo{Version: 0x0304, Verified: true},
		Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user", Host: "mx1.example.net"}, Duration: 1500 * time.Millisecond,
		Attempts: 2, Identity: "billing", Size: 2048, Stream: "bulk", Dest: "mx:example.net"}
	b, err := json.Marshal(wireEvent("abc-1", &e))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"id":"abc-1","kind":"failed","time":"2026-11-23T17:00:00Z","queue_id":"Q1","stream":"bulk","from":"app@example.com",` +
		`"rcpt":"nobody@example.net","dest":"mx:example.net","host":"mx1.example.net","reply":{"code":550,"enhanced":"5.1.1","text":"No such user"},` +
		`"tls":{"version":"TLS 1.3","verified":true},"attempts":2,"identity":"billing","size":2048,"queued_for_ms":1500}`
	if string(b) != want {
		t.Errorf("event JSON\n got %s\nwant %s", b, want)
	}
	acc := relay.Event{Kind: relay.EventAccepted, Time: e.Time, ID: "Q2", Rcpt: "a@example.net", Duration: 3 * time.Millisecond, Size: 10}
	b, _ = json.Marshal(wireEvent("abc-2", &acc))
	want = `{"id":"abc-2","kind":"accepted","time":"2026-11-23T17:00:00Z","queue_id":"Q2","stream":"transactional","from":"",` +
		`"rcpt":"a@example.net","size":10,"submit_ms":3}`
	if string(b) != want {
		t.Errorf("accepted JSON\n got %s\nwant %s", b, want)
	}
}

// sink is a go-smtp server on loopback standing for every destination: it
// refuses unknown@dest.test with 550 5.1.1, defers later@dest.test once
// with 451 4.2.0, and accepts everything else.
type sink struct {
	mu       sync.Mutex
	deferred bool
}

type sinkSession struct{ s *sink }

func (s *sink) NewSession(*smtp.Conn) (smtp.Session, error) { return sinkSession{s}, nil }

func (sinkSession) Reset()                               {}
func (sinkSession) Logout() error                        { return nil }
func (sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (ss sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	switch strings.ToLower(to) {
	case "unknown@dest.test":
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user here"}
	case "later@dest.test":
		ss.s.mu.Lock()
		defer ss.s.mu.Unlock()
		if !ss.s.deferred {
			ss.s.deferred = true
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "Mailbox busy, try later"}
		}
	}
	return nil
}
func (sinkSession) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}

// TestSender_WithRelay runs a real relay (memory queue, SMTP delivery to
// a go-smtp server on 127.0.0.1) with a Sender as its observer, and checks
// the webhook receiver gets the delivery story of every recipient with the
// right fields.
func TestSender_WithRelay(t *testing.T) {
	ctx := testContext(t)
	srv := smtp.NewServer(&sink{})
	srv.Domain = "mx.dest.test"
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	rv := newReceiver(t, nil)
	hook := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 3, FlushInterval: 5 * time.Millisecond})
	r, err := relay.New(relay.Config{
		Hostname: "relay.example.test",
		Queue:    queue.NewMemory(queue.MemoryConfig{Schedule: queue.Schedule{Min: 10 * time.Millisecond, Max: 10 * time.Millisecond, Jitter: -1}}),
		Observer: hook,
		Resolver: mxtest.Loopback(port),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	ids := map[string]string{} // recipient -> queue ID
	for _, to := range [][]string{{"a@dest.test", "b@dest.test"}, {"unknown@dest.test"}, {"later@dest.test"}} {
		env := &queue.Envelope{From: "app@example.test", Identity: "billing"}
		for _, a := range to {
			env.To = append(env.To, queue.Recipient{Addr: a})
		}
		id, err := r.Submit(ctx, env, strings.NewReader("From: app@example.test\r\nSubject: hi\r\n\r\nhello\r\n"))
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range to {
			ids[a] = string(id)
		}
	}

	// find returns the events received so far of kind for rcpt.
	find := func(evs []Event, kind, rcpt string) []Event {
		var out []Event
		for _, e := range evs {
			if e.Kind == kind && e.Rcpt == rcpt {
				out = append(out, e)
			}
		}
		return out
	}
	// The story ends when the DSN about unknown@ is delivered to the
	// sender, and the others are delivered.
	var dsn Event
	rv.waitFor(ctx, "the whole story", func(ps []post) bool {
		var evs []Event
		for _, p := range ps {
			evs = append(evs, p.batch.Events...)
		}
		for _, a := range []string{"a@dest.test", "b@dest.test", "later@dest.test"} {
			if len(find(evs, "delivered", a)) == 0 {
				return false
			}
		}
		sent := find(evs, "dsn_sent", "unknown@dest.test")
		if len(sent) == 0 {
			return false
		}
		dsn = sent[0]
		for _, e := range find(evs, "delivered", "app@example.test") {
			if e.QueueID == dsn.DSNID {
				return true
			}
		}
		return false
	})
	evs := rv.accepted()
	seen := map[string]bool{}
	for _, e := range evs {
		if seen[e.ID] {
			t.Errorf("event %s received twice", e.ID)
		}
		seen[e.ID] = true
	}

	for _, a := range []string{"a@dest.test", "b@dest.test", "unknown@dest.test", "later@dest.test"} {
		acc := find(evs, "accepted", a)
		if len(acc) != 1 {
			t.Fatalf("%d accepted events for %s", len(acc), a)
		}
		if e := acc[0]; e.QueueID != ids[a] || e.From != "app@example.test" || e.Identity != "billing" || e.Size == 0 ||
			e.Stream != queue.DefaultStream || e.Reply != nil || e.Dest != "" {
			t.Errorf("accepted %s: %+v", a, e)
		}
	}
	for _, a := range []string{"a@dest.test", "b@dest.test", "later@dest.test"} {
		del := find(evs, "delivered", a)
		if len(del) != 1 {
			t.Fatalf("%d delivered events for %s", len(del), a)
		}
		e := del[0]
		if e.QueueID != ids[a] || e.Reply == nil || e.Reply.Code != 250 || !strings.HasPrefix(e.Host, "mx.dest.test") || e.Dest != "mx:dest.test" ||
			e.TLS != nil || e.Size == 0 || e.Identity != "billing" {
			t.Errorf("delivered %s: %+v reply %+v", a, e, e.Reply)
		}
		if want := 1 + len(find(evs, "deferred", a)); e.Attempts != want {
			t.Errorf("delivered %s: attempts %d, want %d", a, e.Attempts, want)
		}
	}
	def := find(evs, "deferred", "later@dest.test")
	if len(def) != 1 || def[0].Reply == nil || def[0].Reply.Code != 451 || def[0].Reply.Enhanced != "4.2.0" || def[0].Attempts != 1 {
		t.Errorf("deferred later@: %+v", def)
	}
	fail := find(evs, "failed", "unknown@dest.test")
	if len(fail) != 1 || fail[0].QueueID != ids["unknown@dest.test"] || fail[0].Reply == nil ||
		*fail[0].Reply != (Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user here"}) || !strings.HasPrefix(fail[0].Host, "mx.dest.test") {
		t.Errorf("failed unknown@: %+v", fail)
	}
	if dsn.QueueID != ids["unknown@dest.test"] || dsn.DSNID == "" || dsn.DSNID == dsn.QueueID || dsn.From != "app@example.test" {
		t.Errorf("dsn_sent: %+v", dsn)
	}
	// Order: each recipient's accepted event comes before its outcome.
	pos := map[string]int{}
	for i, e := range evs {
		if _, ok := pos[e.Kind+" "+e.Rcpt]; !ok {
			pos[e.Kind+" "+e.Rcpt] = i
		}
	}
	if pos["accepted later@dest.test"] > pos["deferred later@dest.test"] || pos["deferred later@dest.test"] > pos["delivered later@dest.test"] ||
		pos["failed unknown@dest.test"] > pos["dsn_sent unknown@dest.test"] {
		t.Errorf("events out of order: %v", pos)
	}

	if err := r.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if err := hook.Close(ctx); err != nil {
		t.Fatal(err)
	}
	st := hook.Stats()
	if st.Dropped != 0 || st.Pending != 0 || st.Sent != int64(len(rv.accepted())) {
		t.Errorf("stats %+v, %d events received", st, len(rv.accepted()))
	}
	t.Logf("%d events in %d batches", st.Sent, st.Batches)
}

// BenchmarkSender_Observe measures what the relay's delivery path pays
// per event, with a receiver that accepts everything.
func BenchmarkSender_Observe(b *testing.B) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.Copy(io.Discard, r.Body) }))
	defer srv.Close()
	s, err := New(Config{URL: srv.URL, Secret: testSecret})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	e := testEvent(1)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			s.Observe(ctx, e)
		}
	})
	b.StopTimer()
	s.Close(ctx)
	st := s.Stats()
	b.ReportMetric(float64(st.Dropped)/float64(b.N), "dropped/op")
}

func TestSender_RedirectIsRetried(t *testing.T) {
	ctx := testContext(t)
	other := newReceiver(t, nil)
	rv := newReceiver(t, func(n int, w http.ResponseWriter) int {
		if n == 1 {
			w.Header().Set("Location", other.srv.URL)
			return http.StatusTemporaryRedirect
		}
		return http.StatusOK
	})
	s := newTestSender(t, Config{URL: rv.srv.URL})
	s.Observe(ctx, testEvent(1))
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 1, 2)
	if st := s.Stats(); st.Retries != 1 || len(other.requests()) != 0 {
		t.Errorf("stats %+v, %d requests to the redirect target", st, len(other.requests()))
	}
}

// docVerify is the standard-library verification snippet of
// docs/webhooks.md, kept here so that it stays right.
func docVerify(secret, header string, body []byte) bool {
	var ts string
	var sigs []string
	for _, kv := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sigs = append(sigs, v)
		}
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || time.Since(time.Unix(unix, 0)).Abs() > 5*time.Minute {
		return false
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, s := range sigs {
		if got, err := hex.DecodeString(s); err == nil && hmac.Equal(got, want) {
			return true
		}
	}
	return false
}

func TestVerify_DocSnippet(t *testing.T) {
	body := []byte(`{"batch_id":"x","events":[]}`)
	h := Sign(time.Now(), body, "new", "old")
	if !docVerify("new", h, body) || !docVerify("old", h, body) {
		t.Error("the documented check refuses a good signature")
	}
	if docVerify("new", h, append(body, ' ')) || docVerify("other", h, body) || docVerify("new", Sign(time.Now().Add(-time.Hour), body, "new"), body) {
		t.Error("the documented check accepts a bad signature")
	}
}

// logRecords is a slog.Handler that keeps the records it gets.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (h *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecords) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.recs = append(h.recs, r)
	h.mu.Unlock()
	return nil
}
func (h *logRecords) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecords) WithGroup(string) slog.Handler      { return h }

func (h *logRecords) count(msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.recs {
		if r.Message == msg {
			n++
		}
	}
	return n
}

// TestSender_OverflowLogged: events dropped because the buffer is full
// are logged once per overflow, not silently counted only, and not once
// per event.
func TestSender_OverflowLogged(t *testing.T) {
	ctx := testContext(t)
	// The receiver hangs until the current gate is closed.
	var mu sync.Mutex
	gate := make(chan struct{})
	open := func() {
		mu.Lock()
		close(gate)
		gate = make(chan struct{})
		mu.Unlock()
	}
	rv := newReceiver(t, func(n int, w http.ResponseWriter) int {
		mu.Lock()
		g := gate
		mu.Unlock()
		select {
		case <-g:
		case <-ctx.Done():
		}
		return http.StatusOK
	})
	logs := &logRecords{}
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 5, MaxBuffered: 10, FlushInterval: time.Hour, Timeout: time.Hour,
		Logger: slog.New(logs)})
	observe(ctx, s, 0, 100)
	if n := logs.count(overflowMsg); n != 1 {
		t.Errorf("%d %q logs for 90 dropped events, want 1", n, overflowMsg)
	}
	// Once the buffer has drained, a new overflow is logged again.
	for {
		open()
		if s.Stats().Pending == 0 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	observe(ctx, s, 100, 120)
	if n := logs.count(overflowMsg); n != 2 {
		t.Errorf("%d %q logs after a second overflow, want 2", n, overflowMsg)
	}
	// Let the POSTs through until everything is sent.
	go func() {
		for s.Stats().Pending > 0 {
			open()
			time.Sleep(time.Millisecond)
		}
	}()
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Dropped != 90+10 || st.Sent != 20 {
		t.Errorf("stats = %+v, want 100 dropped and 20 sent", st)
	}
}

// TestSender_LogsWithoutURLSecrets: the URL's query and credentials (where
// receivers often put a token) stay out of the logs, also in the errors
// of failed POSTs.
func TestSender_LogsWithoutURLSecrets(t *testing.T) {
	ctx := testContext(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens: every POST fails to connect
	logs := &logRecords{}
	s := newTestSender(t, Config{URL: "http://user:pa55word@" + addr + "/hook?token=t0ken", FlushInterval: time.Millisecond,
		RetryWindow: 20 * time.Millisecond, Logger: slog.New(logs)})
	s.Observe(ctx, testEvent(1))
	waitStats(ctx, t, s, "the drop", func(st Stats) bool { return st.Dropped == 1 })
	logs.mu.Lock()
	defer logs.mu.Unlock()
	if len(logs.recs) == 0 {
		t.Fatal("no logs")
	}
	for _, r := range logs.recs {
		var b strings.Builder
		b.WriteString(r.Message)
		r.Attrs(func(a slog.Attr) bool {
			fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
			return true
		})
		if line := b.String(); strings.Contains(line, "t0ken") || strings.Contains(line, "pa55word") {
			t.Errorf("log leaks the URL's secrets: %s", line)
		}
	}
}

// TestSender_CloseRetriesAtOnce: a batch waiting out a long backoff when
// Close is called is tried again at once, so a receiver that has come back
// gets what Close flushes instead of Close giving up at its deadline.
func TestSender_CloseRetriesAtOnce(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, failFirst(http.StatusBadGateway))
	s := newTestSender(t, Config{URL: rv.srv.URL, FlushInterval: time.Millisecond, MinBackoff: time.Hour, MaxBackoff: time.Hour})
	s.Observe(ctx, testEvent(1))
	waitStats(ctx, t, s, "the first failure", func(st Stats) bool { return st.Retries == 1 })
	s.Observe(ctx, testEvent(2))
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	start := time.Now()
	if err := s.Close(cctx); err != nil {
		t.Fatalf("Close = %v", err)
	}
	t.Logf("Close took %v", time.Since(start))
	checkInOrder(t, rv.accepted(), 1, 3)
	if st := s.Stats(); st.Sent != 2 || st.Dropped != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// setMaxBody changes the largest body rv accepts (0: no limit).
func (rv *receiver) setMaxBody(n int) {
	rv.mu.Lock()
	rv.maxBody = n
	rv.mu.Unlock()
}

// bodySize is the length of a batch of the test events from..to-1, with
// room for the suffixes that splitting adds to the batch id.
func bodySize(t *testing.T, from, to int) int {
	t.Helper()
	b := Batch{BatchID: "0123456789abcdef-b1.1.2.1.2.1.2", SentAt: time.Now().UTC()}
	for i := from; i < to; i++ {
		e := testEvent(i)
		b.Events = append(b.Events, wireEvent(fmt.Sprintf("0123456789abcdef-%d", i+1), &e))
	}
	body, err := json.Marshal(&b)
	if err != nil {
		t.Fatal(err)
	}
	return len(body)
}

// dedupe keeps the first event of each id, as a receiver does.
func dedupe(evs []Event) []Event {
	seen := map[string]bool{}
	var out []Event
	for _, e := range evs {
		if !seen[e.ID] {
			seen[e.ID] = true
			out = append(out, e)
		}
	}
	return out
}

// checkStableIDs checks that every post of a batch id carried the same
// events, and that the id of each part of a split batch is its parent's
// with ".1" or ".2" added, the parent having been refused with a 413.
func checkStableIDs(t *testing.T, ps []post) {
	t.Helper()
	events := map[string]string{}
	status := map[string]int{}
	for _, p := range ps {
		var ids []string
		for _, e := range p.batch.Events {
			ids = append(ids, e.ID)
		}
		got := strings.Join(ids, ",")
		if prev, ok := events[p.batch.BatchID]; ok && prev != got {
			t.Errorf("batch %s posted with events %s, then %s", p.batch.BatchID, prev, got)
		}
		events[p.batch.BatchID] = got
		if status[p.batch.BatchID] != http.StatusRequestEntityTooLarge {
			status[p.batch.BatchID] = p.status
		}
	}
	for id := range events {
		if i := strings.LastIndexByte(id, '.'); i >= 0 {
			parent, part := id[:i], id[i+1:]
			if part != "1" && part != "2" || status[parent] != http.StatusRequestEntityTooLarge {
				t.Errorf("batch %s: parent %s answered %d", id, parent, status[parent])
			}
			if !strings.HasPrefix(events[parent], events[id]) && !strings.HasSuffix(events[parent], events[id]) {
				t.Errorf("batch %s is not a half of %s", id, parent)
			}
		}
	}
}

// TestSender_413SplitsBatch: a receiver that caps request bodies answers
// a big batch 413; the Sender posts it in halves, recursively, so that
// every event arrives once and in order, and later batches are small
// enough from the start.
func TestSender_413SplitsBatch(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	// Room for 10 events; the batches of 64 are split 32, 16, 8.
	rv.setMaxBody(bodySize(t, 0, 10))
	logs := &logRecords{}
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 64, FlushInterval: time.Hour, Logger: slog.New(logs)})
	observe(ctx, s, 0, 64)
	rv.waitFor(ctx, "the first 64 events", acceptedAtLeast(64))
	first := rv.requests()
	checkInOrder(t, rv.accepted(), 0, 64)
	largest := 0
	for _, p := range first {
		if p.status == http.StatusOK {
			largest = max(largest, len(p.batch.Events))
		}
	}
	if largest != 8 {
		t.Errorf("largest accepted part: %d events, want 8", largest)
	}
	// 64 refused, 2 of 32, 4 of 16, then 8 of 8 accepted.
	if len(first) != 1+2+4+8 {
		t.Errorf("%d requests for the first batch, want 15", len(first))
	}
	waitStats(ctx, t, s, "the first batch done", func(st Stats) bool { return st.Pending == 0 })
	if n := logs.count(batchSizeMsg); n != 1 {
		t.Errorf("%d %q logs, want 1", n, batchSizeMsg)
	}

	// Later batches are no larger than what was accepted: no 413 now.
	observe(ctx, s, 64, 128)
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	all := rv.requests()
	for _, p := range all[len(first):] {
		if p.status != http.StatusOK || len(p.batch.Events) > 8 {
			t.Errorf("later batch %s: %d events, answered %d", p.batch.BatchID, len(p.batch.Events), p.status)
		}
	}
	t.Logf("%d requests for the first 64 events, %d for the next 64", len(first), len(all)-len(first))
	evs := rv.accepted()
	if len(dedupe(evs)) != len(evs) {
		t.Errorf("%d events accepted, %d distinct", len(evs), len(dedupe(evs)))
	}
	checkInOrder(t, evs, 0, 128)
	checkStableIDs(t, all)
	if st := s.Stats(); st.Sent != 128 || st.Dropped != 0 || st.Retries != 0 || st.Pending != 0 {
		t.Errorf("stats = %+v", st)
	}
}

// TestSender_413HalvesRetried: a part of a split batch that fails is
// retried like any batch, with the same id and events, and the parts
// still arrive in order; a lost 2xx brings a part again, which the
// receiver drops by event id.
func TestSender_413HalvesRetried(t *testing.T) {
	ctx := testContext(t)
	var mu sync.Mutex
	tried := map[string]bool{}
	var stored []Event // what the receiver kept, also when its answer was lost
	rv := newReceiver(t, nil)
	maxBody := bodySize(t, 0, 4)
	rv.setMaxBody(maxBody)
	// In front of rv: the first POST of each part fails, once before
	// and once after the receiver stored it.
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Baton-Batch-Id")
		body, err := io.ReadAll(r.Body)
		if err != nil {
			return
		}
		mu.Lock()
		first := !tried[id]
		tried[id] = true
		mu.Unlock()
		var b Batch
		if err := json.Unmarshal(body, &b); err != nil {
			t.Errorf("front: %v", err)
		}
		switch {
		case first && strings.HasSuffix(id, ".1"):
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		case first && strings.HasSuffix(id, ".2"):
			if len(body) <= maxBody {
				mu.Lock()
				stored = append(stored, b.Events...)
				mu.Unlock()
			}
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		r.Body = io.NopCloser(strings.NewReader(string(body)))
		rec := httptest.NewRecorder()
		rv.serve(rec, r)
		if rec.Code == http.StatusOK {
			mu.Lock()
			stored = append(stored, b.Events...)
			mu.Unlock()
		}
		w.WriteHeader(rec.Code)
	}))
	defer front.Close()
	s := newTestSender(t, Config{URL: front.URL, BatchSize: 16, FlushInterval: time.Hour})
	observe(ctx, s, 0, 16)
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	got := append([]Event(nil), stored...)
	mu.Unlock()
	if len(dedupe(got)) == len(got) {
		t.Errorf("no part came twice: the lost answers were not retried")
	}
	checkInOrder(t, dedupe(got), 0, 16)
	checkInOrder(t, rv.accepted(), 0, 16)
	checkStableIDs(t, rv.requests())
	st := s.Stats()
	if st.Sent != 16 || st.Dropped != 0 || st.Retries == 0 {
		t.Errorf("stats = %+v", st)
	}
	t.Logf("%d events stored with repeats, stats %+v", len(got), st)
}

// attrOf returns the value of the attribute key of the first record
// logged with msg.
func (h *logRecords) attrOf(msg, key string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.recs {
		if r.Message != msg {
			continue
		}
		v := ""
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == key {
				v = a.Value.String()
				return false
			}
			return true
		})
		return v
	}
	return ""
}

// TestSender_413SingleEventDropped: an event too large for the receiver
// even on its own is dropped, counted and logged once with its id; the
// events around it arrive in order.
func TestSender_413SingleEventDropped(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	rv.setMaxBody(bodySize(t, 0, 8))
	logs := &logRecords{}
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 16, FlushInterval: time.Hour, Logger: slog.New(logs)})
	const big = 5
	for i := range 16 {
		e := testEvent(i)
		if i == big {
			e.Reply.Text = strings.Repeat("x", 4<<10)
		}
		s.Observe(ctx, e)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	evs := rv.accepted()
	var want []Event
	for i := range 16 {
		if i != big {
			e := testEvent(i)
			want = append(want, Event{QueueID: string(e.ID)})
		}
	}
	if len(evs) != len(want) {
		t.Fatalf("%d events accepted, want %d", len(evs), len(want))
	}
	for i := range evs {
		if evs[i].QueueID != want[i].QueueID {
			t.Fatalf("event %d is %s, want %s", i, evs[i].QueueID, want[i].QueueID)
		}
	}
	checkStableIDs(t, rv.requests())
	if st := s.Stats(); st.Sent != 15 || st.Dropped != 1 || st.Pending != 0 || st.Retries != 0 {
		t.Errorf("stats = %+v", st)
	}
	if n := logs.count(tooLargeMsg); n != 1 {
		t.Fatalf("%d %q logs, want 1", n, tooLargeMsg)
	}
	// The log names the event as the receiver would have seen it.
	var bigID string
	for _, p := range rv.requests() {
		for _, e := range p.batch.Events {
			if e.QueueID == fmt.Sprintf("q%04d", big) {
				bigID = e.ID
			}
		}
	}
	if got := logs.attrOf(tooLargeMsg, "event_id"); got == "" || got != bigID {
		t.Errorf("logged event_id %q, want %q", got, bigID)
	}
	if got := logs.attrOf(tooLargeMsg, "id"); got != fmt.Sprintf("q%04d", big) {
		t.Errorf("logged queue id %q", got)
	}
	// The halves that hold the big event are refused down to the event
	// itself; the others are accepted at once.
	var got []string
	for _, p := range rv.requests() {
		got = append(got, fmt.Sprintf("%s:%d:%d", strings.TrimPrefix(p.batch.BatchID, s.prefix), len(p.batch.Events), p.status))
	}
	want413 := "-b1:16:413 -b1.1:8:413 -b1.1.1:4:200 -b1.1.2:4:413 -b1.1.2.1:2:413 -b1.1.2.1.1:1:200 -b1.1.2.1.2:1:413 -b1.1.2.2:2:200 -b1.2:8:200"
	if strings.Join(got, " ") != want413 {
		t.Errorf("requests:\n%s\nwant\n%s", strings.Join(got, " "), want413)
	}
}

// TestSender_413BatchSizeGrowsBack: after a 413 lowered the batch size,
// growAfter full batches accepted in a row double it again, up to
// BatchSize.
func TestSender_413BatchSizeGrowsBack(t *testing.T) {
	ctx := testContext(t)
	rv := newReceiver(t, nil)
	rv.setMaxBody(bodySize(t, 0, 2))
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 8, FlushInterval: time.Hour})
	next := 0
	observe := func(n int) {
		for range n {
			s.Observe(ctx, testEvent(next))
			next++
		}
		rv.waitFor(ctx, fmt.Sprintf("%d events", next), acceptedAtLeast(next))
	}
	observe(8) // 8 refused, 4+4 refused, then 2+2+2+2
	rv.setMaxBody(0)
	sizes := func(from int) []int {
		var n []int
		for _, p := range rv.requests()[from:] {
			n = append(n, len(p.batch.Events))
		}
		return n
	}
	mark := len(rv.requests())
	observe(2 * growAfter)
	for _, n := range sizes(mark) {
		if n != 2 {
			t.Fatalf("batch sizes after the 413s: %v, want all 2", sizes(mark))
		}
	}
	mark = len(rv.requests())
	observe(4 * growAfter)
	if got := sizes(mark); len(got) != growAfter || got[0] != 4 {
		t.Fatalf("batch sizes after %d full batches: %v, want %d of 4", growAfter, got, growAfter)
	}
	mark = len(rv.requests())
	observe(8 * 3)
	if got := sizes(mark); fmt.Sprint(got) != "[8 8 8]" {
		t.Fatalf("batch sizes after growing again: %v, want BatchSize", got)
	}
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	checkInOrder(t, rv.accepted(), 0, next)
	checkStableIDs(t, rv.requests())
}

// TestSender_413CloseAbandonsHalves: Close giving up in the middle of a
// split batch drops and counts every event of it once, the parts not yet
// posted included.
func TestSender_413CloseAbandonsHalves(t *testing.T) {
	ctx := testContext(t)
	release := make(chan struct{})
	defer close(release)
	rv := newReceiver(t, hangUntil(ctx, release))
	rv.setMaxBody(bodySize(t, 0, 2))
	s := newTestSender(t, Config{URL: rv.srv.URL, BatchSize: 8, FlushInterval: time.Hour, Timeout: time.Hour})
	observe(ctx, s, 0, 8)
	// 8 and 4 refused; the first part of 2 hangs.
	rv.waitFor(ctx, "two 413s", func(ps []post) bool { return len(ps) >= 2 })
	closeGivesUp(ctx, t, s)
	if st := s.Stats(); st.Dropped != 8 || st.Pending != 0 || st.Sent != 0 {
		t.Errorf("stats = %+v", st)
	}
}
