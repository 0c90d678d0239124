package jetstream

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"time"

	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
)

// Enqueue implements queue.Queue. It streams the body into the bodies
// stream in chunks, then creates the message's record; the message exists
// (and the ID is returned) only once both are acknowledged by JetStream.
func (q *Queue) Enqueue(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
	if err := env.Validate(); err != nil {
		return "", err
	}
	if q.isClosed() {
		return "", queue.ErrClosed
	}
	id := queue.NewID()
	ref, size, err := q.putBody(ctx, id, ctxReader{ctx, body})
	if err != nil {
		return "", q.fail(err)
	}
	rec := &record{Msg: queue.NewMessage(id, env, size, q.now(), q.cfg.Schedule), Body: ref}
	data, err := rec.encode(q.maxRec)
	if err == nil {
		var rev uint64
		rctx, cancel := q.bounded(ctx)
		rev, err = q.kv.Create(rctx, string(id), data)
		cancel()
		if err == nil {
			q.idx.put(id, rev, rec)
			return id, nil
		}
	}
	// Use a context of its own from here, as ctx may be what failed.
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), q.cfg.Timeout)
	defer cancel()
	if !errors.Is(err, queue.ErrInvalid) {
		// The write may have landed with only its acknowledgement
		// lost: the ID is new, so a record under it is this one.
		if e, gerr := q.kv.Get(dctx, string(id)); gerr == nil {
			if r, derr := decodeRecord(e.Value()); derr == nil {
				q.idx.put(id, e.Revision(), r)
				return id, nil
			}
		}
	}
	// Nothing refers to the body: remove it.
	if derr := q.deleteBody(dctx, id); derr != nil {
		q.log.Warn("queue: cannot remove body of failed enqueue", "id", id, "err", derr)
	}
	return "", q.fail(err)
}

// Lease implements queue.Queue. It takes candidates from the local index
// and claims each one by rewriting its record with a new lease token,
// conditional on the revision it read: when two processes race for a
// message, JetStream accepts exactly one of the writes. Messages of every
// stream are leased earliest due first.
func (q *Queue) Lease(ctx context.Context, n int, d time.Duration) ([]*queue.Lease, error) {
	return q.lease(ctx, "", n, d)
}

// LeaseStream implements queue.StreamLeaser. The index keeps a due heap
// per stream, so a backlog in another stream costs it nothing.
func (q *Queue) LeaseStream(ctx context.Context, stream string, n int, d time.Duration) ([]*queue.Lease, error) {
	return q.lease(ctx, queue.StreamName(stream), n, d)
}

// lease leases due messages of stream, or of every stream when it is "".
func (q *Queue) lease(ctx context.Context, stream string, n int, d time.Duration) ([]*queue.Lease, error) {
	if n <= 0 {
		n = 1
	}
	for {
		if q.isClosed() {
			return nil, queue.ErrClosed
		}
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		now := q.now()
		ids, wake, next := q.idx.candidates(stream, now, n, now.Add(q.maxWait))
		if len(ids) == 0 {
			t := time.NewTimer(min(max(next.Sub(now), time.Millisecond), q.maxWait))
			select {
			case <-ctx.Done():
			case <-q.closed:
			case <-wake:
			case <-t.C:
			}
			t.Stop()
			q.idx.unwait(stream)
			continue
		}
		// Claim the candidates concurrently: each is a read and a
		// conditional write, and on a replicated stream every write
		// waits for a quorum.
		leases := make([]*queue.Lease, len(ids))
		errs := make([]error, len(ids))
		var wg sync.WaitGroup
		for i, id := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				leases[i], errs[i] = q.claim(ctx, id, d)
				q.idx.claimed(id)
			}()
		}
		wg.Wait()
		var out []*queue.Lease
		for _, l := range leases {
			if l != nil {
				out = append(out, l)
			}
		}
		ferr := errors.Join(errs...)
		if len(out) > 0 {
			if ferr != nil {
				q.log.Warn("queue: lease failed", "err", ferr)
			}
			return out, nil
		}
		if ferr != nil {
			return nil, q.fail(errs[slices.IndexFunc(errs, func(e error) bool { return e != nil })])
		}
		// Every candidate was stale or taken by another process; the
		// index has been corrected, so look again.
	}
}

