package queuetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

// Stream helpers.

// streamEnvelope is envelope with Envelope.Stream set.
func streamEnvelope(stream, from string, to ...string) *queue.Envelope {
	e := envelope(from, to...)
	e.Stream = stream
	return e
}

// streams returns the backend's StreamLeaser. A backend without one fails
// the case, unless Capabilities.NoStreams says so, which skips it.
func (f *fixture) streams(caps Capabilities) queue.StreamLeaser {
	f.t.Helper()
	sl, ok := f.q.(queue.StreamLeaser)
	if !ok {
		if caps.NoStreams {
			f.t.Skip("backend does not lease by stream (Capabilities.NoStreams)")
		}
		f.t.Fatalf("%T does not implement queue.StreamLeaser; set Capabilities.NoStreams if it cannot", f.q)
	}
	return sl
}

// leaseStream leases what is due now in stream; it fails the test if
// nothing is, or if a lease is of another stream.
func (f *fixture) leaseStream(sl queue.StreamLeaser, stream string, max int, d time.Duration) []*queue.Lease {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, 20*time.Second)
	defer cancel()
	ls, err := sl.LeaseStream(ctx, stream, max, d)
	if err != nil {
		f.t.Fatalf("LeaseStream(%q): %v (a due message was expected)", stream, err)
	}
	if len(ls) == 0 {
		f.t.Fatalf("LeaseStream(%q) returned no leases and no error", stream)
	}
	for _, l := range ls {
		if got := l.Message.Envelope.StreamName(); got != stream {
			f.t.Fatalf("LeaseStream(%q) leased %s of stream %q", stream, l.Message.ID, got)
		}
	}
	return ls
}

// leaseStreamOne leases the one due message of stream, which must be id.
func (f *fixture) leaseStreamOne(sl queue.StreamLeaser, stream string, id queue.ID, d time.Duration) *queue.Lease {
	f.t.Helper()
	ls := f.leaseStream(sl, stream, 1, d)
	if ls[0].Message.ID != id {
		f.t.Fatalf("LeaseStream(%q) leased %s, want %s", stream, ls[0].Message.ID, id)
	}
	return ls[0]
}

// leaseAllOf leases from stream (every stream with lease, when sl is nil)
// until the IDs leased are exactly want, and returns the leases by ID.
func (f *fixture) leaseAllOf(sl queue.StreamLeaser, stream string, want ...queue.ID) map[queue.ID]*queue.Lease {
	f.t.Helper()
	got := map[queue.ID]*queue.Lease{}
	for len(got) < len(want) {
		var ls []*queue.Lease
		if sl == nil {
			ls = f.lease(len(want), time.Hour)
		} else {
			ls = f.leaseStream(sl, stream, len(want), time.Hour)
		}
		for _, l := range ls {
			if !slices.Contains(want, l.Message.ID) {
				f.t.Fatalf("leased %s (stream %q), want only %v", l.Message.ID, l.Message.Envelope.Stream, want)
			}
			if got[l.Message.ID] != nil {
				f.t.Fatalf("%s leased twice", l.Message.ID)
			}
			got[l.Message.ID] = l
		}
	}
	return got
}

// noLeaseStream checks that nothing is due in stream: LeaseStream must
// block until its context ends.
func (f *fixture) noLeaseStream(sl queue.StreamLeaser, stream string) {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, 100*time.Millisecond)
	defer cancel()
	ls, err := sl.LeaseStream(ctx, stream, 10, time.Minute)
	if len(ls) > 0 {
		f.t.Fatalf("LeaseStream(%q) returned %s (stream %q), but nothing of the stream should be due", stream, ls[0].Message.ID, ls[0].Message.Envelope.Stream)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		f.t.Fatalf("LeaseStream(%q) with nothing due returned %v, want context.DeadlineExceeded", stream, err)
	}
}

// enqueueMany enqueues n messages of stream from several goroutines.
func (f *fixture) enqueueMany(stream string, n int) []queue.ID {
	f.t.Helper()
	ids := make([]queue.ID, n)
	var wg sync.WaitGroup
	const workers = 8
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += workers {
				id, err := f.q.Enqueue(f.ctx, streamEnvelope(stream, "s@example.test", fmt.Sprintf("r%d@%s.test", i, stream)), strings.NewReader("x"))
				if err != nil {
					f.t.Errorf("Enqueue: %v", err)
					return
				}
				ids[i] = id
			}
		}()
	}
	wg.Wait()
	if f.t.Failed() {
		f.t.FailNow()
	}
	return ids
}

