package jetstream

import (
	"container/heap"
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
)

// index is this process's view of when each queued message is next due,
// kept current by a watch on the records bucket. It only guides Lease to
// candidates: the records bucket decides who gets a lease (Update with the
// last revision), so a stale index costs a wasted request, never a double
// lease. A heap ordered by due time finds the due messages without looking
// at the others; its entries are checked against the map when they come
// up, so an entry made stale by a newer revision is simply dropped.
type index struct {
	mu       sync.Mutex
	m        map[queue.ID]ientry
	h        dueHeap
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

// hent is a heap entry: message id at revision rev is due at at.
type hent struct {
	at  time.Time
	id  queue.ID
	rev uint64
}

type dueHeap []hent

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(hent)) }
func (h *dueHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
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

// valid reports whether heap entry he still describes the message.
func (x *index) valid(he hent) bool {
	e, ok := x.m[he.id]
	return ok && e.rev == he.rev
}

// push puts a message's current entry on the heap if it can become due.
// Called with mu held.
func (x *index) push(id queue.ID, e ientry) {
	t := e.dueAt()
	if t.IsZero() {
		return
	}
	heap.Push(&x.h, hent{at: t, id: id, rev: e.rev})
	if x.waiters > 0 && (x.wakeAt.IsZero() || !t.After(x.wakeAt)) {
		x.signal()
	}
	if len(x.h) > 2*len(x.m)+1024 {
		x.rebuild()
	}
}

// rebuild drops the stale entries from the heap. Called with mu held.
func (x *index) rebuild() {
	h := x.h[:0]
	for _, he := range x.h {
		if x.valid(he) {
			h = append(h, he)
		}
	}
	clear(x.h[len(h):])
	x.h = h
	heap.Init(&x.h)
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
	x.push(id, e)
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
// and marks them as being claimed; the caller calls claimed for each. When
// there are none it returns the time something next looks due (limit if
// nothing does sooner) and a channel that is closed if that changes; the
// caller then calls unwait once done waiting.
func (x *index) candidates(now time.Time, n int, limit time.Time) ([]queue.ID, <-chan struct{}, time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var ids []queue.ID
	for len(ids) < n && len(x.h) > 0 {
		he := x.h[0]
		if !x.valid(he) || x.claiming[he.id] {
			// Stale, or another Lease call of this process has it
			// (and puts it back if it fails).
			heap.Pop(&x.h)
			continue
		}
		if he.at.After(now) {
			break
		}
		heap.Pop(&x.h)
		ids = append(ids, he.id)
		x.claiming[he.id] = true
	}
	if len(ids) > 0 {
		return ids, nil, time.Time{}
	}
	next := limit
	if len(x.h) > 0 && x.h[0].at.Before(next) {
		next = x.h[0].at
	}
	x.waiters++
	if x.wakeAt.IsZero() || next.Before(x.wakeAt) {
		x.wakeAt = next
	}
	return nil, x.wake, next
}

func (x *index) unwait() {
	x.mu.Lock()
	x.waiters--
	x.mu.Unlock()
}

// claimed ends a claim that candidates started. When the claim changed
// nothing (it failed, or the message was not due after all) the message
// goes back on the heap under its current entry.
func (x *index) claimed(id queue.ID) {
	x.mu.Lock()
	defer x.mu.Unlock()
	delete(x.claiming, id)
	if e, ok := x.m[id]; ok {
		x.push(id, e)
	}
}

// startIndex loads the index from the records bucket and keeps it current
// with a watch until Close.
func (q *Queue) startIndex(ctx context.Context) error {
	w, err := q.kv.WatchAll(context.Background())
	if err != nil {
		return fmt.Errorf("jetstream: watch: %w", err)
	}
	loaded := make(chan struct{})
	q.bg.Add(1)
	go q.watch(w, loaded)
	select {
	case <-loaded:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// watch applies the changes w reports until Close. When the connection
// comes back after a break, or should w end by itself, it starts a new
// watch, which replays every record (the index takes them as any update):
// the consumer behind a watch may not have survived what broke the
// connection, and would otherwise only be replaced after missing several
// heartbeats.
func (q *Queue) watch(w njs.KeyWatcher, loaded chan struct{}) {
	defer q.bg.Done()
	reconnected := q.nc.StatusChanged(nats.CONNECTED)
	defer q.nc.RemoveStatusListener(reconnected)
	for {
		closed := q.follow(w, loaded, reconnected)
		stopWatcher(w)
		if closed {
			return
		}
		loaded = nil
		for wait := time.Duration(0); ; wait = time.Second {
			t := time.NewTimer(wait)
			select {
			case <-q.closed:
				t.Stop()
				return
			case <-t.C:
			}
			nw, err := q.kv.WatchAll(context.Background())
			if err == nil {
				w = nw
				break
			}
			q.log.Warn("queue: cannot watch the records bucket", "err", err)
		}
	}
}

// follow applies the changes w reports; it returns true on Close and false
// when w ends by itself or the connection was re-established. It closes
// loaded (if not nil) once the records that existed when w started are in
// the index.
func (q *Queue) follow(w njs.KeyWatcher, loaded chan struct{}, reconnected <-chan nats.Status) bool {
	for {
		select {
		case <-q.closed:
			return true
		case <-reconnected:
			q.log.Info("queue: connection re-established; watching the records bucket again")
			return false
		case e, ok := <-w.Updates():
			if !ok {
				if !q.isClosed() {
					q.log.Error("queue: watch of the records bucket ended; starting it again")
				}
				return q.isClosed()
			}
			if e == nil {
				if loaded != nil {
					close(loaded)
					loaded = nil
				}
				continue
			}
			q.apply(e)
		}
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