// claim leases one message if it is still due; it returns nil, nil when it
// is not (any more) or another process got it first.
func (q *Queue) claim(ctx context.Context, id queue.ID, d time.Duration) (*queue.Lease, error) {
	e, r, err := q.get(ctx, id)
	if errors.Is(err, queue.ErrNotFound) {
		q.idx.remove(id, 0)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	q.idx.put(id, e.Revision(), r)
	now := q.now()
	if r.Msg.State == queue.StateHeld || r.leased(now) {
		return nil, nil
	}
	due := r.Msg.DueRecipients(now)
	if len(due) == 0 {
		return nil, nil
	}
	r.Token = string(queue.NewID())
	r.Until = now.Add(d)
	r.Node = q.cfg.Node
	r.Msg.State = queue.StateLeased
	data, err := r.encode(q.maxRec)
	if err != nil {
		return nil, err
	}
	rctx, cancel := q.bounded(ctx)
	rev, err := q.kv.Update(rctx, string(id), data, e.Revision())
	cancel()
	if isConflict(err) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	q.idx.put(id, rev, r)
	q.rememberLease(r.Token, rev, data)
	return &queue.Lease{Token: r.Token, Message: r.Msg.Clone(), Due: due, Until: r.Until}, nil
}

// isConflict reports whether err is a conditional write losing to another
// writer.
func isConflict(err error) bool {
	return err != nil && (errors.Is(err, njs.ErrKeyRevisionMismatch) || errors.Is(err, njs.ErrKeyExists))
}

// get reads a message's record.
func (q *Queue) get(ctx context.Context, id queue.ID) (njs.KeyValueEntry, *record, error) {
	if q.isClosed() {
		return nil, nil, queue.ErrClosed
	}
	if !validID(id) {
		return nil, nil, queue.ErrNotFound
	}
	rctx, cancel := q.bounded(ctx)
	e, err := q.kv.Get(rctx, string(id))
	cancel()
	if errors.Is(err, njs.ErrKeyNotFound) || errors.Is(err, njs.ErrKeyDeleted) {
		return nil, nil, queue.ErrNotFound
	}
	if err != nil {
		return nil, nil, q.fail(err)
	}
	r, err := decodeRecord(e.Value())
	if err != nil {
		return nil, nil, err
	}
	return e, r, nil
}

// validID reports whether id can be a key (IDs come from operators too).
func validID(id queue.ID) bool {
	if id == "" || len(id) > 256 {
		return false
	}
	for _, c := range []byte(id) {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// update applies change to a message's record until the write wins over
// concurrent writers. change returns false to leave the record as it is.
// It returns the record as written (or left).
func (q *Queue) update(ctx context.Context, id queue.ID, change func(r *record) (bool, error)) (*record, error) {
	for {
		e, r, err := q.get(ctx, id)
		if err != nil {
			return nil, err
		}
		ok, err := change(r)
		if err != nil || !ok {
			return r, err
		}
		data, err := r.encode(q.maxRec)
		if err != nil {
			return nil, err
		}
		rctx, cancel := q.bounded(ctx)
		rev, err := q.kv.Update(rctx, string(id), data, e.Revision())
		cancel()
		if isConflict(err) {
			continue
		}
		if err != nil {
			return nil, q.fail(err)
		}
		q.idx.put(id, rev, r)
		return r, nil
	}
}

// Settle implements queue.Queue.
func (q *Queue) Settle(ctx context.Context, l *queue.Lease, outcomes []queue.Outcome) (*queue.Message, error) {
	if q.isClosed() {
		return nil, queue.ErrClosed
	}
	id := l.Message.ID
	cached, haveCache := q.forgetLease(l.Token)
	for {
		var r *record
		var rev uint64
		if haveCache {
			// The record as this process wrote it when leasing: if
			// nobody wrote since, the conditional write below
			// succeeds without reading it back first.
			haveCache = false
			var err error
			if r, err = decodeRecord(cached.data); err != nil {
				continue
			}
			rev = cached.rev
		} else {
			e, got, err := q.get(ctx, id)
			if errors.Is(err, queue.ErrNotFound) {
				return nil, queue.ErrLeaseLost
			}
			if err != nil {
				return nil, err
			}
			r, rev = got, e.Revision()
		}
		if r.Token == "" || r.Token != l.Token {
			// Settled already, or expired and leased again.
			return nil, queue.ErrLeaseLost
		}
		now := q.now()
		held := r.Msg.State == queue.StateHeld
		if r.Msg.State == queue.StateLeased {
			r.Msg.State = queue.StateQueued
		}
		done := queue.ApplyOutcomes(r.Msg, outcomes, now, q.cfg.Schedule)
		if held {
			r.Msg.State = queue.StateHeld
		}
		r.Token, r.Until, r.Node = "", time.Time{}, ""
		if done {
			rctx, cancel := q.bounded(ctx)
			err := q.kv.Purge(rctx, string(id), njs.LastRevision(rev), njs.PurgeTTL(markerTTL))
			cancel()
			if isConflict(err) {
				continue
			}
			if err != nil {
				return nil, q.fail(err)
			}
			q.idx.remove(id, 0)
			if err := q.deleteBody(ctx, id); err != nil {
				// The sweep removes it later.
				q.log.Warn("queue: cannot remove body of finished message", "id", id, "err", err)
			}
			return r.Msg.Clone(), nil
		}
		data, err := r.encode(q.maxRec)
		if err != nil {
			return nil, err
		}
		rctx, cancel := q.bounded(ctx)
		nrev, err := q.kv.Update(rctx, string(id), data, rev)
		cancel()
		if isConflict(err) {
			continue
		}
		if err != nil {
			return nil, q.fail(err)
		}
		q.idx.put(id, nrev, r)
		return r.Msg.Clone(), nil
	}
}

// leaseCache is a lease's record as the process that took the lease wrote
// it.
type leaseCache struct {
	rev  uint64
	data []byte
}

// maxLeaseCache bounds the leases remembered; past it they are forgotten
// (Settle then reads the record first, which is only slower).
const maxLeaseCache = 10000

func (q *Queue) rememberLease(token string, rev uint64, data []byte) {
	q.lmu.Lock()
	defer q.lmu.Unlock()
	if len(q.leases) >= maxLeaseCache {
		clear(q.leases)
	}
	q.leases[token] = leaseCache{rev, data}
}

func (q *Queue) forgetLease(token string) (leaseCache, bool) {
	q.lmu.Lock()
	defer q.lmu.Unlock()
	c, ok := q.leases[token]
	delete(q.leases, token)
	return c, ok
}

// Open implements queue.Queue. The body streams from JetStream as it is
// read, one chunk at a time; ctx must stay live until the reader is
// closed.
func (q *Queue) Open(ctx context.Context, id queue.ID) (io.ReadCloser, error) {
	_, r, err := q.get(ctx, id)
	if err != nil {
		return nil, err
	}
	return &bodyReader{ctx: ctx, q: q, id: id, subj: q.bodySubject(id), next: r.Body.First, left: r.Body.Chunks, size: r.Msg.Size}, nil
}

// Get implements queue.Admin.
func (q *Queue) Get(ctx context.Context, id queue.ID) (*queue.Message, error) {
	_, r, err := q.get(ctx, id)
	if err != nil {
		return nil, err
	}
	return r.view(q.now()), nil
}

// scan calls fn with every record in the bucket, streamed by an ordered
// consumer: the records are never all in memory at once.
func (q *Queue) scan(ctx context.Context, fn func(e njs.KeyValueEntry, r *record) error) error {
	if q.isClosed() {
		return queue.ErrClosed
	}
	w, err := q.kv.WatchAll(ctx, njs.IgnoreDeletes())
	if err != nil {
		return q.fail(err)
	}
	defer stopWatcher(w)
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return q.fail(errors.New("jetstream: watch ended"))
			}
			if e == nil {
				return nil // every record seen
			}
			r, err := decodeRecord(e.Value())
			if err != nil {
				q.log.Error("queue record unreadable", "id", e.Key(), "err", err)
				continue
			}
			if err := fn(e, r); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		case <-q.closed:
			return queue.ErrClosed
		}
	}
}

