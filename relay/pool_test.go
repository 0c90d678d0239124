package relay

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"
)

// poolRecorder collects the connections a pool discards and, like the
// deliverer, gives their slots back once they are "closed".
type poolRecorder struct {
	p    *connPool
	mu   sync.Mutex
	got  []*sdConn
	seen chan *sdConn
}

// newRecordedPool returns a pool whose discards are recorded.
func newRecordedPool(maxConns, maxPerDest int, idle time.Duration) (*connPool, *poolRecorder) {
	r := &poolRecorder{seen: make(chan *sdConn, 64)}
	r.p = newConnPool(maxConns, maxPerDest, idle, r.discard)
	return r.p, r
}

func (r *poolRecorder) discard(key string, c *sdConn) {
	r.mu.Lock()
	r.got = append(r.got, c)
	r.mu.Unlock()
	r.p.release(key, c)
	r.seen <- c
}

func (r *poolRecorder) discarded() []*sdConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*sdConn(nil), r.got...)
}

func poolWantCounts(t *testing.T, p *connPool, key string, open, destOpen, destIdle int) {
	t.Helper()
	a, b, c := p.counts(key)
	if a != open || b != destOpen || c != destIdle {
		t.Errorf("counts(%q) = %d open, %d for dest, %d idle; want %d, %d, %d", key, a, b, c, open, destOpen, destIdle)
	}
}

func anyConn(*sdConn) bool { return true }

func TestConnPool_PerDestinationCapWaitsForRelease(t *testing.T) {
	p, _ := newRecordedPool(10, 2, time.Minute)
	ctx := t.Context()
	for range 2 {
		if c, err := p.acquire(ctx, "k", anyConn); c != nil || err != nil {
			t.Fatalf("acquire = %v, %v; want a new slot", c, err)
		}
	}
	poolWantCounts(t, p, "k", 2, 2, 0)
	got := make(chan error, 1)
	go func() {
		_, err := p.acquire(ctx, "k", anyConn)
		got <- err
	}()
	// Another destination is not held up by k's cap.
	if c, err := p.acquire(ctx, "other", anyConn); c != nil || err != nil {
		t.Fatalf("acquire(other) = %v, %v", c, err)
	}
	select {
	case err := <-got:
		t.Fatalf("third acquire returned %v while the cap was reached", err)
	default:
	}
	p.release("k", nil)
	if err := <-got; err != nil {
		t.Fatal(err)
	}
	poolWantCounts(t, p, "k", 3, 2, 0)
}

func TestConnPool_WaitHonoursContext(t *testing.T) {
	p, _ := newRecordedPool(1, 1, time.Minute)
	if _, err := p.acquire(t.Context(), "k", anyConn); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	go cancel()
	if _, err := p.acquire(ctx, "k", anyConn); !errors.Is(err, context.Canceled) {
		t.Fatalf("acquire = %v, want context.Canceled", err)
	}
	poolWantCounts(t, p, "k", 1, 1, 0)
}

func TestConnPool_IdleReuseMostRecentFirstAndMatch(t *testing.T) {
	p, rec := newRecordedPool(10, 10, time.Minute)
	ctx := t.Context()
	a, b := &sdConn{hostName: "a"}, &sdConn{hostName: "b"}
	for range 2 {
		if _, err := p.acquire(ctx, "k", anyConn); err != nil {
			t.Fatal(err)
		}
	}
	p.put("k", a)
	p.put("k", b)
	poolWantCounts(t, p, "k", 2, 2, 2)
	if c, _ := p.acquire(ctx, "k", anyConn); c != b {
		t.Fatalf("got %v, want the most recently used connection", c)
	}
	if c, _ := p.acquire(ctx, "k", func(c *sdConn) bool { return c.hostName == "b" }); c != nil {
		t.Fatalf("got %v, want a new slot (no idle connection matches)", c)
	}
	poolWantCounts(t, p, "k", 3, 3, 1)
	if c, _ := p.acquire(ctx, "k", func(c *sdConn) bool { return c.hostName == "a" }); c != a {
		t.Fatalf("got %v, want a", c)
	}
	if len(rec.discarded()) != 0 {
		t.Errorf("discarded %d connections", len(rec.discarded()))
	}
}

