// Package boltqueue is an example of a queue.Queue backend written outside
// the queue package, on the bbolt embedded database (go.etcd.io/bbolt). It
// uses only the queue package's exported API and passes the conformance
// suite in queue/queuetest, which is the point: a third party can plug
// their own storage into baton the same way.
//
// Storage: one bbolt file with three buckets. "msgs" maps an ID to the
// message record (queue.Message as JSON); "body" maps ID+chunk number to
// 64 KB chunks of the body; "partial" names messages whose body is still
// being written. Enqueue streams the body in chunks, several transactions
// of at most 1 MB each, so memory stays bounded, and commits the message
// record last; a crash in between leaves only "partial" entries, which
// Open removes. bbolt syncs every transaction, so a message is durable
// when Enqueue returns. Leases live in memory: after a restart every
// message is due again at its recorded next attempt.
//
// Simplifications an example may make and a production backend should not:
// Lease, LeaseStream and Stats scan the whole "msgs" bucket (fine for
// thousands of messages, not millions), and there is no group commit. In
// particular LeaseStream reads every record to find the few of its
// stream, so a large backlog in one stream slows leasing another; a
// production backend keeps a due index per stream (queue.Dir does).
package boltqueue

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/batonmail/baton/queue"
	bolt "go.etcd.io/bbolt"
)

var (
	bucketMsgs    = []byte("msgs")
	bucketBody    = []byte("body")
	bucketPartial = []byte("partial")
)

const (
	chunkSize = 64 << 10
	txBytes   = 1 << 20
)

// Config configures a Queue.
type Config struct {
	// Path is the database file; it is created if missing.
	Path string
	// Schedule decides retry times and the maximum age.
	Schedule queue.Schedule
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

// Queue is a queue.Queue stored in a bbolt database. It is safe for
// concurrent use; one process opens a database at a time (bbolt locks it).
type Queue struct {
	cfg    Config
	db     *bolt.DB
	mu     sync.Mutex
	leases map[queue.ID]lease
	wake   chan struct{}
	closed bool
}

type lease struct {
	token string
	until time.Time
}

var (
	_ queue.Queue        = (*Queue)(nil)
	_ queue.StreamLeaser = (*Queue)(nil)
)

// Open opens (or creates) the database and removes bodies of messages
// whose Enqueue did not finish.
func Open(cfg Config) (*Queue, error) {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cfg.Schedule = cfg.Schedule.WithDefaults()
	db, err := bolt.Open(cfg.Path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("boltqueue: %w", err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMsgs, bucketBody, bucketPartial} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		// Half-written messages were never acknowledged.
		var ids [][]byte
		tx.Bucket(bucketPartial).ForEach(func(k, _ []byte) error {
			ids = append(ids, append([]byte(nil), k...))
			return nil
		})
		for _, id := range ids {
			if err := deleteBody(tx, id); err != nil {
				return err
			}
			tx.Bucket(bucketPartial).Delete(id)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("boltqueue: %w", err)
	}
	return &Queue{cfg: cfg, db: db, leases: map[queue.ID]lease{}, wake: make(chan struct{})}, nil
}

func chunkKey(id []byte, n uint32) []byte {
	k := make([]byte, len(id)+4)
	copy(k, id)
	binary.BigEndian.PutUint32(k[len(id):], n)
	return k
}

func deleteBody(tx *bolt.Tx, id []byte) error {
	c := tx.Bucket(bucketBody).Cursor()
	for k, _ := c.Seek(id); k != nil && len(k) == len(id)+4 && bytes.HasPrefix(k, id); k, _ = c.Seek(id) {
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// record is what the msgs bucket stores.
type record struct {
	Msg  *queue.Message `json:"msg"`
	Held bool           `json:"held"`
}

func getRecord(tx *bolt.Tx, id queue.ID) (*record, error) {
	v := tx.Bucket(bucketMsgs).Get([]byte(id))
	if v == nil {
		return nil, fmt.Errorf("%w: %s", queue.ErrNotFound, id)
	}
	var r record
	if err := json.Unmarshal(v, &r); err != nil {
		return nil, fmt.Errorf("boltqueue: record %s: %w", id, err)
	}
	return &r, nil
}

func putRecord(tx *bolt.Tx, r *record) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return tx.Bucket(bucketMsgs).Put([]byte(r.Msg.ID), v)
}

func storageErr(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return errors.Join(queue.ErrNoSpace, err)
	}
	return err
}

func (q *Queue) signal() {
	close(q.wake)
	q.wake = make(chan struct{})
}

func (q *Queue) isClosed() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.closed
}

// Enqueue implements queue.Queue.
func (q *Queue) Enqueue(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
	if err := env.Validate(); err != nil {
		return "", err
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	if q.isClosed() {
		return "", queue.ErrClosed
	}
	id := queue.NewID()
	key := []byte(id)
	if err := q.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketPartial).Put(key, nil) }); err != nil {
		return "", storageErr(err)
	}
	ok := false
	defer func() {
		if !ok {
			q.db.Update(func(tx *bolt.Tx) error {
				deleteBody(tx, key)
				return tx.Bucket(bucketPartial).Delete(key)
			})
		}
	}()
	var size int64
	var n uint32
	buf := make([]byte, chunkSize)
	eof := false
	for !eof {
		// One transaction per txBytes of body.
		err := q.db.Update(func(tx *bolt.Tx) error {
			for written := 0; written < txBytes; {
				if err := ctx.Err(); err != nil {
					return err
				}
				k, err := io.ReadFull(body, buf)
				if k > 0 {
					if err := tx.Bucket(bucketBody).Put(chunkKey(key, n), append([]byte(nil), buf[:k]...)); err != nil {
						return err
					}
					n++
					size += int64(k)
					written += k
				}
				if err == io.EOF || err == io.ErrUnexpectedEOF {
					eof = true
					return nil
				}
				if err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return "", storageErr(err)
		}
	}
	if err := ctx.Err(); err != nil {
		return "", err
	}
	m := queue.NewMessage(id, env, size, q.cfg.Now(), q.cfg.Schedule)
	err := q.db.Update(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketPartial).Delete(key); err != nil {
			return err
		}
		return putRecord(tx, &record{Msg: m, Held: env.Held})
	})
	if err != nil {
		return "", storageErr(err)
	}
	ok = true
	q.mu.Lock()
	q.signal()
	q.mu.Unlock()
	return id, nil
}

