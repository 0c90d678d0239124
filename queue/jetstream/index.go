package jetstream

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
)

// index is this process's view of when each queued message is next due,
// kept current by a watch on the records bucket. It only guides Lease to
// candidates: the records bucket decides who gets a lease (Update with the
// last revision), so a stale index costs a wasted request, never a double
// lease.
type index struct {
	mu       sync.Mutex
	m        map[queue.ID]ientry
	claiming map[queue.ID]bool // leases being taken by this process
	waiters  int
	wakeAt   time.Time     // earliest time a waiting Lease plans to look again
	wake     chan struct{} // closed when something may be due before wakeAt
}

// ientry is the little the index keeps per message.
type ientry struct {
	rev   uint64
	held  bool
	until time.Time // lease expiry, zero when not leased
	next  time.Time // earliest NextAttempt of a pending recipient; zero if none
}

func newIndex() *index {
	return &index{m: make(map[queue.ID]ientry), claiming: make(map[queue.ID]bool), wake: make(chan struct{})}
}

func entryOf(rev uint64, r *record) ientry {
	e := ientry{rev: rev, held: r.Msg.State == queue.StateHeld, next: r.Msg.NextAttempt()}
	if r.Token != "" {
		e.until = r.Until
	}
	return e
}

// dueAt is the earliest time the message could be leased; zero for never
// (held, or nothing pending).
func (e ientry) dueAt() time.Time {
	if e.held || e.next.IsZero() {
		return time.Time{}
	}
	if e.until.After(e.next) {
		return e.until
	}
	return e.next
}

// put records revision rev of a message, unless the index already has a
// newer one.
func (x *index) put(id queue.ID, rev uint64, r *record) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if old, ok := x.m[id]; ok && old.rev >= rev {
		return
	}
	e := entryOf(rev, r)
	x.m[id] = e
	if t := e.dueAt(); !t.IsZero() && x.waiters > 0 && (x.wakeAt.IsZero() || !t.After(x.wakeAt)) {
		x.signal()
	}
}

// remove forgets a message that was deleted at revision rev (0: whatever
// the index has).
func (x *index) remove(id queue.ID, rev uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if old, ok := x.m[id]; ok && (rev == 0 || old.rev < rev) {
		delete(x.m, id)
	}
}

// signal wakes every waiting Lease. Called with mu held.
func (x *index) signal() {
	close(x.wake)
	x.wake = make(chan struct{})
	x.wakeAt = time.Time{}
}

// candidates returns up to n messages that look due at now, earliest first,
// and marks them as being claimed. When there are none it returns the
// time something next looks due (zero if nothing will) and a channel that
// is closed if that changes; the caller then must call unwait once done
// waiting.
func (x *index) candidates(now time.Time, n int, limit time.Time) ([]queue.ID, <-chan struct{}, time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	type cand struct {
		id   queue.ID
		next time.Time
	}
	var cs []cand
	next := limit
	for id, e := range x.m {
		t := e.dueAt()
		if t.IsZero() || x.claiming[id] {
			continue
		}
		if t.After(now) {
			if t.Before(next) {
				next = t
			}
			continue
		}
		cs = append(cs, cand{id, e.next})
	}
	if len(cs) == 0 {
		x.waiters++
		if x.wakeAt.IsZero() || next.Before(x.wakeAt) {
			x.wakeAt = next
		}
		return nil, x.wake, next
	}
	slices.SortFunc(cs, func(a, b cand) int { return a.next.Compare(b.next) })
	ids := make([]queue.ID, 0, min(n, len(cs)))
	for _, c := range cs[:min(n, len(cs))] {
		ids = append(ids, c.id)
		x.claiming[c.id] = true
	}
	return ids, nil, time.Time{}
}

func (x *index) unwait() {
	x.mu.Lock()
	x.waiters--
	x.mu.Unlock()
}

func (x *index) claimed(id queue.ID) {
	x.mu.Lock()
	delete(x.claiming, id)
	x.mu.Unlock()
}

// startIndex loads the index from the records bucket and keeps it current
// with a watch until Close.
func (q *Queue) startIndex(ctx context.Context) error {
	w, err := q.kv.WatchAll(context.Background())
	if err != nil {
		return fmt.Errorf("jetstream: watch: %w", err)
	}
	q.watcher = w
	loaded := make(chan struct{})
	q.bg.Add(1)
	go func() {
		defer q.bg.Done()
		first := true
		for e := range w.Updates() {
			if e == nil {
				if first {
					close(loaded)
					first = false
				}
				continue
			}
			q.apply(e)
		}
	}()
	select {
	case <-loaded:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// apply brings one change of the records bucket into the index.
func (q *Queue) apply(e njs.KeyValueEntry) {
	id := queue.ID(e.Key())
	if e.Operation() != njs.KeyValuePut {
		q.idx.remove(id, e.Revision())
		return
	}
	r, err := decodeRecord(e.Value())
	if err != nil {
		q.log.Error("queue record unreadable", "id", id, "err", err)
		return
	}
	q.idx.put(id, e.Revision(), r)
}
