package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base32"
	"io"
	"sync"
	"time"
)

// MemoryConfig configures a Memory queue. The zero value is ready to use.
type MemoryConfig struct {
	// Schedule decides retry times and the maximum age.
	Schedule Schedule
	// Now returns the current time; nil means time.Now. Tests inject a
	// clock here.
	Now func() time.Time
}

// Memory is a Queue held in process memory: nothing survives the process.
// It suits tests and programs that embed baton and accept losing queued
// mail on exit; relayd uses the file-backed Dir. Bodies are held in memory,
// so Memory does not keep DESIGN's memory bound for large queues.
type Memory struct {
	cfg  MemoryConfig
	mu   sync.Mutex
	msgs map[ID]*memEntry
	wake chan struct{} // closed and replaced when something may be due
	done bool
}

type memEntry struct {
	msg   *Message
	body  []byte
	token string
	until time.Time
}

var (
	_ Queue        = (*Memory)(nil)
	_ StreamLeaser = (*Memory)(nil)
)

// NewMemory returns an empty in-memory queue.
func NewMemory(cfg MemoryConfig) *Memory {
	cfg.Schedule = cfg.Schedule.WithDefaults()
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Memory{cfg: cfg, msgs: make(map[ID]*memEntry), wake: make(chan struct{})}
}

// NewID returns a new random message ID: 16 characters of base32, sortable
// only by chance, unique with overwhelming probability.
func NewID() ID {
	var b [10]byte
	rand.Read(b[:])
	return ID(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}

func (q *Memory) signal() {
	close(q.wake)
	q.wake = make(chan struct{})
}

// Enqueue implements Queue.
func (q *Memory) Enqueue(ctx context.Context, env *Envelope, body io.Reader) (ID, error) {
	if err := env.Validate(); err != nil {
		return "", err
	}
	var buf bytes.Buffer
	if _, err := io.Copy(&buf, ctxReader{ctx, body}); err != nil {
		return "", err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return "", ErrClosed
	}
	id := NewID()
	m := NewMessage(id, env, int64(buf.Len()), q.cfg.Now(), q.cfg.Schedule)
	q.msgs[id] = &memEntry{msg: m, body: buf.Bytes()}
	q.signal()
	return id, nil
}

// Lease implements Queue.
func (q *Memory) Lease(ctx context.Context, max int, d time.Duration) ([]*Lease, error) {
	return q.lease(ctx, "", max, d)
}

// LeaseStream implements StreamLeaser.
func (q *Memory) LeaseStream(ctx context.Context, stream string, max int, d time.Duration) ([]*Lease, error) {
	return q.lease(ctx, StreamName(stream), max, d)
}

// lease leases due messages of stream, or of every stream when it is "".
func (q *Memory) lease(ctx context.Context, stream string, max int, d time.Duration) ([]*Lease, error) {
	if max <= 0 {
		max = 1
	}
	for {
		q.mu.Lock()
		if q.done {
			q.mu.Unlock()
			return nil, ErrClosed
		}
		now := q.cfg.Now()
		var out []*Lease
		next := now.Add(time.Second)
		for _, e := range q.msgs {
			if len(out) == max {
				break
			}
			if e.msg.State == StateHeld || stream != "" && e.msg.Envelope.StreamName() != stream {
				continue
			}
			if e.token != "" {
				if e.until.After(now) {
					if e.until.Before(next) {
						next = e.until
					}
					continue
				}
				e.token = "" // expired lease
			}
			due := e.msg.DueRecipients(now)
			if len(due) == 0 {
				if t := e.msg.NextAttempt(); !t.IsZero() && t.Before(next) {
					next = t
				}
				continue
			}
			e.token = string(NewID())
			e.until = now.Add(d)
			e.msg.State = StateLeased
			out = append(out, &Lease{Token: e.token, Message: e.msg.Clone(), Due: due, Until: e.until})
		}
		wake := q.wake
		q.mu.Unlock()
		if len(out) > 0 {
			return out, nil
		}
		t := time.NewTimer(max1(next.Sub(now)))
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

func max1(d time.Duration) time.Duration {
	return min(max(d, time.Millisecond), time.Second)
}

// Settle implements Queue.
func (q *Memory) Settle(ctx context.Context, l *Lease, outcomes []Outcome) (*Message, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return nil, ErrClosed
	}
	e, ok := q.msgs[l.Message.ID]
	if !ok || e.token != l.Token {
		// Deleted, or expired and leased again: an expired lease that
		// nobody took over is still ours to settle.
		return nil, ErrLeaseLost
	}
	now := q.cfg.Now()
	e.token = ""
	held := e.msg.State == StateHeld
	if e.msg.State == StateLeased {
		e.msg.State = StateQueued
	}
	done := ApplyOutcomes(e.msg, outcomes, now, q.cfg.Schedule)
	if held {
		e.msg.State = StateHeld
	}
	snap := e.msg.Clone()
	if done {
		delete(q.msgs, l.Message.ID)
	}
	q.signal()
	return snap, nil
}

// Open implements Queue.
func (q *Memory) Open(ctx context.Context, id ID) (io.ReadCloser, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return nil, ErrClosed
	}
	e, ok := q.msgs[id]
	if !ok {
		return nil, ErrNotFound
	}
	return io.NopCloser(bytes.NewReader(e.body)), nil
}

func (q *Memory) entry(id ID) (*memEntry, error) {
	if q.done {
		return nil, ErrClosed
	}
	e, ok := q.msgs[id]
	if !ok {
		return nil, ErrNotFound
	}
	return e, nil
}

func (q *Memory) view(e *memEntry) *Message {
	m := e.msg.Clone()
	if e.token != "" && !e.until.After(q.cfg.Now()) && m.State == StateLeased {
		m.State = StateQueued
		for _, r := range m.Recipients {
			if r.Attempts > 0 {
				m.State = StateDeferred
			}
		}
	}
	return m
}

// Get implements Admin.
func (q *Memory) Get(ctx context.Context, id ID) (*Message, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	e, err := q.entry(id)
	if err != nil {
		return nil, err
	}
	return q.view(e), nil
}

// List implements Admin.
func (q *Memory) List(ctx context.Context, f Filter, fn func(*Message) error) error {
	q.mu.Lock()
	if q.done {
		q.mu.Unlock()
		return ErrClosed
	}
	var sel []*Message
	for _, e := range q.msgs {
		if m := q.view(e); f.Match(m) {
			sel = append(sel, m)
		}
	}
	q.mu.Unlock()
	for _, m := range sel {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(m); err != nil {
			return err
		}
	}
	return nil
}

// Hold implements Admin.
func (q *Memory) Hold(ctx context.Context, id ID) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	e, err := q.entry(id)
	if err != nil {
		return err
	}
	e.msg.State = StateHeld
	return nil
}