// Lease implements queue.Queue.
func (q *Queue) Lease(ctx context.Context, n int, d time.Duration) ([]*queue.Lease, error) {
	return q.lease(ctx, "", n, d)
}

// LeaseStream implements queue.StreamLeaser. It is the same scan as Lease
// that skips other streams' messages: simple, and slow when another
// stream has a large backlog (see the package documentation).
func (q *Queue) LeaseStream(ctx context.Context, stream string, n int, d time.Duration) ([]*queue.Lease, error) {
	return q.lease(ctx, queue.StreamName(stream), n, d)
}

// lease leases due messages of stream, or of every stream when it is "".
func (q *Queue) lease(ctx context.Context, stream string, n int, d time.Duration) ([]*queue.Lease, error) {
	if n <= 0 {
		n = 1
	}
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return nil, queue.ErrClosed
		}
		now := q.cfg.Now()
		next := now.Add(time.Second)
		var out []*queue.Lease
		err := q.db.View(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketMsgs).ForEach(func(k, v []byte) error {
				if len(out) == n {
					return nil
				}
				id := queue.ID(k)
				if l, ok := q.leases[id]; ok && l.until.After(now) {
					if l.until.Before(next) {
						next = l.until
					}
					return nil
				}
				var r record
				if err := json.Unmarshal(v, &r); err != nil {
					return err
				}
				if r.Held || stream != "" && r.Msg.Envelope.StreamName() != stream {
					return nil
				}
				due := r.Msg.DueRecipients(now)
				if len(due) == 0 {
					if t := r.Msg.NextAttempt(); !t.IsZero() && t.Before(next) {
						next = t
					}
					return nil
				}
				l := lease{token: string(queue.NewID()), until: now.Add(d)}
				q.leases[id] = l
				r.Msg.State = queue.StateLeased
				out = append(out, &queue.Lease{Token: l.token, Message: r.Msg, Due: due, Until: l.until})
				return nil
			})
		})
		wake := q.wake
		q.mu.Unlock()
		if err != nil {
			return nil, err
		}
		if len(out) > 0 {
			return out, nil
		}
		t := time.NewTimer(min(max(next.Sub(now), time.Millisecond), time.Second))
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// Settle implements queue.Queue.
func (q *Queue) Settle(ctx context.Context, l *queue.Lease, outcomes []queue.Outcome) (*queue.Message, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, queue.ErrClosed
	}
	id := l.Message.ID
	if cur, ok := q.leases[id]; !ok || cur.token != l.Token {
		return nil, queue.ErrLeaseLost
	}
	var snap *queue.Message
	err := q.db.Update(func(tx *bolt.Tx) error {
		r, err := getRecord(tx, id)
		if err != nil {
			return err
		}
		done := queue.ApplyOutcomes(r.Msg, outcomes, q.cfg.Now(), q.cfg.Schedule)
		if r.Held {
			r.Msg.State = queue.StateHeld
		}
		snap = r.Msg.Clone()
		if done {
			if err := deleteBody(tx, []byte(id)); err != nil {
				return err
			}
			return tx.Bucket(bucketMsgs).Delete([]byte(id))
		}
		return putRecord(tx, r)
	})
	if errors.Is(err, queue.ErrNotFound) {
		delete(q.leases, id)
		return nil, queue.ErrLeaseLost
	}
	if err != nil {
		return nil, storageErr(err)
	}
	delete(q.leases, id)
	q.signal()
	return snap, nil
}

