package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

func TestSlogObserver_OneLinePerEventWithID(t *testing.T) {
	var buf bytes.Buffer
	obs := SlogObserver(slog.New(slog.NewJSONHandler(&buf, nil)))
	ctx := context.Background()
	at := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	obs.Observe(ctx, Event{Kind: EventDelivered, Time: at, ID: "Q1", From: "s@example.test", Rcpt: "r@dest.test",
		Host: "mx.dest.test", TLS: TLSInfo{Version: tls.VersionTLS13, Verified: true},
		Reply: queue.Reply{Code: 250, Enhanced: "2.0.0", Text: "OK\r\nqueued", Host: "mx.dest.test"}, Attempts: 2, Duration: 3 * time.Second, Size: 1234, Identity: "alice"})
	obs.Observe(ctx, Event{Kind: EventFailed, ID: "Q2", From: "", Rcpt: "x@dest.test", Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no"}})
	obs.Observe(ctx, Event{Kind: EventDSNSent, ID: "Q2", Rcpt: "x@dest.test", DSNID: "D1"})

	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d log lines, want 3:\n%s", len(lines), buf.String())
	}
	var recs []map[string]any
	for _, l := range lines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("bad JSON line %q: %v", l, err)
		}
		recs = append(recs, m)
	}
	want := map[string]any{"level": "INFO", "msg": "event", "kind": "delivered", "id": "Q1", "from": "s@example.test", "rcpt": "r@dest.test",
		"host": "mx.dest.test", "tls": "TLS 1.3", "tls_verified": true, "reply": "250 2.0.0 OK queued", "attempts": float64(2),
		"duration": float64(3 * time.Second), "size": float64(1234), "identity": "alice"}
	for k, v := range want {
		if recs[0][k] != v {
			t.Errorf("line 1: %s = %v (%T), want %v", k, recs[0][k], recs[0][k], v)
		}
	}
	if recs[1]["level"] != "WARN" || recs[1]["kind"] != "failed" || recs[1]["from"] != "" || recs[1]["id"] != "Q2" {
		t.Errorf("line 2 = %v", recs[1])
	}
	if recs[2]["dsn_id"] != "D1" || recs[2]["kind"] != "dsn_sent" {
		t.Errorf("line 3 = %v", recs[2])
	}
	if _, ok := recs[2]["tls"]; ok {
		t.Errorf("plaintext/no-connection event logs a TLS version: %v", recs[2])
	}
}

func TestSlogObserver_NilLoggerDiscards(t *testing.T) {
	SlogObserver(nil).Observe(context.Background(), Event{Kind: EventAccepted, ID: "Q"}) // must not panic
}

func TestSlogObserver_RespectsLevel(t *testing.T) {
	var buf bytes.Buffer
	obs := SlogObserver(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelWarn})))
	obs.Observe(context.Background(), Event{Kind: EventDelivered, ID: "Q1"})
	obs.Observe(context.Background(), Event{Kind: EventExpired, ID: "Q2"})
	out := buf.String()
	if strings.Contains(out, "Q1") || !strings.Contains(out, "id=Q2") || !strings.Contains(out, "kind=expired") {
		t.Errorf("output = %q", out)
	}
}

func TestMulti_FansOutInOrderAndFlattens(t *testing.T) {
	var mu sync.Mutex
	var got []string
	rec := func(name string) Observer {
		return ObserverFunc(func(_ context.Context, e Event) {
			mu.Lock()
			got = append(got, name+":"+e.Kind.String())
			mu.Unlock()
		})
	}
	var c EventCounter
	m := Multi(rec("a"), nil, Multi(rec("b"), &c), Multi())
	if n := len(m.(multiObserver)); n != 3 {
		t.Errorf("Multi holds %d observers, want 3 (nested flattened, nil dropped)", n)
	}
	m.Observe(context.Background(), Event{Kind: EventDeferred})
	m.Observe(context.Background(), Event{Kind: EventSuppressed})
	if strings.Join(got, ",") != "a:deferred,b:deferred,a:suppressed,b:suppressed" {
		t.Errorf("calls = %v", got)
	}
	if c.Count(EventDeferred) != 1 || c.Count(EventSuppressed) != 1 || c.Count(EventDelivered) != 0 {
		t.Errorf("counter: deferred %d suppressed %d delivered %d", c.Count(EventDeferred), c.Count(EventSuppressed), c.Count(EventDelivered))
	}
	Multi().Observe(context.Background(), Event{Kind: EventAccepted}) // no observers: nothing happens
}

