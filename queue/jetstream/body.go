package jetstream

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"
	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
)

// bodyRef says where a message's body is in the bodies stream: Chunks
// messages on the message's subject, the first at sequence First.
type bodyRef struct {
	First  uint64 `json:"first,omitempty"`
	Chunks int    `json:"chunks"`
}

// bodySubject is the subject a message's body chunks are stored under.
func (q *Queue) bodySubject(id queue.ID) string {
	return q.bodiesName + "." + string(id)
}

// putBody stores a body as chunks of at most ChunkSize bytes, one publish
// at a time, so that memory holds one chunk whatever the body's size.
// On failure it removes what it stored.
func (q *Queue) putBody(ctx context.Context, id queue.ID, body io.Reader) (bodyRef, int64, error) {
	var ref bodyRef
	var size int64
	subj := q.bodySubject(id)
	buf := make([]byte, q.chunk)
	fail := func(err error) (bodyRef, int64, error) {
		if ref.Chunks > 0 {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), q.cfg.Timeout)
			defer cancel()
			if derr := q.deleteBody(dctx, id); derr != nil {
				q.log.Warn("queue: cannot remove partial body", "id", id, "err", derr)
			}
		}
		return bodyRef{}, 0, err
	}
	for {
		n, rerr := io.ReadFull(body, buf)
		if rerr != nil && rerr != io.EOF && rerr != io.ErrUnexpectedEOF {
			return fail(rerr)
		}
		if err := ctx.Err(); err != nil {
			return fail(err)
		}
		if n > 0 {
			rctx, cancel := q.bounded(ctx)
			ack, err := q.js.PublishMsg(rctx, &nats.Msg{Subject: subj, Data: buf[:n]}, njs.WithExpectStream(q.bodiesName))
			cancel()
			if err != nil {
				if cerr := ctx.Err(); cerr != nil {
					err = cerr
				}
				return fail(err)
			}
			if ref.Chunks == 0 {
				ref.First = ack.Sequence
			}
			ref.Chunks++
			size += int64(n)
		}
		if rerr != nil { // EOF
			return ref, size, nil
		}
	}
}

// deleteBody removes every chunk of a body.
func (q *Queue) deleteBody(ctx context.Context, id queue.ID) error {
	ctx, cancel := q.bounded(ctx)
	defer cancel()
	return q.bodies.Purge(ctx, njs.WithPurgeSubject(q.bodySubject(id)))
}

// bodyReader streams a body chunk by chunk: each Read that needs data
// fetches the next chunk from the stream's leader.
type bodyReader struct {
	ctx    context.Context
	q      *Queue
	id     queue.ID
	subj   string
	next   uint64 // sequence to look from
	left   int    // chunks still to fetch
	size   int64  // bytes expected in all
	read   int64
	chunk  []byte
	err    error
	closed bool
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if b.closed {
		return 0, errors.New("jetstream: read of a closed body")
	}
	for len(b.chunk) == 0 {
		if b.err != nil {
			return 0, b.err
		}
		if b.left == 0 {
			if b.read != b.size {
				b.err = fmt.Errorf("jetstream: body of %s has %d bytes, want %d", b.id, b.read, b.size)
				return 0, b.err
			}
			b.err = io.EOF
			return 0, io.EOF
		}
		rctx, cancel := b.q.bounded(b.ctx)
		m, err := b.q.bodies.GetMsg(rctx, b.next, njs.WithGetMsgSubject(b.subj))
		cancel()
		if err != nil {
			if errors.Is(err, njs.ErrMsgNotFound) {
				err = fmt.Errorf("jetstream: body of %s is gone: %w", b.id, queue.ErrNotFound)
			}
			b.err = b.q.fail(err)
			return 0, b.err
		}
		b.next = m.Sequence + 1
		b.left--
		b.chunk = m.Data
		b.read += int64(len(m.Data))
	}
	n := copy(p, b.chunk)
	b.chunk = b.chunk[n:]
	return n, nil
}

func (b *bodyReader) Close() error {
	b.closed = true
	b.chunk = nil
	return nil
}

// Sweep removes bodies that no message refers to and that were last
// written more than age ago, and returns how many it removed. Such bodies
// are what a process leaves behind when it dies between storing a body
// and creating its record, or between removing a record and its body.
// age must exceed the time the slowest Enqueue takes, or Sweep may take
// the body of a message being enqueued. The queue runs Sweep every
// Config.SweepInterval by itself; operators may call it too.
func (q *Queue) Sweep(ctx context.Context, age time.Duration) (int, error) {
	if q.isClosed() {
		return 0, queue.ErrClosed
	}
	rctx, cancel := q.bounded(ctx)
	info, err := q.bodies.Info(rctx, njs.WithSubjectFilter(q.bodiesName+".*"))
	cancel()
	if err != nil {
		return 0, err
	}
	n := 0
	for subj := range info.State.Subjects {
		id := queue.ID(subj[len(q.bodiesName)+1:])
		rctx, cancel := q.bounded(ctx)
		_, err := q.kv.Get(rctx, string(id))
		cancel()
		if !errors.Is(err, njs.ErrKeyNotFound) {
			if err != nil {
				return n, err
			}
			continue
		}
		rctx, cancel = q.bounded(ctx)
		last, err := q.bodies.GetLastMsgForSubject(rctx, subj)
		cancel()
		if errors.Is(err, njs.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			return n, err
		}
		if time.Since(last.Time) < age {
			continue // an Enqueue may still be creating its record
		}
		if err := q.deleteBody(ctx, id); err != nil {
			return n, err
		}
		n++
	}
	return n, nil
}

// sweeper runs Sweep every SweepInterval until Close.
func (q *Queue) sweeper() {
	defer q.bg.Done()
	t := time.NewTicker(q.cfg.SweepInterval)
	defer t.Stop()
	for {
		select {
		case <-q.closed:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		go func() {
			select {
			case <-q.closed:
				cancel()
			case <-ctx.Done():
			}
		}()
		n, err := q.Sweep(ctx, q.cfg.SweepInterval)
		cancel()
		if err != nil && !q.isClosed() {
			q.log.Warn("queue: sweep of orphaned bodies failed", "err", err)
		}
		if n > 0 {
			q.log.Info("queue: removed orphaned bodies", "count", n)
		}
	}
}