const bulk = "bulk"

// streamCases check streams: Envelope.Stream kept, LeaseStream leasing
// only its stream (with DefaultStream covering Stream ""), Lease still
// leasing every stream, the lease rules per stream, Filter.Stream and the
// stream and age statistics.
var streamCases = []testCase{
	{name: "Stream_EnvelopeKept_GetListLease", run: func(t *testing.T, f *fixture, caps Capabilities) {
		b := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		sbEnv := streamEnvelope(bulk, "s@example.test", "r@example.test")
		sbEnv.Held, sbEnv.Sandbox, sbEnv.Identity = true, true, "sandboxed"
		sb := f.enqueue(sbEnv, "sandbox")
		check := func(when string) {
			t.Helper()
			want := map[queue.ID]queue.Envelope{b: {Stream: bulk}, x: {}, sb: {Stream: bulk, Held: true, Sandbox: true, Identity: "sandboxed"}}
			for id, w := range want {
				m := f.get(id)
				e := m.Envelope
				if e.Stream != w.Stream || e.Held != w.Held || e.Sandbox != w.Sandbox || e.Identity != w.Identity {
					t.Errorf("%s: Get(%s) envelope has Stream %q Held %v Sandbox %v Identity %q, want %q %v %v %q",
						when, id, e.Stream, e.Held, e.Sandbox, e.Identity, w.Stream, w.Held, w.Sandbox, w.Identity)
				}
			}
			if s := f.get(sb).State; s != queue.StateHeld {
				t.Errorf("%s: sandbox message is %v, want held", when, s)
			}
			seen := 0
			err := f.q.List(f.ctx, queue.Filter{}, func(m *queue.Message) error {
				seen++
				if w, ok := want[m.ID]; !ok || m.Envelope.Stream != w.Stream || m.Envelope.Sandbox != w.Sandbox {
					t.Errorf("%s: List shows %s with Stream %q Sandbox %v", when, m.ID, m.Envelope.Stream, m.Envelope.Sandbox)
				}
				return nil
			})
			if err != nil || seen != 3 {
				t.Errorf("%s: List saw %d messages (%v), want 3", when, seen, err)
			}
		}
		check("before reopen")
		if caps.Durable {
			f.reopen()
			check("after reopen")
		}
		for id, l := range f.leaseAllOf(nil, "", b, x) {
			if want := map[queue.ID]string{b: bulk, x: ""}[id]; l.Message.Envelope.Stream != want {
				t.Errorf("leased %s has Stream %q, want %q", id, l.Message.Envelope.Stream, want)
			}
		}
	}},
	{name: "Stream_LeaseStream_OnlyItsStream", run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		var bs []queue.ID
		for range 3 {
			bs = append(bs, f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b"))
		}
		x1 := f.enqueue(envelope("s@example.test", "r@example.test"), "x1") // Stream "": DefaultStream
		x2 := f.enqueue(streamEnvelope(queue.DefaultStream, "s@example.test", "r@example.test"), "x2")
		o := f.enqueue(streamEnvelope("other", "s@example.test", "r@example.test"), "o")
		f.noLeaseStream(sl, "nosuch")
		f.leaseAllOf(sl, bulk, bs...)
		f.noLeaseStream(sl, bulk)
		f.leaseAllOf(sl, queue.DefaultStream, x1, x2)
		f.noLeaseStream(sl, queue.DefaultStream)
		// Lease still leases every stream.
		f.leaseAllOf(nil, "", o)
		f.noLease()
		f.noLeaseStream(sl, "other")
	}},
	{name: "Stream_Lease_AllStreams", run: func(t *testing.T, f *fixture, caps Capabilities) {
		b := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		o := f.enqueue(streamEnvelope("other", "s@example.test", "r@example.test"), "o")
		f.leaseAllOf(nil, "", b, x, o)
		f.noLease()
	}},
	{name: "Stream_BulkBacklog_TransactionalAtOnce", run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		const n = 200
		f.enqueueMany(bulk, n)
		// The transactional message arrives last and is due last: a
		// queue that leases in due order would hand out every bulk
		// message first.
		f.clock.Advance(time.Minute)
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		t0 := time.Now()
		f.leaseStreamOne(sl, queue.DefaultStream, x, time.Minute)
		t.Logf("LeaseStream(%q) with %d due bulk messages took %v", queue.DefaultStream, n, time.Since(t0))
		f.noLeaseStream(sl, queue.DefaultStream)
		// Lease still takes bulk, and LeaseStream(bulk) all of it.
		if ls := f.lease(1, time.Minute); ls[0].Message.Envelope.Stream != bulk {
			t.Fatalf("Lease leased %s of stream %q, want a bulk message", ls[0].Message.ID, ls[0].Message.Envelope.Stream)
		}
		left := n - 1
		for left > 0 {
			left -= len(f.leaseStream(sl, bulk, left, time.Minute))
		}
		if left < 0 {
			t.Fatalf("LeaseStream(bulk) leased %d messages too many", -left)
		}
		f.noLeaseStream(sl, bulk)
		f.noLease()
	}},
	{name: "Stream_LeaseStream_BlocksUntilItsStreamEnqueued", run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		type result struct {
			ls  []*queue.Lease
			err error
		}
		got := make(chan result, 1)
		go func() {
			ls, err := sl.LeaseStream(f.ctx, queue.DefaultStream, 10, time.Minute)
			got <- result{ls, err}
		}()
		b := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		r := <-got
		if r.err != nil || len(r.ls) != 1 || r.ls[0].Message.ID != x {
			t.Fatalf("blocked LeaseStream returned %d leases, %v; want only the transactional %s (not the bulk %s)", len(r.ls), r.err, x, b)
		}
		f.leaseStreamOne(sl, bulk, b, time.Minute)
		ctx, cancel := context.WithCancel(f.ctx)
		errc := make(chan error, 1)
		go func() {
			_, err := sl.LeaseStream(ctx, bulk, 1, time.Minute)
			errc <- err
		}()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("LeaseStream = %v after cancel, want context.Canceled", err)
		}
	}},
	{name: "Stream_CompetingWorkers_EachMessageOnce", run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		const n = 30
		want := map[queue.ID]string{}
		for _, s := range []string{bulk, queue.DefaultStream, "other"} {
			for _, id := range f.enqueueMany(s, n) {
				want[id] = s
			}
		}
		ctx, cancel := context.WithCancel(f.ctx)
		defer cancel()
		var mu sync.Mutex
		seen := map[queue.ID]int{}
		var wg sync.WaitGroup
		// Two workers per stream and two over every stream.
		for _, stream := range []string{bulk, bulk, queue.DefaultStream, queue.DefaultStream, "", ""} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					var ls []*queue.Lease
					var err error
					if stream == "" {
						ls, err = f.q.Lease(ctx, 3, time.Hour)
					} else {
						ls, err = sl.LeaseStream(ctx, stream, 3, time.Hour)
					}
					if err != nil {
						if ctx.Err() == nil {
							t.Errorf("lease of %q: %v", stream, err)
						}
						return
					}
					mu.Lock()
					for _, l := range ls {
						seen[l.Message.ID]++
						if stream != "" && want[l.Message.ID] != stream {
							t.Errorf("LeaseStream(%q) leased %s of stream %q", stream, l.Message.ID, want[l.Message.ID])
						}
					}
					if len(seen) == len(want) {
						cancel()
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if len(seen) != len(want) {
			t.Fatalf("%d distinct messages leased, want %d", len(seen), len(want))
		}
		for id, c := range seen {
			if c != 1 {
				t.Errorf("%s leased %d times", id, c)
			}
		}
		f.noLease()
	}},
	{name: "Stream_ExpirySettleRetryHoldRelease", run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		b := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		lb := f.leaseStreamOne(sl, bulk, b, time.Minute)
		f.noLeaseStream(sl, bulk)
		lx := f.leaseStreamOne(sl, queue.DefaultStream, x, 10*time.Minute)

		// The bulk lease expires; the transactional one does not.
		f.clock.Advance(time.Minute)
		f.noLeaseStream(sl, queue.DefaultStream)
		lb2 := f.leaseStreamOne(sl, bulk, b, time.Minute)
		if lb2.Token == lb.Token {
			t.Fatal("expired lease re-issued with the same token")
		}
		if _, err := f.q.Settle(f.ctx, lb, []queue.Outcome{delivered("r@example.test")}); !errors.Is(err, queue.ErrLeaseLost) {
			t.Fatalf("Settle of the expired bulk lease = %v, want ErrLeaseLost", err)
		}

		// Retries come back in their own stream at their time.
		f.settle(lb2, retry("r@example.test", 451, "later"))
		f.settle(lx, retry("r@example.test", 451, "later"))
		f.noLeaseStream(sl, bulk)
		f.noLeaseStream(sl, queue.DefaultStream)
		if err := f.q.Hold(f.ctx, b); err != nil {
			t.Fatal(err)
		}
		f.clock.Advance(TestSchedule.Min)
		f.noLeaseStream(sl, bulk) // held
		lx2 := f.leaseStreamOne(sl, queue.DefaultStream, x, time.Minute)
		if err := f.q.Release(f.ctx, b); err != nil {
			t.Fatal(err)
		}
		lb3 := f.leaseStreamOne(sl, bulk, b, time.Minute)
		f.settle(lb3, delivered("r@example.test"))
		f.settle(lx2, delivered("r@example.test"))
		for _, id := range []queue.ID{b, x} {
			if _, err := f.q.Get(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
				t.Errorf("Get(%s) after delivery = %v, want ErrNotFound", id, err)
			}
		}
		f.noLeaseStream(sl, bulk)
		f.noLeaseStream(sl, queue.DefaultStream)
		f.noLease()
	}},
	{name: "Stream_Reopen_LeaseStreamPerStream", durable: true, run: func(t *testing.T, f *fixture, caps Capabilities) {
		sl := f.streams(caps)
		b := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		x := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		f.settle(f.leaseStreamOne(sl, bulk, b, time.Minute), retry("r@example.test", 451, "later"))
		d := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "d")
		f.leaseStreamOne(sl, bulk, d, time.Hour) // the lease ends with the process
		f.reopen()
		sl = f.streams(caps)
		f.leaseStreamOne(sl, bulk, d, time.Hour)
		f.noLeaseStream(sl, bulk)
		f.leaseStreamOne(sl, queue.DefaultStream, x, time.Hour)
		f.clock.Advance(TestSchedule.Min)
		f.leaseStreamOne(sl, bulk, b, time.Minute)
		f.noLeaseStream(sl, bulk)
		f.noLease()
	}},
	{name: "Stream_Filter_ListRetry", run: func(t *testing.T, f *fixture, caps Capabilities) {
		b1 := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b1")
		b2 := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b2")
		x1 := f.enqueue(envelope("s@example.test", "r@example.test"), "x1")
		x2 := f.enqueue(streamEnvelope(queue.DefaultStream, "s@example.test", "r@example.test"), "x2")
		o := f.enqueue(streamEnvelope("other", "s@example.test", "r@example.test"), "o")
		if err := f.q.Hold(f.ctx, b2); err != nil {
			t.Fatal(err)
		}
		checks := []struct {
			f    queue.Filter
			want []queue.ID
		}{
			{queue.Filter{Stream: bulk}, sorted(b1, b2)},
			{queue.Filter{Stream: queue.DefaultStream}, sorted(x1, x2)},
			{queue.Filter{Stream: "other"}, []queue.ID{o}},
			{queue.Filter{Stream: "nosuch"}, nil},
			{queue.Filter{Stream: bulk, State: queue.StateHeld}, []queue.ID{b2}},
			{queue.Filter{Stream: bulk, ID: b1}, []queue.ID{b1}},
			{queue.Filter{Stream: "other", ID: b1}, nil},
		}
		for _, ck := range checks {
			if got := f.list(ck.f); !slices.Equal(got, ck.want) {
				t.Errorf("List(%+v) = %v, want %v", ck.f, got, ck.want)
			}
		}
		if err := f.q.Release(f.ctx, b2); err != nil {
			t.Fatal(err)
		}
		for _, l := range f.leaseAllOf(nil, "", b1, b2, x1, x2, o) {
			f.settle(l, retry("r@example.test", 451, "later"))
		}
		f.noLease()
		if n, err := f.q.Retry(f.ctx, queue.Filter{Stream: bulk}); err != nil || n != 2 {
			t.Fatalf("Retry(Stream bulk) = %d, %v; want 2", n, err)
		}
		f.leaseAllOf(nil, "", b1, b2)
		f.noLease()
		if n, err := f.q.Retry(f.ctx, queue.Filter{Stream: queue.DefaultStream}); err != nil || n != 2 {
			t.Fatalf("Retry(Stream %s) = %d, %v; want 2", queue.DefaultStream, n, err)
		}
		f.leaseAllOf(nil, "", x1, x2)
		f.noLease()
	}},
	{name: "Stream_Stats_ByStreamAndOldest", run: func(t *testing.T, f *fixture, caps Capabilities) {
		if s := f.stats(); len(s.ByStream) != 0 || len(s.Oldest) != 0 {
			t.Fatalf("empty queue: ByStream %v Oldest %v, want both empty", s.ByStream, s.Oldest)
		}
		// At start: a, deferred. A minute later: c leased (for an hour),
		// b queued. Two minutes: d queued, h held. Three minutes: e
		// queued.
		a := f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "a")
		f.settle(f.leaseOne(a), retry("r@example.test", 451, "later"))
		f.clock.Advance(time.Minute)
		c := f.enqueue(envelope("s@example.test", "r@example.test"), "c")
		for _, l := range f.leaseAllOf(nil, "", a, c) { // a is due again
			if l.Message.ID == a {
				f.settle(l, retry("r@example.test", 451, "later"))
			}
		}
		f.enqueue(streamEnvelope(bulk, "s@example.test", "r@example.test"), "b")
		f.clock.Advance(time.Minute)
		f.enqueue(streamEnvelope("other", "s@example.test", "r@example.test"), "d")
		hEnv := streamEnvelope(queue.DefaultStream, "s@example.test", "r@example.test")
		hEnv.Held, hEnv.Sandbox = true, true
		f.enqueue(hEnv, "h")
		f.clock.Advance(time.Minute)
		f.enqueue(envelope("s@example.test", "r@example.test"), "e")

		at := func(m int) time.Time { return start.Add(time.Duration(m) * time.Minute) }
		check := func(when string, byState map[queue.State]int, oldest map[queue.State]time.Time) {
			t.Helper()
			s := f.stats()
			wantStream := map[string]int{bulk: 2, queue.DefaultStream: 3, "other": 1}
			if !mapsEqual(s.ByStream, wantStream) {
				t.Errorf("%s: ByStream = %v, want %v", when, s.ByStream, wantStream)
			}
			for st, n := range byState {
				if s.ByState[st] != n {
					t.Errorf("%s: ByState = %v, want %v", when, s.ByState, byState)
					break
				}
			}
			if len(s.Oldest) != len(oldest) {
				t.Errorf("%s: Oldest = %v, want %v", when, s.Oldest, oldest)
			}
			for st, w := range oldest {
				if got, ok := s.Oldest[st]; !ok || !got.Equal(w) {
					t.Errorf("%s: Oldest[%v] = %v, want %v", when, st, got, w)
				}
			}
		}
		check("c leased", map[queue.State]int{queue.StateQueued: 3, queue.StateDeferred: 1, queue.StateLeased: 1, queue.StateHeld: 1},
			map[queue.State]time.Time{queue.StateQueued: at(1), queue.StateDeferred: at(0), queue.StateLeased: at(1), queue.StateHeld: at(2)})
		// c's lease (an hour) expires: c is queued again, received at 1.
		f.clock.Advance(time.Hour - 2*time.Minute)
		after := map[queue.State]int{queue.StateQueued: 4, queue.StateDeferred: 1, queue.StateLeased: 0, queue.StateHeld: 1}
		oldest := map[queue.State]time.Time{queue.StateQueued: at(1), queue.StateDeferred: at(0), queue.StateHeld: at(2)}
		check("lease expired", after, oldest)
		if caps.Durable {
			f.reopen()
			check("after reopen", after, oldest)
		}
	}},
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}