func TestEventCounter_Concurrent(t *testing.T) {
	var c EventCounter
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 1000 {
				c.Observe(context.Background(), Event{Kind: EventDelivered})
			}
		}()
	}
	wg.Wait()
	c.Observe(context.Background(), Event{Kind: EventKind(0)})
	c.Observe(context.Background(), Event{Kind: EventKind(1000)})
	if c.Count(EventDelivered) != 8000 {
		t.Errorf("count = %d", c.Count(EventDelivered))
	}
	if c.Count(EventKind(1000)) != 0 {
		t.Error("count for an unknown kind")
	}
}

func TestEventKind_Names(t *testing.T) {
	seen := map[string]bool{}
	for k := EventAccepted; k <= EventDelayWarning; k++ {
		s := k.String()
		if s == "" || strings.HasPrefix(s, "EventKind(") || seen[s] {
			t.Errorf("kind %d has name %q", int(k), s)
		}
		seen[s] = true
	}
	if EventKind(0).String() != "EventKind(0)" {
		t.Errorf("zero kind = %q", EventKind(0).String())
	}
	b, err := json.Marshal(Event{Kind: EventExpired})
	if err != nil || !strings.Contains(string(b), `"Kind":"expired"`) {
		t.Errorf("JSON = %s, %v", b, err)
	}
}

func TestAsyncObserver_NeverBlocksAndDrainsInOrder(t *testing.T) {
	release := make(chan struct{})
	var mu sync.Mutex
	var got []queue.ID
	slow := ObserverFunc(func(ctx context.Context, e Event) {
		<-release
		if ctx.Err() != nil {
			t.Error("observer context cancelled")
		}
		mu.Lock()
		got = append(got, e.ID)
		mu.Unlock()
	})
	a := NewAsyncObserver(slow, AsyncObserverConfig{Buffer: 2})
	ctx, cancel := context.WithCancel(context.Background())
	// The first event is taken by the goroutine (which then blocks), two
	// fill the buffer; the rest must be dropped without blocking. Until
	// the goroutine has taken the first, the buffer may hold it instead,
	// so send until something is dropped.
	ids := []queue.ID{"1", "2", "3", "4", "5", "6"}
	for _, id := range ids {
		a.Observe(ctx, Event{Kind: EventDelivered, ID: id})
	}
	cancel() // cancelling the caller's context does not reach the observer
	if a.Dropped() < 3 {
		t.Errorf("dropped %d of 6 events with room for at most 3", a.Dropped())
	}
	close(release)
	if err := a.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	a.Observe(context.Background(), Event{ID: "late"})
	mu.Lock()
	defer mu.Unlock()
	if int64(len(got))+a.Dropped() != 7 {
		t.Errorf("delivered %v and dropped %d of 7", got, a.Dropped())
	}
	for i := 1; i < len(got); i++ {
		if got[i] <= got[i-1] {
			t.Errorf("out of order: %v", got)
		}
	}
	if len(got) == 0 || got[0] != "1" {
		t.Errorf("delivered %v, want to start with 1", got)
	}
	if err := a.Close(context.Background()); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestAsyncObserver_CloseHonoursContext(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	a := NewAsyncObserver(ObserverFunc(func(context.Context, Event) { <-block }), AsyncObserverConfig{})
	a.Observe(context.Background(), Event{ID: "1"})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.Close(ctx); err == nil {
		t.Error("Close returned nil while the observer was still busy and ctx was done")
	}
}
