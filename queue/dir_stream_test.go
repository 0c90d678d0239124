package queue

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// addFakeDue puts n index entries of stream, due at at, into q without
// files: enough for LeaseStream of another stream and Stats, which must
// not touch them. Leasing them would find no file.
func addFakeDue(q *Dir, stream string, n int, at time.Time) {
	q.mu.Lock()
	defer q.mu.Unlock()
	env := &Envelope{From: "s@example.test", To: []Recipient{{Addr: "r@bulk.example.test"}}, Stream: stream}
	for i := range n {
		m := NewMessage(ID(fmt.Sprintf("FAKE%012d", i)), env, 0, at, DefaultSchedule)
		q.add(m.ID, m, false)
	}
}

// checkIndex verifies the index's bookkeeping: every entry is in its own
// stream's heap at the position it records (or in none, when held or idle),
// the heaps are ordered, tops holds exactly the streams with a non-empty
// heap at their recorded positions, and the per-stream counts match.
func checkIndex(t *testing.T, q *Dir) {
	t.Helper()
	q.mu.Lock()
	defer q.mu.Unlock()
	count := map[*dirStream]int{}
	for id, e := range q.idx {
		if e.id != id {
			t.Fatalf("entry %s filed under %s", e.id, id)
		}
		if q.streams[e.stream.name] != e.stream {
			t.Fatalf("entry %s refers to stream %q, which the index does not hold", id, e.stream.name)
		}
		count[e.stream]++
		if e.hi >= 0 && (e.hi >= len(e.stream.due) || e.stream.due[e.hi] != e) {
			t.Fatalf("entry %s records heap position %d wrongly", id, e.hi)
		}
		if e.hi < 0 && !e.held && e.lease != nil {
			t.Fatalf("leased entry %s is in no heap: its lease would never expire", id)
		}
	}
	nonEmpty := 0
	for name, s := range q.streams {
		if s.name != name || s.n != count[s] || s.n == 0 {
			t.Fatalf("stream %q: name %q, n %d, %d entries", name, s.name, s.n, count[s])
		}
		for i, e := range s.due {
			if e.hi != i || e.stream != s || q.idx[e.id] != e {
				t.Fatalf("stream %q heap slot %d holds a foreign or stale entry %s", name, i, e.id)
			}
			if i > 0 && s.due[(i-1)/2].next > e.next {
				t.Fatalf("stream %q heap out of order at %d", name, i)
			}
		}
		if len(s.due) > 0 {
			nonEmpty++
			if s.ti < 0 || s.ti >= len(q.tops) || q.tops[s.ti] != s {
				t.Fatalf("stream %q records tops position %d wrongly", name, s.ti)
			}
		} else if s.ti >= 0 {
			t.Fatalf("stream %q with an empty heap is in tops", name)
		}
	}
	if nonEmpty != len(q.tops) {
		t.Fatalf("tops holds %d streams, %d have due entries", len(q.tops), nonEmpty)
	}
	for i := 1; i < len(q.tops); i++ {
		if q.tops[(i-1)/2].due[0].next > q.tops[i].due[0].next {
			t.Fatalf("tops out of order at %d", i)
		}
	}
}

