// Package queuetest is the conformance suite for queue.Queue backends.
//
// A backend author adds one test file:
//
//	func TestConformance(t *testing.T) {
//		queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
//			return &myHarness{dir: t.TempDir()}
//		})
//	}
//
// where the Harness opens the backend on storage that belongs to one test
// case (a fresh temporary directory, database or key prefix) and can open
// it again after Close, as a restart would. Run calls the maker once per
// case, so cases never see each other's messages, and runs the cases in
// parallel subtests; every case drives the time through an injected clock
// (Config.Now), so no case waits for real retry delays.
//
// What the cases check is the contract written on queue.Queue: byte-exact
// bodies (8-bit, long lines, bare CR and LF, empty, large), every envelope
// field kept, durability across reopen (Capabilities.Durable), exclusive
// leases under competition, lease expiry, per-recipient outcomes, retry
// times, expiry at the maximum age, hold and release, delete, the Admin
// filters and counts, context cancellation, the sentinel errors and Close;
// and streams: Envelope.Stream kept, LeaseStream (queue.StreamLeaser)
// leasing only its stream while Lease leases them all, the lease rules per
// stream, Filter.Stream, Stats.ByStream and Stats.Oldest.
package queuetest

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

// Config is what a case asks of the backend it opens.
type Config struct {
	// Schedule is the retry schedule the backend must use.
	Schedule queue.Schedule
	// Now is the clock the backend must use for every time it records
	// or compares.
	Now func() time.Time
}

// Harness gives the suite a backend on storage private to one case.
type Harness interface {
	// Open returns a queue on the harness's storage. The first call
	// finds the storage empty; once the queue it returned is closed, a
	// later call opens the same storage again, as after a restart (for a
	// backend that is not Durable it may start empty).
	Open(ctx context.Context, cfg Config) (queue.Queue, error)
	// Close releases the storage after the case; the queue is closed.
	Close()
}

// Capabilities declares the optional behaviour a backend has; cases that
// need a capability the backend lacks are skipped with a note saying so.
type Capabilities struct {
	// Durable means that a reopened queue holds every message Enqueue
	// acknowledged, with its recipients' states and history; leases do
	// not survive (the messages are due again).
	Durable bool
	// LargeBody is the size of the large-body case in bytes; 0 means
	// 8 MiB, a negative value skips that case.
	LargeBody int64
	// NoStreams means that the backend does not implement
	// queue.StreamLeaser: the LeaseStream cases are skipped instead of
	// failing. Envelope.Stream, Filter.Stream and Stats.ByStream are
	// checked all the same.
	NoStreams bool
}

// Clock is a settable clock for Config.Now, safe for concurrent use.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock returns a clock set to t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestSchedule is the schedule the cases use: no jitter, so retry times
// are exact.
var TestSchedule = queue.Schedule{Min: time.Minute, Max: 8 * time.Minute, Factor: 2, Jitter: -1, MaxAge: time.Hour}

// start is the fixed time every case starts at.
var start = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// fixture is one case's backend and clock.
type fixture struct {
	t     *testing.T
	h     Harness
	clock *Clock
	q     queue.Queue
	ctx   context.Context
}

func newFixture(t *testing.T, maker func(t *testing.T) Harness) *fixture {
	t.Helper()
	f := &fixture{t: t, h: maker(t), clock: NewClock(start), ctx: context.Background()}
	f.open()
	t.Cleanup(func() {
		if f.q != nil {
			f.q.Close()
		}
		f.h.Close()
	})
	return f
}

func (f *fixture) open() {
	f.t.Helper()
	q, err := f.h.Open(f.ctx, Config{Schedule: TestSchedule, Now: f.clock.Now})
	if err != nil {
		f.t.Fatalf("Open: %v", err)
	}
	f.q = q
}

// reopen closes the queue and opens the storage again.
func (f *fixture) reopen() {
	f.t.Helper()
	if err := f.q.Close(); err != nil {
		f.t.Fatalf("Close: %v", err)
	}
	f.q = nil
	f.open()
}

// Run runs the conformance cases against the backend that newHarness
// makes, one fresh harness per case.
func Run(t *testing.T, caps Capabilities, newHarness func(t *testing.T) Harness) {
	if caps.LargeBody == 0 {
		caps.LargeBody = 8 << 20
	}
	for _, c := range slices.Concat(cases, streamCases) {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			if c.durable && !caps.Durable {
				t.Skip("backend is not Durable (Capabilities.Durable is false)")
			}
			c.run(t, newFixture(t, newHarness), caps)
		})
	}
}

type testCase struct {
	name    string
	durable bool
	run     func(t *testing.T, f *fixture, caps Capabilities)
}