// Release implements Admin.
func (q *Memory) Release(ctx context.Context, id ID) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	e, err := q.entry(id)
	if err != nil {
		return err
	}
	if e.msg.State != StateHeld {
		return nil
	}
	e.msg.State = StateQueued
	if e.token != "" {
		e.msg.State = StateLeased
	}
	now := q.cfg.Now()
	for i := range e.msg.Recipients {
		r := &e.msg.Recipients[i]
		if r.Attempts > 0 && e.msg.State == StateQueued {
			e.msg.State = StateDeferred
		}
		if r.State == RcptPending && r.NextAttempt.After(now) {
			r.NextAttempt = now
		}
	}
	q.signal()
	return nil
}

// Delete implements Admin.
func (q *Memory) Delete(ctx context.Context, id ID) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, err := q.entry(id); err != nil {
		return err
	}
	delete(q.msgs, id)
	return nil
}

// Retry implements Admin.
func (q *Memory) Retry(ctx context.Context, f Filter) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return 0, ErrClosed
	}
	now := q.cfg.Now()
	n := 0
	for _, e := range q.msgs {
		if e.msg.State == StateHeld || !f.Match(q.view(e)) {
			continue
		}
		n++
		RetryNow(e.msg, f.Domain, now)
	}
	if n > 0 {
		q.signal()
	}
	return n, nil
}

// RetryNow makes the pending recipients of m (only those at domain, when
// domain is not empty) due at now. Backends share it to implement Retry.
func RetryNow(m *Message, domain string, now time.Time) {
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.State == RcptPending && (domain == "" || r.Domain() == Domain("@"+domain)) && r.NextAttempt.After(now) {
			r.NextAttempt = now
		}
	}
}

// Stats implements Admin.
func (q *Memory) Stats(ctx context.Context) (*Stats, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.done {
		return nil, ErrClosed
	}
	s := &Stats{ByState: map[State]int{}, ByDomain: map[string]int{}, ByStream: map[string]int{}, Oldest: map[State]time.Time{}}
	for _, e := range q.msgs {
		s.Add(q.view(e))
	}
	return s, nil
}

// Close implements Queue. Pending Lease calls return ErrClosed.
func (q *Memory) Close() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.done {
		q.done = true
		q.signal()
	}
	return nil
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