// List implements queue.Admin.
func (q *Queue) List(ctx context.Context, f queue.Filter, fn func(*queue.Message) error) error {
	if f.ID != "" {
		m, err := q.Get(ctx, f.ID)
		if errors.Is(err, queue.ErrNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		if f.Match(m) {
			return fn(m)
		}
		return nil
	}
	return q.scan(ctx, func(_ njs.KeyValueEntry, r *record) error {
		if m := r.view(q.now()); f.Match(m) {
			return fn(m)
		}
		return nil
	})
}

// Hold implements queue.Admin.
func (q *Queue) Hold(ctx context.Context, id queue.ID) error {
	_, err := q.update(ctx, id, func(r *record) (bool, error) {
		if r.Msg.State == queue.StateHeld {
			return false, nil
		}
		r.Msg.State = queue.StateHeld
		return true, nil
	})
	return err
}

// Release implements queue.Admin.
func (q *Queue) Release(ctx context.Context, id queue.ID) error {
	_, err := q.update(ctx, id, func(r *record) (bool, error) {
		if r.Msg.State != queue.StateHeld {
			return false, nil
		}
		now := q.now()
		r.Msg.State = fallbackState(r.Msg)
		if r.Token != "" {
			r.Msg.State = queue.StateLeased
		}
		for i := range r.Msg.Recipients {
			rc := &r.Msg.Recipients[i]
			if rc.State == queue.RcptPending && rc.NextAttempt.After(now) {
				rc.NextAttempt = now
			}
		}
		return true, nil
	})
	return err
}

// Delete implements queue.Admin. A worker holding a lease on the message
// gets ErrLeaseLost when it settles.
func (q *Queue) Delete(ctx context.Context, id queue.ID) error {
	for {
		e, _, err := q.get(ctx, id)
		if err != nil {
			return err
		}
		rctx, cancel := q.bounded(ctx)
		err = q.kv.Purge(rctx, string(id), njs.LastRevision(e.Revision()), njs.PurgeTTL(markerTTL))
		cancel()
		if isConflict(err) {
			continue
		}
		if err != nil {
			return q.fail(err)
		}
		q.idx.remove(id, 0)
		if err := q.deleteBody(ctx, id); err != nil {
			q.log.Warn("queue: cannot remove body of deleted message", "id", id, "err", err)
		}
		return nil
	}
}

// Retry implements queue.Admin.
func (q *Queue) Retry(ctx context.Context, f queue.Filter) (int, error) {
	n := 0
	match := func(r *record) bool {
		return r.Msg.State != queue.StateHeld && f.Match(r.view(q.now()))
	}
	retry := func(id queue.ID) error {
		touched := false
		_, err := q.update(ctx, id, func(r *record) (bool, error) {
			if !match(r) {
				touched = false
				return false, nil
			}
			touched = true
			before := make([]time.Time, len(r.Msg.Recipients))
			for i, rc := range r.Msg.Recipients {
				before[i] = rc.NextAttempt
			}
			queue.RetryNow(r.Msg, f.Domain, q.now())
			for i, rc := range r.Msg.Recipients {
				if !rc.NextAttempt.Equal(before[i]) {
					return true, nil
				}
			}
			return false, nil
		})
		if errors.Is(err, queue.ErrNotFound) {
			return nil
		}
		if touched && err == nil {
			n++
		}
		return err
	}
	var err error
	if f.ID != "" {
		err = retry(f.ID)
	} else {
		err = q.scan(ctx, func(e njs.KeyValueEntry, r *record) error {
			if !match(r) {
				return nil
			}
			return retry(queue.ID(e.Key()))
		})
	}
	return n, err
}

// reclaim ends the leases that an earlier process with this Node left
// behind: that process is gone, so its messages are due again at once.
func (q *Queue) reclaim(ctx context.Context) error {
	n := 0
	err := q.scan(ctx, func(e njs.KeyValueEntry, r *record) error {
		if r.Token == "" || r.Node != q.cfg.Node {
			return nil
		}
		_, err := q.update(ctx, queue.ID(e.Key()), func(r *record) (bool, error) {
			if r.Token == "" || r.Node != q.cfg.Node {
				return false, nil
			}
			r.Token, r.Until, r.Node = "", time.Time{}, ""
			if r.Msg.State == queue.StateLeased {
				r.Msg.State = fallbackState(r.Msg)
			}
			n++
			return true, nil
		})
		if errors.Is(err, queue.ErrNotFound) {
			return nil
		}
		return err
	})
	if n > 0 {
		q.log.Info("queue: ended leases of a previous process", "node", q.cfg.Node, "messages", n)
	}
	return err
}

// Stats implements queue.Admin.
func (q *Queue) Stats(ctx context.Context) (*queue.Stats, error) {
	s := &queue.Stats{ByState: map[queue.State]int{}, ByDomain: map[string]int{}, ByStream: map[string]int{}, Oldest: map[queue.State]time.Time{}}
	err := q.scan(ctx, func(_ njs.KeyValueEntry, r *record) error {
		s.Add(r.view(q.now()))
		return nil
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// ctxReader stops a copy when its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