func TestDir_LeaseStream_BulkBacklogNotScanned(t *testing.T) {
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	q, err := OpenDir(DirConfig{Path: t.TempDir(), NoSync: true, Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	const n = 100_000
	addFakeDue(q, "bulk", n, now.Add(-time.Hour))
	env := testEnv("r@example.test")
	id, err := q.Enqueue(context.Background(), env, strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	ls, err := q.LeaseStream(ctx, DefaultStream, 10, time.Minute)
	el := time.Since(start)
	if err != nil || len(ls) != 1 || ls[0].Message.ID != id {
		t.Fatalf("LeaseStream(%s) = %d leases, %v; want the one transactional message", DefaultStream, len(ls), err)
	}
	t.Logf("LeaseStream(%s) with %d due bulk messages: %v", DefaultStream, n, el)
	// The bulk heap was not touched and Lease over every stream would
	// take its earliest entry first.
	q.mu.Lock()
	bulkDue, leased := len(q.streams["bulk"].due), 0
	for _, e := range q.streams["bulk"].due {
		if e.lease != nil {
			leased++
		}
	}
	first := q.first("")
	q.mu.Unlock()
	if bulkDue != n || leased != 0 || first == nil || first.stream.name != "bulk" {
		t.Errorf("bulk heap: %d entries, %d leased, first across streams %v; want %d, none leased, a bulk entry", bulkDue, leased, first, n)
	}
	start = time.Now()
	s, err := q.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Stats over %d messages: %v", n+1, time.Since(start))
	if s.ByStream["bulk"] != n || s.ByStream[DefaultStream] != 1 || s.ByState[StateQueued] != n || s.ByState[StateLeased] != 1 ||
		!s.Oldest[StateQueued].Equal(now.Add(-time.Hour)) || !s.Oldest[StateLeased].Equal(now) {
		t.Errorf("Stats: ByStream %v ByState %v Oldest %v", s.ByStream, s.ByState, s.Oldest)
	}
	checkIndex(t, q)
}

// TestDir_StreamIndex_RandomOperations drives a Dir through random
// enqueues, leases, settles, holds, releases, retries, deletes and clock
// jumps over several streams, and checks the index after each step and
// after a reopen.
func TestDir_StreamIndex_RandomOperations(t *testing.T) {
	var mu sync.Mutex
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	dir := t.TempDir()
	cfg := DirConfig{Path: dir, NoSync: true, Now: clock, Schedule: Schedule{Min: time.Minute, Max: 4 * time.Minute, Jitter: -1, MaxAge: time.Hour}}
	q, err := OpenDir(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { q.Close() }()
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(1, 2))
	streams := []string{"", DefaultStream, "bulk", "other"}
	var ids []ID
	var leases []*Lease
	quick := func(f func(ctx context.Context) ([]*Lease, error)) []*Lease {
		c, cancel := context.WithTimeout(ctx, 5*time.Millisecond)
		defer cancel()
		ls, err := f(c)
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatal(err)
		}
		return ls
	}
	for step := range 400 {
		switch op := rng.IntN(10); {
		case op < 3 || len(ids) == 0:
			env := testEnv("a@one.test", "b@two.test")
			env.Stream = streams[rng.IntN(len(streams))]
			env.Held = rng.IntN(10) == 0
			id, err := q.Enqueue(ctx, env, strings.NewReader("x"))
			if err != nil {
				t.Fatal(err)
			}
			ids = append(ids, id)
		case op == 3:
			leases = append(leases, quick(func(c context.Context) ([]*Lease, error) { return q.Lease(c, 3, time.Minute) })...)
		case op == 4:
			s := streams[1+rng.IntN(len(streams)-1)]
			ls := quick(func(c context.Context) ([]*Lease, error) { return q.LeaseStream(c, s, 3, time.Minute) })
			for _, l := range ls {
				if l.Message.Envelope.StreamName() != s {
					t.Fatalf("step %d: LeaseStream(%q) leased a message of %q", step, s, l.Message.Envelope.StreamName())
				}
			}
			leases = append(leases, ls...)
		case op == 5 && len(leases) > 0:
			i := rng.IntN(len(leases))
			l := leases[i]
			leases = append(leases[:i], leases[i+1:]...)
			var out []Outcome
			for _, r := range l.Due {
				res := []Result{Delivered, Retry, Retry, Failed}[rng.IntN(4)]
				out = append(out, Outcome{Rcpt: l.Message.Recipients[r].Addr, Result: res, Reply: Reply{Code: 451}})
			}
			if _, err := q.Settle(ctx, l, out); err != nil && !errors.Is(err, ErrLeaseLost) {
				t.Fatal(err)
			}
		case op == 6:
			id := ids[rng.IntN(len(ids))]
			var err error
			switch rng.IntN(3) {
			case 0:
				err = q.Hold(ctx, id)
			case 1:
				err = q.Release(ctx, id)
			case 2:
				err = q.Delete(ctx, id)
			}
			if err != nil && !errors.Is(err, ErrNotFound) {
				t.Fatal(err)
			}
		case op == 7:
			if _, err := q.Retry(ctx, Filter{Stream: streams[rng.IntN(len(streams))]}); err != nil {
				t.Fatal(err)
			}
		default:
			advance(time.Duration(rng.IntN(90)) * time.Second)
		}
		checkIndex(t, q)
		if t.Failed() {
			t.Fatalf("after step %d", step)
		}
	}
	before, err := q.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	q.Close()
	if q, err = OpenDir(cfg); err != nil {
		t.Fatal(err)
	}
	checkIndex(t, q)
	after, err := q.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(before.ByStream) != fmt.Sprint(after.ByStream) {
		t.Errorf("ByStream %v before the reopen, %v after", before.ByStream, after.ByStream)
	}
	t.Logf("ByStream %v, ByState %v", after.ByStream, after.ByState)
}

// BenchmarkDirLeaseStream measures LeaseStream of a stream with one
// message while another stream has bulk due messages: the time must not
// grow with bulk. Each iteration leases the message and settles it
// without outcomes, which makes it due again.
func BenchmarkDirLeaseStream(b *testing.B) {
	for _, n := range []int{0, 100_000} {
		b.Run(fmt.Sprintf("bulk=%d", n), func(b *testing.B) {
			now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
			q, err := OpenDir(DirConfig{Path: b.TempDir(), NoSync: true, Now: func() time.Time { return now }})
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			addFakeDue(q, "bulk", n, now.Add(-time.Hour))
			ctx := context.Background()
			if _, err := q.Enqueue(ctx, testEnv("r@example.test"), strings.NewReader("x")); err != nil {
				b.Fatal(err)
			}
			b.ResetTimer()
			for range b.N {
				ls, err := q.LeaseStream(ctx, DefaultStream, 1, time.Minute)
				if err != nil || len(ls) != 1 {
					b.Fatal(len(ls), err)
				}
				if _, err := q.Settle(ctx, ls[0], nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