func TestConnPool_FullDestinationEvictsUnfitIdle(t *testing.T) {
	p, rec := newRecordedPool(10, 1, time.Minute)
	plain := &sdConn{hostName: "plain"}
	if _, err := p.acquire(t.Context(), "k", anyConn); err != nil {
		t.Fatal(err)
	}
	p.put("k", plain)
	wantTLS := func(c *sdConn) bool { return c.tls.Version != 0 }
	c, err := p.acquire(t.Context(), "k", wantTLS)
	if c != nil || err != nil {
		t.Fatalf("acquire = %v, %v; want a new slot", c, err)
	}
	if d := rec.discarded(); len(d) != 1 || d[0] != plain {
		t.Fatalf("discarded %v, want the unfit idle connection", d)
	}
	poolWantCounts(t, p, "k", 1, 1, 0)
}

func TestConnPool_GlobalCapEvictsOldestIdle(t *testing.T) {
	p, rec := newRecordedPool(2, 2, time.Minute)
	ctx := t.Context()
	old, newer := &sdConn{hostName: "old"}, &sdConn{hostName: "newer"}
	p.acquire(ctx, "a", anyConn)
	p.put("a", old)
	p.acquire(ctx, "b", anyConn)
	p.put("b", newer)
	if c, err := p.acquire(ctx, "c", anyConn); c != nil || err != nil {
		t.Fatalf("acquire = %v, %v", c, err)
	}
	if d := rec.discarded(); len(d) != 1 || d[0] != old {
		t.Fatalf("discarded %v, want the oldest idle connection", d)
	}
	poolWantCounts(t, p, "c", 2, 1, 0)
	poolWantCounts(t, p, "b", 2, 1, 1)
	poolWantCounts(t, p, "a", 2, 0, 0)
}

func TestConnPool_IdleTimeoutDiscards(t *testing.T) {
	p, rec := newRecordedPool(10, 10, time.Millisecond)
	c := &sdConn{hostName: "x"}
	p.acquire(t.Context(), "k", anyConn)
	p.put("k", c)
	if got := <-rec.seen; got != c {
		t.Fatalf("discarded %v", got)
	}
	poolWantCounts(t, p, "k", 0, 0, 0)
}

func TestConnPool_Close(t *testing.T) {
	p, rec := newRecordedPool(10, 10, time.Minute)
	idle, busy := &sdConn{hostName: "idle"}, &sdConn{hostName: "busy"}
	p.acquire(t.Context(), "k", anyConn)
	p.put("k", idle)
	p.acquire(t.Context(), "k", func(*sdConn) bool { return false })
	got := p.close()
	if len(got) != 1 || got[0].c != idle || got[0].key != "k" {
		t.Fatalf("close returned %v, want the idle connection", got)
	}
	poolWantCounts(t, p, "k", 2, 2, 0) // closing is the caller's job
	p.release("k", nil)
	if _, err := p.acquire(t.Context(), "k", anyConn); !errors.Is(err, errPoolClosed) {
		t.Fatalf("acquire after close = %v", err)
	}
	p.put("k", busy) // a delivery that ends after close
	if d := rec.discarded(); len(d) != 1 || d[0] != busy {
		t.Fatalf("discarded %v, want the connection put after close", d)
	}
	poolWantCounts(t, p, "k", 0, 0, 0)
}

// An idle connection whose idle timer has fired belongs to expire, which
// may still be waiting for the pool's lock when close runs: close must
// leave it where expire will find it, or it is never closed and its slot
// never released.
func TestConnPool_CloseLeavesExpiringConnToExpire(t *testing.T) {
	p, rec := newRecordedPool(10, 2, time.Minute)
	if c, err := p.acquire(t.Context(), "k", anyConn); c != nil || err != nil {
		t.Fatalf("acquire = %v, %v; want a new slot", c, err)
	}
	c := &sdConn{}
	p.put("k", c)
	// The idle timer fires; its expire call has not taken the lock yet.
	p.mu.Lock()
	c.idleTimer.Stop()
	fired := make(chan struct{})
	c.idleTimer = time.AfterFunc(0, func() { close(fired) })
	p.mu.Unlock()
	<-fired
	if items := p.close(); len(items) != 0 {
		t.Fatalf("close returned %d connections; want none (expire owns the only one)", len(items))
	}
	p.expire("k", c) // the pending expire call runs now
	if got := rec.discarded(); len(got) != 1 || got[0] != c {
		t.Fatalf("discarded %v; want the expiring connection", got)
	}
	poolWantCounts(t, p, "k", 0, 0, 0)
}
