package jetstream

import (
	"container/heap"
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/internal/iheap"
	"github.com/batonmail/baton/queue"
)

// index is this process's view of when each queued message is next due,
// kept current by a watch on the records bucket. It only guides Lease to
// candidates: the records bucket decides who gets a lease (Update with the
// last revision), so a stale index costs a wasted request, never a double
// lease. Each stream has a heap ordered by due time, which finds the
// stream's due messages without looking at other messages (of that stream
// or any other), and a heap of streams ordered by their earliest entry
// serves Lease over every stream. Heap entries are checked against the map
// when they come up, so an entry made stale by a newer revision is simply
// dropped.
type index struct {
	mu       sync.Mutex
	m        map[queue.ID]ientry
	streams  map[string]*istream
	tops     iheap.Heap[*istream] // streams with a non-empty heap, earliest first
	nh       int                  // entries in every stream's heap, stale ones included
	claiming map[queue.ID]bool    // leases being taken by this process
	// waits describes the Lease calls waiting, per stream ("" for those
	// of every stream).
	waits map[string]*waitState
	wake  chan struct{} // closed when something may be due sooner than planned
}

// ientry is the little the index keeps per message.
type ientry struct {
	rev   uint64
	held  bool
	until time.Time // lease expiry, zero when not leased
	next  time.Time // earliest NextAttempt of a pending recipient; zero if none
	s     *istream  // the message's stream
}

// istream is the part of the index for one stream.
type istream struct {
	name string
	h    dueHeap
	n    int // messages of the stream in the map
	ti   int // index in tops, -1 when h is empty
}

// waitState counts the Lease calls waiting for one stream and the latest
// time any of them planned to look again since the last signal: a message
// due at or before it may be one a waiter would otherwise sleep through.
type waitState struct {
	n    int
	plan time.Time
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

// Less orders streams with a non-empty heap by the time at its top, in
// index.tops.
func (s *istream) Less(o *istream) bool { return s.h[0].at.Before(o.h[0].at) }

// SetIndex records s's place in index.tops.
func (s *istream) SetIndex(i int) { s.ti = i }

func newIndex() *index {
	return &index{
		m:        make(map[queue.ID]ientry),
		streams:  make(map[string]*istream),
		claiming: make(map[queue.ID]bool),
		waits:    make(map[string]*waitState),
		wake:     make(chan struct{}),
	}
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

// stream returns the index of a stream, creating it. Called with mu held.
func (x *index) stream(name string) *istream {
	s := x.streams[name]
	if s == nil {
		s = &istream{name: name, ti: -1}
		x.streams[name] = s
	}
	return s
}

// fixTop restores s's place in tops after its heap changed. Called with
// mu held.
func (x *index) fixTop(s *istream) {
	iheap.Place(&x.tops, s, s.ti, len(s.h) > 0)
}

// source returns the heap Lease of stream takes from: the stream's, or
// for "" the one whose top is earliest; nil when it is empty. Called with
// mu held.
func (x *index) source(stream string) *istream {
	if stream == "" {
		if len(x.tops) == 0 {
			return nil
		}
		return x.tops[0]
	}
	if s := x.streams[stream]; s != nil && len(s.h) > 0 {
		return s
	}
	return nil
}

// pop removes the top of s's heap. Called with mu held.
func (x *index) pop(s *istream) {
	heap.Pop(&s.h)
	x.nh--
	x.fixTop(s)
}

// push puts a message's current entry on its stream's heap if it can
// become due. Called with mu held.
func (x *index) push(id queue.ID, e ientry) {
	t := e.dueAt()
	if t.IsZero() {
		return
	}
	heap.Push(&e.s.h, hent{at: t, id: id, rev: e.rev})
	x.nh++
	x.fixTop(e.s)
	for _, key := range [2]string{e.s.name, ""} {
		if w := x.waits[key]; w != nil && w.n > 0 && !t.After(w.plan) {
			x.signal()
			break
		}
	}
	if x.nh > 2*len(x.m)+1024 {
		x.rebuild()
	}
}

// rebuild drops the stale entries from the heaps, and the streams left
// without messages. Called with mu held.
func (x *index) rebuild() {
	x.nh = 0
	for name, s := range x.streams {
		h := s.h[:0]
		for _, he := range s.h {
			if x.valid(he) {
				h = append(h, he)
			}
		}
		clear(s.h[len(h):])
		s.h = h
		heap.Init(&s.h)
		x.nh += len(h)
		if s.n == 0 && len(h) == 0 {
			delete(x.streams, name)
		}
	}
	x.tops = x.tops[:0]
	for _, s := range x.streams {
		s.ti = -1
		if len(s.h) > 0 {
			x.tops = append(x.tops, s)
		}
	}
	heap.Init(&x.tops)
	for i, s := range x.tops {
		s.ti = i
	}
}

// put records revision rev of a message, unless the index already has a
// newer one.
func (x *index) put(id queue.ID, rev uint64, r *record) {
	x.mu.Lock()
	defer x.mu.Unlock()
	old, ok := x.m[id]
	if ok && old.rev >= rev {
		return
	}
	e := entryOf(rev, r)
	// The stream of a message never changes; look it up only for a new
	// one.
	if name := r.Msg.Envelope.StreamName(); ok && old.s.name == name {
		e.s = old.s
	} else {
		if ok {
			old.s.n--
		}
		e.s = x.stream(name)
		e.s.n++
	}
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
		old.s.n--
	}
}

// signal wakes every waiting Lease. Called with mu held.
func (x *index) signal() {
	close(x.wake)
	x.wake = make(chan struct{})
	for _, w := range x.waits {
		w.plan = time.Time{}
	}
}

// candidates returns up to n messages of stream (of every stream when it
// is "") that look due at now, earliest first, and marks them as being
// claimed; the caller calls claimed for each. When there are none it
// returns the time something next looks due (limit if nothing does
// sooner) and a channel that is closed if that changes; the caller then
// calls unwait(stream) once done waiting.
func (x *index) candidates(stream string, now time.Time, n int, limit time.Time) ([]queue.ID, <-chan struct{}, time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var ids []queue.ID
	for len(ids) < n {
		s := x.source(stream)
		if s == nil {
			break
		}
		he := s.h[0]
		if !x.valid(he) || x.claiming[he.id] {
			// Stale, or another Lease call of this process has it
			// (and puts it back if it fails).
			x.pop(s)
			continue
		}
		if he.at.After(now) {
			break
		}
		x.pop(s)
		ids = append(ids, he.id)
		x.claiming[he.id] = true
	}
	if len(ids) > 0 {
		return ids, nil, time.Time{}
	}
	next := limit
	if s := x.source(stream); s != nil && s.h[0].at.Before(next) {
		next = s.h[0].at
	}
	w := x.waits[stream]
	if w == nil {
		w = &waitState{}
		x.waits[stream] = w
	}
	w.n++
	if next.After(w.plan) {
		w.plan = next
	}
	return nil, x.wake, next
}

// unwait ends a wait that candidates(stream, ...) started.
func (x *index) unwait(stream string) {
	x.mu.Lock()
	defer x.mu.Unlock()
	if w := x.waits[stream]; w != nil {
		if w.n--; w.n <= 0 {
			delete(x.waits, stream)
		}
	}
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
