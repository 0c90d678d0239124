package queue

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"time"
)

// view reads a message and overlays what only the index knows (a live
// lease). It returns ErrNotFound for unknown IDs.
func (q *Dir) view(id ID) (*Message, error) {
	if q.isClosed() {
		return nil, ErrClosed
	}
	if !validID(id) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	mu := q.stripe(id)
	mu.Lock()
	q.mu.Lock()
	e, ok := q.idx[id]
	q.mu.Unlock()
	if !ok {
		mu.Unlock()
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	dm, err := q.read(e)
	mu.Unlock()
	if err != nil {
		return nil, err
	}
	m := dm.msg
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.idx[id] != e {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	m.State = e.state(q.cfg.Now())
	return m, nil
}

// Get implements Admin.
func (q *Dir) Get(ctx context.Context, id ID) (*Message, error) {
	return q.view(id)
}

// List implements Admin. It walks a copy of the index (IDs only) and reads
// each candidate from disk, so memory stays small for large queues; the
// state, stream and received-time filters are applied from the index
// before any file is read.
func (q *Dir) List(ctx context.Context, f Filter, fn func(*Message) error) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return ErrClosed
	}
	now := q.cfg.Now()
	var ids []ID
	if f.ID != "" {
		if _, ok := q.idx[f.ID]; ok {
			ids = append(ids, f.ID)
		}
	} else {
		ids = make([]ID, 0, len(q.idx))
		for id, e := range q.idx {
			if e.match(&f, now) {
				ids = append(ids, id)
			}
		}
	}
	q.mu.Unlock()
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return err
		}
		m, err := q.view(id)
		if errors.Is(err, ErrNotFound) {
			continue // removed meanwhile
		}
		if err != nil {
			if errors.Is(err, errCorrupt) {
				q.dropCorrupt(id, err)
				continue
			}
			return err
		}
		if !f.Match(m) {
			continue
		}
		if err := fn(m); err != nil {
			return err
		}
	}
	return nil
}

// match reports whether the message of e may be selected by f, judging by
// what the index knows (state, stream, received time); Filter.Match on the
// message read from disk decides. Callers hold mu.
func (e *dirEntry) match(f *Filter, now time.Time) bool {
	if f.State != 0 && e.state(now) != f.State {
		return false
	}
	if f.Stream != "" && e.stream.name != f.Stream {
		return false
	}
	if !f.ReceivedBefore.IsZero() && e.received >= f.ReceivedBefore.UnixNano() {
		return false
	}
	return true
}

// dropCorrupt removes a damaged message from the index and quarantines its
// file.
func (q *Dir) dropCorrupt(id ID, cause error) {
	mu := q.stripe(id)
	mu.Lock()
	defer mu.Unlock()
	q.mu.Lock()
	e, ok := q.idx[id]
	if ok {
		q.remove(e)
	}
	q.mu.Unlock()
	if ok {
		q.quarantineEntry(e, cause)
	}
}

