package e2e

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

func (h *harness) submitAPI(t *testing.T, to string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("From: app@sender.test\r\nTo: %s\r\nSubject: %d\r\n\r\nbody %d\r\n", to, i, i)
		if _, err := h.relay.Submit(context.Background(), &queue.Envelope{From: "app@sender.test", To: []queue.Recipient{{Addr: to}}}, strings.NewReader(body)); err != nil {
			t.Fatal(err)
		}
	}
}

// Connections to a destination are reused: N messages take at most as
// many connections as the destination's concurrency cap.
func TestScheduler_ConnectionReuse_FewConnectionsForManyMessages(t *testing.T) {
	h := newHarness(t, harnessConfig{limits: relay.Limits{MaxConcurrent: 2}})
	dest := startSink(t, "mx1.dest.test")
	h.mx("dest.test", dest)
	h.submitAPI(t, "rcpt@dest.test", 30)
	dest.wait(30, 20*time.Second)
	dest.mu.Lock()
	conns := dest.conns
	dest.mu.Unlock()
	if conns > 2 {
		t.Fatalf("30 messages used %d connections, want at most 2 (the cap), reused", conns)
	}
}

// The per-destination cap on concurrent deliveries holds at the
// destination.
func TestScheduler_PerDestinationConcurrencyCap_ObservedAtDestination(t *testing.T) {
	h := newHarness(t, harnessConfig{dests: map[string]relay.Limits{"dest.test": {MaxConcurrent: 3}}})
	dest := startSink(t, "mx1.dest.test")
	var mu sync.Mutex
	cur, peak := 0, 0
	dest.onData = func() {
		mu.Lock()
		cur++
		peak = max(peak, cur)
		mu.Unlock()
		time.Sleep(30 * time.Millisecond)
		mu.Lock()
		cur--
		mu.Unlock()
	}
	h.mx("dest.test", dest)
	h.submitAPI(t, "rcpt@dest.test", 24)
	dest.wait(24, 30*time.Second)
	mu.Lock()
	defer mu.Unlock()
	if peak > 3 {
		t.Fatalf("peak concurrent transactions at the destination = %d, cap is 3", peak)
	}
	if peak < 2 {
		t.Fatalf("peak concurrency %d: deliveries did not run in parallel at all", peak)
	}
}

// A per-destination rate limit spaces deliveries: n messages at r/s with
// burst 1 cannot arrive faster than (n-1)/r. (A lower bound only: a slow
// machine makes it longer, never shorter.)
func TestScheduler_PerDestinationRateLimit_ObservedAtDestination(t *testing.T) {
	h := newHarness(t, harnessConfig{dests: map[string]relay.Limits{"dest.test": {Rate: 20, Burst: 1}}})
	dest := startSink(t, "mx1.dest.test")
	var mu sync.Mutex
	var times []time.Time
	dest.onData = func() {
		mu.Lock()
		times = append(times, time.Now())
		mu.Unlock()
	}
	h.mx("dest.test", dest)
	h.submitAPI(t, "rcpt@dest.test", 11)
	dest.wait(11, 30*time.Second)
	mu.Lock()
	defer mu.Unlock()
	if span := times[len(times)-1].Sub(times[0]); span < 450*time.Millisecond {
		t.Fatalf("11 messages at 20/s arrived within %v; the limiter allows no less than 500ms", span)
	}
}

// A destination that stalls holds up only its own mail.
func TestScheduler_StalledDestination_DoesNotDelayOthers(t *testing.T) {
	h := newHarness(t, harnessConfig{limits: relay.Limits{MaxConcurrent: 2}})
	slow := startSink(t, "mx.slow.test")
	release := make(chan struct{})
	slow.onData = func() { <-release }
	t.Cleanup(func() { close(release) })
	fast := startSink(t, "mx.fast.test")
	h.mx("slow.test", slow)
	h.mx("fast.test", fast)
	h.submitAPI(t, "rcpt@slow.test", 10) // both connections to slow.test stall
	time.Sleep(100 * time.Millisecond)
	h.submitAPI(t, "rcpt@fast.test", 5)
	fast.wait(5, 10*time.Second)
	if n := len(slow.messages()); n != 0 {
		t.Fatalf("stalled destination accepted %d messages", n)
	}
}