// bodyReader reads a body chunk by chunk, one short read transaction per
// chunk.
type bodyReader struct {
	db   *bolt.DB
	id   []byte
	n    uint32
	buf  []byte
	done bool
}

func (b *bodyReader) Read(p []byte) (int, error) {
	for len(b.buf) == 0 {
		if b.done {
			return 0, io.EOF
		}
		err := b.db.View(func(tx *bolt.Tx) error {
			v := tx.Bucket(bucketBody).Get(chunkKey(b.id, b.n))
			if v == nil {
				b.done = true
				return nil
			}
			b.buf = append(b.buf[:0], v...)
			return nil
		})
		if err != nil {
			return 0, err
		}
		b.n++
	}
	n := copy(p, b.buf)
	b.buf = b.buf[n:]
	return n, nil
}

func (b *bodyReader) Close() error { return nil }

// Open implements queue.Queue. The reader sees the body as long as the
// message is queued; a message deleted meanwhile ends early.
func (q *Queue) Open(ctx context.Context, id queue.ID) (io.ReadCloser, error) {
	if q.isClosed() {
		return nil, queue.ErrClosed
	}
	if _, err := q.Get(ctx, id); err != nil {
		return nil, err
	}
	return &bodyReader{db: q.db, id: []byte(id)}, nil
}

// view overlays the in-memory lease on a stored record. Callers hold mu.
func (q *Queue) view(r *record) *queue.Message {
	m := r.Msg
	if r.Held {
		m.State = queue.StateHeld
	} else if l, ok := q.leases[m.ID]; ok && l.until.After(q.cfg.Now()) {
		m.State = queue.StateLeased
	}
	return m
}

// Get implements queue.Admin.
func (q *Queue) Get(ctx context.Context, id queue.ID) (*queue.Message, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, queue.ErrClosed
	}
	var m *queue.Message
	err := q.db.View(func(tx *bolt.Tx) error {
		r, err := getRecord(tx, id)
		if err == nil {
			m = q.view(r)
		}
		return err
	})
	return m, err
}