// update reads a message under its stripe lock, lets change modify it (and
// its hold state) and appends the difference to the file. change returns
// false to leave the message alone. The index entry is refreshed.
func (q *Dir) update(id ID, sync bool, change func(m *Message, held *bool, e *dirEntry) bool) error {
	e, unlock, err := q.lockEntry(id)
	if err != nil {
		return err
	}
	defer unlock()
	dm, err := q.read(e)
	if err != nil {
		if errors.Is(err, errCorrupt) {
			q.mu.Lock()
			q.remove(e)
			q.mu.Unlock()
			q.quarantineEntry(e, err)
		}
		return err
	}
	m := dm.msg
	old := m.Clone()
	held := dm.held
	q.mu.Lock()
	if e.lease != nil {
		e.lease.dm = nil // the file changes under the lease
	}
	q.dropFresh(e)
	ok := change(m, &held, e)
	q.mu.Unlock()
	if !ok {
		return nil
	}
	if rec := diffState(old, m, dm.held, held); rec != nil {
		if err := q.copyOut(e); err != nil {
			return err
		}
		if err := q.appendState(id, dm, rec, sync); err != nil {
			return err
		}
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.idx[id] != e {
		return nil
	}
	e.held = held
	q.countDomains(old, -1)
	q.countDomains(m, 1)
	q.refresh(e, m)
	q.signal()
	return nil
}

// Hold implements Admin. The hold is durable when Hold returns.
func (q *Dir) Hold(ctx context.Context, id ID) error {
	return q.update(id, true, func(m *Message, held *bool, e *dirEntry) bool {
		if *held {
			return false
		}
		*held = true
		return true
	})
}

// Release implements Admin. The release is durable when Release returns.
func (q *Dir) Release(ctx context.Context, id ID) error {
	now := q.cfg.Now()
	return q.update(id, true, func(m *Message, held *bool, e *dirEntry) bool {
		if !*held {
			return false
		}
		*held = false
		RetryNow(m, "", now)
		return true
	})
}

// lockEntry takes the stripe lock of a message and returns its index
// entry; unlock releases the stripe.
func (q *Dir) lockEntry(id ID) (e *dirEntry, unlock func(), err error) {
	if !validID(id) {
		return nil, nil, fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	mu := q.stripe(id)
	mu.Lock()
	q.mu.Lock()
	closed := q.closed
	e, ok := q.idx[id]
	q.mu.Unlock()
	switch {
	case closed:
		err = ErrClosed
	case !ok:
		err = fmt.Errorf("%w: %s", ErrNotFound, id)
	}
	if err != nil {
		mu.Unlock()
		return nil, nil, err
	}
	return e, mu.Unlock, nil
}

// Delete implements Admin. The removal is durable when Delete returns.
func (q *Dir) Delete(ctx context.Context, id ID) error {
	// Close waits for it, like for Settle: its DONE record must reach
	// the committer before that stops.
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return ErrClosed
	}
	q.settling.Add(1)
	q.mu.Unlock()
	defer q.settling.Done()
	e, unlock, err := q.lockEntry(id)
	if err != nil {
		return err
	}
	defer unlock()
	dm, rerr := q.read(e)
	loc := q.jrnOf(e)
	if loc == nil {
		if err := os.Remove(q.file(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	q.mu.Lock()
	q.remove(e)
	if rerr == nil {
		q.countDomains(dm.msg, -1)
	}
	q.signal()
	q.mu.Unlock()
	// The unlink and the DONE record (the journal's removal) are
	// durable together.
	r := &commitReq{dirSync: loc == nil}
	if q.journalOn() {
		r.rec = doneRecord(id)
	}
	err = q.commit(r)
	// Out of the index, the message is out of its segment's count too,
	// whether or not its DONE record made it to disk.
	q.unjournal(id, loc, false)
	if err != nil && !errors.Is(err, ErrClosed) {
		return err
	}
	return nil
}

// Retry implements Admin. Making mail due sooner cannot lose it, so the
// change is written but not synced: after a crash the old times apply.
func (q *Dir) Retry(ctx context.Context, f Filter) (int, error) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return 0, ErrClosed
	}
	now := q.cfg.Now()
	var ids []ID
	if f.ID != "" {
		if e, ok := q.idx[f.ID]; ok && !e.held {
			ids = append(ids, f.ID)
		}
	} else {
		for id, e := range q.idx {
			if !e.held && e.match(&f, now) {
				ids = append(ids, id)
			}
		}
	}
	q.mu.Unlock()
	n := 0
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return n, err
		}
		err := q.update(id, false, func(m *Message, held *bool, e *dirEntry) bool {
			m.State = e.state(now)
			if *held || !f.Match(m) {
				return false
			}
			n++
			RetryNow(m, f.Domain, now)
			return true
		})
		if err != nil && !errors.Is(err, ErrNotFound) && !errors.Is(err, errCorrupt) {
			return n, err
		}
	}
	return n, nil
}

// Stats implements Admin. It is computed from the in-memory index, one
// pass over it without reading any file. Quarantined counts the files in
// the quarantine directory.
func (q *Dir) Stats(ctx context.Context) (*Stats, error) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, ErrClosed
	}
	now := q.cfg.Now()
	s := &Stats{
		ByState:  map[State]int{},
		ByDomain: make(map[string]int, len(q.domains)),
		ByStream: make(map[string]int, len(q.streams)),
		Oldest:   map[State]time.Time{},
	}
	var oldest [StateHeld + 1]int64
	var seen [StateHeld + 1]bool
	for _, e := range q.idx {
		st := e.state(now)
		s.ByState[st]++
		if !seen[st] || e.received < oldest[st] {
			oldest[st], seen[st] = e.received, true
		}
	}
	for st := range oldest {
		if seen[st] {
			s.Oldest[State(st)] = time.Unix(0, oldest[st]).In(now.Location())
		}
	}
	for name, st := range q.streams {
		s.ByStream[name] = st.n
	}
	for d, n := range q.domains {
		s.ByDomain[d] = n
	}
	q.mu.Unlock()
	qs, err := q.Quarantined(ctx)
	if err != nil {
		return nil, err
	}
	s.Quarantined = len(qs)
	return s, nil
}

// QuarantinedFile describes a damaged file that a Dir moved aside.
type QuarantinedFile struct {
	// Name is the file name in the quarantine directory (the message ID,
	// possibly with a suffix).
	Name string
	// Path is the file's full path, for inspection or removal.
	Path string
	// Size is the file size in bytes.
	Size int64
	// Moved is when the file was quarantined.
	Moved time.Time
}

// Quarantined lists the files in the quarantine directory: messages that
// could not be read back. They are not delivered; an operator inspects and
// removes them.
func (q *Dir) Quarantined(ctx context.Context) ([]QuarantinedFile, error) {
	ents, err := os.ReadDir(q.quar)
	if err != nil {
		return nil, err
	}
	var out []QuarantinedFile
	for _, de := range ents {
		fi, err := de.Info()
		if err != nil {
			continue
		}
		out = append(out, QuarantinedFile{Name: de.Name(), Path: q.quar + string(os.PathSeparator) + de.Name(), Size: fi.Size(), Moved: fi.ModTime()})
	}
	return out, nil
}
