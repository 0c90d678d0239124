package admin

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

func TestRecorder_WindowBucketsByMinute(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 30, 30, 0, time.UTC)
	r := NewRecorder(RecorderConfig{Now: func() time.Time { return now }})
	ctx := context.Background()
	r.Observe(ctx, relay.Event{Kind: relay.EventDelivered, Time: now})
	r.Observe(ctx, relay.Event{Kind: relay.EventDeferred, Time: now.Add(-10 * time.Minute)})
	r.Observe(ctx, relay.Event{Kind: relay.EventExpired, Time: now.Add(-10 * time.Minute)})
	r.Observe(ctx, relay.Event{Kind: relay.EventSuppressed, Time: now.Add(-59 * time.Minute)})
	r.Observe(ctx, relay.Event{Kind: relay.EventDelivered, Time: now.Add(-2 * time.Hour)}) // too old
	r.Observe(ctx, relay.Event{Kind: relay.EventAccepted, Time: now.Add(time.Minute)})     // clock skew: counts now
	w := r.Window()
	if len(w.Minutes) != 60 {
		t.Fatalf("%d minutes", len(w.Minutes))
	}
	if want := (Counts{Accepted: 1, Delivered: 1, Deferred: 1, Bounced: 2}); w.Totals != want {
		t.Fatalf("totals = %+v, want %+v", w.Totals, want)
	}
	if m := w.Minutes[49]; m.Deferred != 1 || m.Bounced != 1 || !m.Time.Equal(now.Truncate(time.Minute).Add(-10*time.Minute)) {
		t.Fatalf("minute -10 = %+v", m)
	}
	if m := w.Minutes[0]; m.Bounced != 1 {
		t.Fatalf("minute -59 = %+v", m)
	}
	// An hour later every bucket has rolled over.
	now = now.Add(time.Hour)
	if w := r.Window(); w.Totals != (Counts{}) {
		t.Fatalf("an hour later: %+v", w.Totals)
	}
}

func TestRecorder_SamplesDepth(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{})
	defer q.Close()
	r := NewRecorder(RecorderConfig{Queue: q})
	for i := range 3 {
		if _, err := q.Enqueue(context.Background(), &queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: fmt.Sprintf("r%d@y.test", i)}}}, strings.NewReader("x")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := r.Sample(context.Background()); err != nil {
		t.Fatal(err)
	}
	w := r.Window()
	if d := w.Minutes[59].Depth; d == nil || *d != 3 {
		t.Fatalf("depth sample = %v", d)
	}
	if w.Minutes[58].Depth != nil {
		t.Fatal("a minute without a sample has a depth")
	}
}

// Memory stays bounded: the oldest messages are forgotten, and a message's
// events beyond the cap are counted, not kept.
func TestRecorder_Bounded(t *testing.T) {
	r := NewRecorder(RecorderConfig{MaxMessages: 3, MaxEvents: 2, MaxDestinations: 2})
	ctx := context.Background()
	for i := range 5 {
		r.Observe(ctx, relay.Event{Kind: relay.EventAccepted, ID: queue.ID(fmt.Sprint("m", i)), From: "a@x.test", Rcpt: "b@y.test"})
	}
	if len(r.msgs) != 3 || len(r.order) != 3 {
		t.Fatalf("%d messages kept, want 3", len(r.msgs))
	}
	for i, want := range []bool{false, false, true, true, true} {
		if _, ok := r.History(queue.ID(fmt.Sprint("m", i))); ok != want {
			t.Fatalf("m%d kept = %v, want %v", i, ok, want)
		}
	}
	res := r.Search("a@x.test", 10)
	if len(res) != 3 || res[0].ID != "m4" || res[2].ID != "m2" {
		t.Fatalf("search newest first = %v", res)
	}
	for range 3 {
		r.Observe(ctx, relay.Event{Kind: relay.EventDeferred, ID: "m4", Rcpt: "b@y.test", Dest: "mx:y.test"})
	}
	h, _ := r.History("m4")
	if len(h.Events) != 2 || h.Dropped != 2 {
		t.Fatalf("m4: %d events, %d dropped", len(h.Events), h.Dropped)
	}
	r.Observe(ctx, relay.Event{Kind: relay.EventDelivered, Time: time.Now().Add(-time.Minute), Dest: "mx:a.test", Rcpt: "x@a.test"})
	r.Observe(ctx, relay.Event{Kind: relay.EventDelivered, Time: time.Now(), Dest: "mx:b.test", Rcpt: "x@b.test"})
	ds := r.Destinations()
	if len(ds) != 2 || ds[0].Dest != "mx:b.test" || ds[1].Dest != "mx:y.test" {
		t.Fatalf("destinations = %+v; want the idlest forgotten", ds)
	}
}

// hangingStats is a queue whose Stats returns only when its context ends.
type hangingStats struct {
	queue.Admin
	calls atomic.Int32
}

func (h *hangingStats) Stats(ctx context.Context) (*queue.Stats, error) {
	h.calls.Add(1)
	<-ctx.Done()
	return nil, ctx.Err()
}

// A Stats call that hangs does not stop Run's sampling: each sample is
// bounded by the interval.
func TestRecorder_RunSurvivesHangingStats(t *testing.T) {
	q := &hangingStats{Admin: queue.NewMemory(queue.MemoryConfig{})}
	r := NewRecorder(RecorderConfig{Queue: q})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx, 10*time.Millisecond) }()
	defer func() { cancel(); <-done }()
	start := time.Now()
	for q.calls.Load() < 3 {
		if time.Since(start) > time.Minute {
			t.Fatalf("Stats called %d times in a minute: a hanging sample stopped Run", q.calls.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("3 samples in %v", time.Since(start))
}