// List implements queue.Admin, reading 100 records per transaction.
func (q *Queue) List(ctx context.Context, f queue.Filter, fn func(*queue.Message) error) error {
	var after []byte
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		var batch []*queue.Message
		q.mu.Lock()
		if q.closed {
			q.mu.Unlock()
			return queue.ErrClosed
		}
		err := q.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucketMsgs).Cursor()
			k, v := c.First()
			if after != nil {
				k, v = c.Seek(after)
				if k != nil && bytes.Equal(k, after) {
					k, v = c.Next()
				}
			}
			for ; k != nil && len(batch) < 100; k, v = c.Next() {
				var r record
				if err := json.Unmarshal(v, &r); err != nil {
					return err
				}
				batch = append(batch, q.view(&r))
				after = append(after[:0], k...)
			}
			return nil
		})
		q.mu.Unlock()
		if err != nil {
			return err
		}
		if len(batch) == 0 {
			return nil
		}
		for _, m := range batch {
			if !f.Match(m) {
				continue
			}
			if err := fn(m); err != nil {
				return err
			}
		}
	}
}

// update changes one stored record under the lock.
func (q *Queue) update(id queue.ID, change func(r *record)) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return queue.ErrClosed
	}
	err := q.db.Update(func(tx *bolt.Tx) error {
		r, err := getRecord(tx, id)
		if err != nil {
			return err
		}
		change(r)
		return putRecord(tx, r)
	})
	if err == nil {
		q.signal()
	}
	return storageErr(err)
}

// Hold implements queue.Admin.
func (q *Queue) Hold(ctx context.Context, id queue.ID) error {
	return q.update(id, func(r *record) {
		r.Held = true
		r.Msg.State = queue.StateHeld
	})
}

// Release implements queue.Admin.
func (q *Queue) Release(ctx context.Context, id queue.ID) error {
	now := q.cfg.Now()
	return q.update(id, func(r *record) {
		if !r.Held {
			return
		}
		r.Held = false
		r.Msg.State = queue.StateQueued
		for _, s := range r.Msg.Recipients {
			if s.Attempts > 0 {
				r.Msg.State = queue.StateDeferred
			}
		}
		queue.RetryNow(r.Msg, "", now)
	})
}

// Delete implements queue.Admin.
func (q *Queue) Delete(ctx context.Context, id queue.ID) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return queue.ErrClosed
	}
	err := q.db.Update(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketMsgs).Get([]byte(id)) == nil {
			return fmt.Errorf("%w: %s", queue.ErrNotFound, id)
		}
		if err := deleteBody(tx, []byte(id)); err != nil {
			return err
		}
		return tx.Bucket(bucketMsgs).Delete([]byte(id))
	})
	if err == nil {
		delete(q.leases, id)
	}
	return err
}

// Retry implements queue.Admin.
func (q *Queue) Retry(ctx context.Context, f queue.Filter) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return 0, queue.ErrClosed
	}
	now := q.cfg.Now()
	n := 0
	err := q.db.Update(func(tx *bolt.Tx) error {
		var changed []*record
		err := tx.Bucket(bucketMsgs).ForEach(func(k, v []byte) error {
			var r record
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if r.Held || !f.Match(q.view(&r)) {
				return nil
			}
			n++
			queue.RetryNow(r.Msg, f.Domain, now)
			changed = append(changed, &r)
			return nil
		})
		if err != nil {
			return err
		}
		for _, r := range changed {
			if r.Msg.State == queue.StateLeased {
				r.Msg.State = queue.StateQueued
			}
			if err := putRecord(tx, r); err != nil {
				return err
			}
		}
		return nil
	})
	if n > 0 {
		q.signal()
	}
	return n, err
}

// Stats implements queue.Admin.
func (q *Queue) Stats(ctx context.Context) (*queue.Stats, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, queue.ErrClosed
	}
	s := &queue.Stats{ByState: map[queue.State]int{}, ByDomain: map[string]int{}, ByStream: map[string]int{}, Oldest: map[queue.State]time.Time{}}
	err := q.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMsgs).ForEach(func(k, v []byte) error {
			var r record
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			s.Add(q.view(&r))
			return nil
		})
	})
	return s, err
}

// Close implements queue.Queue.
func (q *Queue) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil
	}
	q.closed = true
	q.signal()
	return q.db.Close()
}
