package jetstream_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	njs "github.com/nats-io/nats.go/jetstream"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
)

func env(rcpts ...string) *queue.Envelope {
	e := &queue.Envelope{From: "sender@example.test"}
	for _, r := range rcpts {
		e.To = append(e.To, queue.Recipient{Addr: r})
	}
	return e
}

func enqueue(t testing.TB, q queue.Queue, e *queue.Envelope, body string) queue.ID {
	t.Helper()
	id, err := q.Enqueue(context.Background(), e, strings.NewReader(body))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	return id
}

func readBody(t testing.TB, q queue.Queue, id queue.ID) []byte {
	t.Helper()
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatalf("Open(%s): %v", id, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read body %s: %v", id, err)
	}
	return b
}

// leaseWithin calls Lease with a timeout; a timeout returns no leases.
func leaseWithin(t testing.TB, q queue.Queue, n int, d, wait time.Duration) []*queue.Lease {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	ls, err := q.Lease(ctx, n, d)
	if err != nil && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lease: %v", err)
	}
	return ls
}

// TestBodies_LargerThanMaxPayload_StoredByteForByte stores bodies of many
// shapes, including ones many times the server's payload limit, and reads
// them back exactly.
func TestBodies_LargerThanMaxPayload_StoredByteForByte(t *testing.T) {
	url := startNATS(t, func(o *server.Options) { o.MaxPayload = 64 << 10 })
	q := openQueue(t, url, jetstream.Config{Prefix: uniquePrefix(), ChunkSize: 16 << 10})
	rng := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 1<<20+17)
	for i := range big {
		big[i] = byte(rng.Uint32())
	}
	bodies := map[string][]byte{
		"empty":       {},
		"crlf":        []byte("Subject: x\r\n\r\nhello\r\n"),
		"bare":        []byte("a\rb\nc\r\r\n.\r\n\x00\xff"),
		"chunk-exact": bytes.Repeat([]byte("x"), 16<<10),
		"big":         big,
	}
	for name, b := range bodies {
		id, err := q.Enqueue(context.Background(), env("a@example.test"), bytes.NewReader(b))
		if err != nil {
			t.Fatalf("%s: Enqueue: %v", name, err)
		}
		got := readBody(t, q, id)
		if !bytes.Equal(got, b) {
			t.Errorf("%s: body differs: got %d bytes, want %d", name, len(got), len(b))
		}
		m, err := q.Get(context.Background(), id)
		if err != nil {
			t.Fatalf("%s: Get: %v", name, err)
		}
		if m.Size != int64(len(b)) {
			t.Errorf("%s: Size = %d, want %d", name, m.Size, len(b))
		}
	}
}

// TestLease_TwoConnections_EachMessageLeasedOnce races workers on two
// connections for the same messages.
func TestLease_TwoConnections_EachMessageLeasedOnce(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	a := openQueue(t, url, jetstream.Config{Prefix: prefix})
	b := openQueue(t, url, jetstream.Config{Prefix: prefix})
	const n = 60
	want := map[queue.ID]bool{}
	for i := range n {
		q := a
		if i%2 == 1 {
			q = b
		}
		want[enqueue(t, q, env("r@example.test"), "body")] = true
	}
	// Eight workers lease until every message is leased; the deadline
	// only bounds a hang.
	var mu sync.Mutex
	got := map[queue.ID]int{}
	total := 0
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for w := range 8 {
		q := a
		if w%2 == 1 {
			q = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				ls, err := q.Lease(ctx, 3, time.Hour)
				if err != nil && ctx.Err() == nil {
					t.Errorf("Lease: %v", err)
					return
				}
				mu.Lock()
				for _, l := range ls {
					got[l.Message.ID]++
					total++
				}
				if total >= n {
					cancel()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(got) != n {
		t.Errorf("leased %d distinct messages, want %d", len(got), n)
	}
	for id, c := range got {
		if !want[id] {
			t.Errorf("leased unknown message %s", id)
		}
		if c != 1 {
			t.Errorf("message %s leased %d times", id, c)
		}
	}
}

// TestLease_ExpiredLease_TakenOverByOtherNode checks that a lease abandoned
// by one process is taken by another once it expires, and that the first
// can then no longer settle.
func TestLease_ExpiredLease_TakenOverByOtherNode(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	clock := newClock()
	a := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	b := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	id := enqueue(t, a, env("r@example.test"), "body")
	la := leaseWithin(t, a, 1, time.Minute, 5*time.Second)
	if len(la) != 1 || la[0].Message.ID != id {
		t.Fatalf("node a leased %v, want %s", la, id)
	}
	if m, _ := b.Get(context.Background(), id); m == nil || m.State != queue.StateLeased {
		t.Fatalf("state seen by b = %v, want leased", m)
	}
	if ls := leaseWithin(t, b, 1, time.Minute, 200*time.Millisecond); len(ls) != 0 {
		t.Fatalf("node b leased a message under a live lease: %v", ls[0].Message.ID)
	}
	// b waits; the lease expires while it does.
	done := make(chan []*queue.Lease)
	go func() { done <- leaseWithin(t, b, 1, time.Minute, 10*time.Second) }()
	clock.Advance(time.Minute)
	lb := <-done
	if len(lb) != 1 || lb[0].Message.ID != id {
		t.Fatalf("node b leased %v after expiry, want %s", lb, id)
	}
	if _, err := a.Settle(context.Background(), la[0], []queue.Outcome{{Rcpt: "r@example.test", Result: queue.Delivered}}); !errors.Is(err, queue.ErrLeaseLost) {
		t.Fatalf("stale Settle: err = %v, want ErrLeaseLost", err)
	}
	m, err := b.Settle(context.Background(), lb[0], []queue.Outcome{{Rcpt: "r@example.test", Result: queue.Delivered}})
	if err != nil {
		t.Fatalf("Settle: %v", err)
	}
	if m.Recipients[0].State != queue.RcptDelivered {
		t.Errorf("recipient state %v, want delivered", m.Recipients[0].State)
	}
	if _, err := a.Get(context.Background(), id); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("Get after final settle: %v, want ErrNotFound", err)
	}
	if _, err := a.Open(context.Background(), id); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("Open after final settle: %v, want ErrNotFound", err)
	}
}

// TestSettle_Retry_DueAfterScheduleOnOtherNode settles a temporary failure
// on one node and sees the other node lease the message again exactly when
// the schedule says.
func TestSettle_Retry_DueAfterScheduleOnOtherNode(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	clock := newClock()
	a := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	b := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	id := enqueue(t, a, env("r1@example.test", "r2@other.test"), "body")
	l := leaseWithin(t, a, 1, time.Hour, 5*time.Second)
	if len(l) != 1 {
		t.Fatal("no lease")
	}
	m, err := a.Settle(context.Background(), l[0], []queue.Outcome{
		{Rcpt: "r1@example.test", Result: queue.Retry, Reply: queue.Reply{Code: 451, Enhanced: "4.3.0", Text: "later"}},
		{Rcpt: "r2@other.test", Result: queue.Delivered, Reply: queue.Reply{Code: 250}},
	})
	if err != nil {
		t.Fatalf("Settle: %v", err)
	}
	if m.State != queue.StateDeferred || m.Recipients[0].NextAttempt != clock.Now().Add(time.Minute) {
		t.Fatalf("after retry: state %v next %v", m.State, m.Recipients[0].NextAttempt)
	}
	if ls := leaseWithin(t, b, 1, time.Hour, 200*time.Millisecond); len(ls) != 0 {
		t.Fatal("leased before the retry time")
	}
	clock.Advance(59 * time.Second)
	if ls := leaseWithin(t, b, 1, time.Hour, 200*time.Millisecond); len(ls) != 0 {
		t.Fatal("leased a second before the retry time")
	}
	clock.Advance(time.Second)
	ls := leaseWithin(t, b, 1, time.Hour, 5*time.Second)
	if len(ls) != 1 || ls[0].Message.ID != id {
		t.Fatalf("not leased at the retry time")
	}
	if len(ls[0].Due) != 1 || ls[0].Message.Recipients[ls[0].Due[0]].Addr != "r1@example.test" {
		t.Errorf("Due = %v, want only r1", ls[0].Due)
	}
	got, err := b.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	h := got.Recipients[0].History
	if len(h) != 1 || h[0].Reply.Code != 451 || h[0].Result != queue.Retry {
		t.Errorf("history = %+v", h)
	}
}

// TestLease_WakesOnEnqueueFromOtherNode: a Lease blocked on one node
// returns when another node enqueues.
func TestLease_WakesOnEnqueueFromOtherNode(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	a := openQueue(t, url, jetstream.Config{Prefix: prefix})
	b := openQueue(t, url, jetstream.Config{Prefix: prefix})
	got := make(chan []*queue.Lease, 1)
	go func() { got <- leaseWithin(t, a, 5, time.Hour, 20*time.Second) }()
	id := enqueue(t, b, env("r@example.test"), "x")
	ls := <-got
	if len(ls) != 1 || ls[0].Message.ID != id {
		t.Fatalf("leased %v, want %s", ls, id)
	}
}

// TestAdmin_AcrossNodes holds, lists, releases, retries and deletes on one
// node and checks the effect on the other.
func TestAdmin_AcrossNodes(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	clock := newClock()
	a := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	b := openQueue(t, url, jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule})
	ctx := context.Background()
	id1 := enqueue(t, a, env("x@one.test"), "1")
	id2 := enqueue(t, a, env("y@two.test"), "2")
	if err := a.Hold(ctx, id1); err != nil {
		t.Fatal(err)
	}
	ls := leaseWithin(t, b, 10, time.Hour, 2*time.Second)
	if len(ls) != 1 || ls[0].Message.ID != id2 {
		t.Fatalf("b leased %v, want only %s", ls, id2)
	}
	// Defer id2 by 8 minutes.
	if _, err := b.Settle(ctx, ls[0], []queue.Outcome{{Rcpt: "y@two.test", Result: queue.Retry, RetryAt: clock.Now().Add(8 * time.Minute)}}); err != nil {
		t.Fatal(err)
	}
	var held []queue.ID
	if err := b.List(ctx, queue.Filter{State: queue.StateHeld}, func(m *queue.Message) error { held = append(held, m.ID); return nil }); err != nil {
		t.Fatal(err)
	}
	if len(held) != 1 || held[0] != id1 {
		t.Errorf("held list on b = %v, want [%s]", held, id1)
	}
	st, err := b.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.ByState[queue.StateHeld] != 1 || st.ByState[queue.StateDeferred] != 1 || st.ByDomain["one.test"] != 1 || st.ByDomain["two.test"] != 1 {
		t.Errorf("stats = %+v", st)
	}
	if ls := leaseWithin(t, a, 10, time.Hour, 200*time.Millisecond); len(ls) != 0 {
		t.Fatalf("leased %s while held/deferred", ls[0].Message.ID)
	}
	if n, err := b.Retry(ctx, queue.Filter{Domain: "two.test"}); err != nil || n != 1 {
		t.Fatalf("Retry = %d, %v; want 1", n, err)
	}
	ls = leaseWithin(t, a, 10, time.Hour, 5*time.Second)
	if len(ls) != 1 || ls[0].Message.ID != id2 {
		t.Fatalf("after Retry, a leased %v, want %s", ls, id2)
	}
	if err := b.Release(ctx, id1); err != nil {
		t.Fatal(err)
	}
	ls2 := leaseWithin(t, a, 10, time.Hour, 5*time.Second)
	if len(ls2) != 1 || ls2[0].Message.ID != id1 {
		t.Fatalf("after Release, a leased %v, want %s", ls2, id1)
	}
	if err := b.Delete(ctx, id1); err != nil {
		t.Fatal(err)
	}
	if err := a.Delete(ctx, id1); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("second Delete: %v, want ErrNotFound", err)
	}
	if _, err := a.Settle(ctx, ls2[0], nil); !errors.Is(err, queue.ErrLeaseLost) {
		t.Errorf("Settle of deleted message: %v, want ErrLeaseLost", err)
	}
	if _, err := b.Open(ctx, id1); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("Open of deleted message: %v, want ErrNotFound", err)
	}
}

// TestReopen_KeepsMessagesAndState closes every connection and opens the
// queue again.
func TestReopen_KeepsMessagesAndState(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	clock := newClock()
	cfg := jetstream.Config{Prefix: prefix, Now: clock.Now, Schedule: testSchedule}
	a := openQueue(t, url, cfg)
	id := enqueue(t, a, env("r@example.test", "s@example.test"), "hello")
	ls := leaseWithin(t, a, 1, time.Hour, 5*time.Second)
	if len(ls) != 1 {
		t.Fatal("no lease")
	}
	if _, err := a.Settle(context.Background(), ls[0], []queue.Outcome{{Rcpt: "r@example.test", Result: queue.Failed, Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no"}}}); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if _, err := a.Get(context.Background(), id); !errors.Is(err, queue.ErrClosed) {
		t.Errorf("Get after Close: %v, want ErrClosed", err)
	}
	b := openQueue(t, url, cfg)
	m, err := b.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Recipients[0].State != queue.RcptFailed || m.Recipients[1].State != queue.RcptPending || m.Recipients[0].Last.Code != 550 {
		t.Errorf("state after reopen: %+v", m.Recipients)
	}
	if got := readBody(t, b, id); string(got) != "hello" {
		t.Errorf("body after reopen %q", got)
	}
	ls = leaseWithin(t, b, 1, time.Hour, 5*time.Second)
	if len(ls) != 1 || len(ls[0].Due) != 1 || ls[0].Due[0] != 1 {
		t.Fatalf("after reopen leased %v", ls)
	}
}

// TestClose_UnblocksLease: a Lease waiting for work returns ErrClosed.
func TestClose_UnblocksLease(t *testing.T) {
	url := startNATS(t)
	q := openQueue(t, url, jetstream.Config{Prefix: uniquePrefix()})
	errc := make(chan error, 1)
	go func() {
		_, err := q.Lease(context.Background(), 1, time.Minute)
		errc <- err
	}()
	time.Sleep(50 * time.Millisecond) // let it block (the test holds either way)
	q.Close()
	if err := <-errc; !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("Lease after Close: %v, want ErrClosed", err)
	}
	if _, err := q.Enqueue(context.Background(), env("r@example.test"), strings.NewReader("x")); !errors.Is(err, queue.ErrClosed) {
		t.Fatalf("Enqueue after Close: %v, want ErrClosed", err)
	}
}

// TestEnqueue_BucketFull_ErrNoSpace fills a bodies bucket with a byte cap.
func TestEnqueue_BucketFull_ErrNoSpace(t *testing.T) {
	url := startNATS(t)
	q := openQueue(t, url, jetstream.Config{Prefix: uniquePrefix(), MaxBytes: 256 << 10})
	var err error
	stored := 0
	for range 20 {
		_, err = q.Enqueue(context.Background(), env("r@example.test"), bytes.NewReader(make([]byte, 40<<10)))
		if err != nil {
			break
		}
		stored++
	}
	if !errors.Is(err, queue.ErrNoSpace) {
		t.Fatalf("after %d bodies: err = %v, want ErrNoSpace", stored, err)
	}
	n := 0
	if err := q.List(context.Background(), queue.Filter{}, func(*queue.Message) error { n++; return nil }); err != nil {
		t.Fatal(err)
	}
	if n != stored {
		t.Errorf("queue lists %d messages, want the %d stored", n, stored)
	}
}

// TestSweep_RemovesOnlyOrphanedBodies stores a body no record refers to
// (as a process dying inside Enqueue would) and sweeps.
func TestSweep_RemovesOnlyOrphanedBodies(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	q := openQueue(t, url, jetstream.Config{Prefix: prefix})
	live := enqueue(t, q, env("r@example.test"), "live body")
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := njs.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(context.Background(), prefix+"_bodies.ORPHAN", []byte("left behind")); err != nil {
		t.Fatal(err)
	}
	// A recent orphan may belong to an Enqueue in progress: kept.
	if n, err := q.Sweep(context.Background(), time.Hour); err != nil || n != 0 {
		t.Fatalf("Sweep(1h) = %d, %v; want 0", n, err)
	}
	if n, err := q.Sweep(context.Background(), 0); err != nil || n != 1 {
		t.Fatalf("Sweep(0) = %d, %v; want 1", n, err)
	}
	st, err := js.Stream(context.Background(), prefix+"_bodies")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.GetLastMsgForSubject(context.Background(), prefix+"_bodies.ORPHAN"); !errors.Is(err, njs.ErrMsgNotFound) {
		t.Errorf("orphan still stored: %v", err)
	}
	if got := readBody(t, q, live); string(got) != "live body" {
		t.Errorf("live body after sweep = %q", got)
	}
}

// TestOpen_NodeRestart_EndsOwnLeasesOnly: a process that opens the queue
// with a Node name ends the leases a previous process of that name left,
// and leaves other nodes' leases alone.
func TestOpen_NodeRestart_EndsOwnLeasesOnly(t *testing.T) {
	url := startNATS(t)
	prefix := uniquePrefix()
	clock := newClock()
	cfgA := jetstream.Config{Prefix: prefix, Node: "a", Now: clock.Now, Schedule: testSchedule}
	cfgB := jetstream.Config{Prefix: prefix, Node: "b", Now: clock.Now, Schedule: testSchedule}
	a := openQueue(t, url, cfgA)
	b := openQueue(t, url, cfgB)
	idA := enqueue(t, a, env("r@example.test"), "a")
	la := leaseWithin(t, a, 1, time.Hour, 5*time.Second)
	idB := enqueue(t, b, env("r@example.test"), "b")
	lb := leaseWithin(t, b, 1, time.Hour, 5*time.Second)
	if len(la) != 1 || la[0].Message.ID != idA || len(lb) != 1 || lb[0].Message.ID != idB {
		t.Fatal("setup: leases not as expected")
	}
	a.Close() // node a "crashes" with its lease outstanding
	a2 := openQueue(t, url, cfgA)
	if m, err := a2.Get(context.Background(), idA); err != nil || m.State != queue.StateQueued {
		t.Fatalf("a's message after a restarts: %v, %v; want queued", m, err)
	}
	if m, err := a2.Get(context.Background(), idB); err != nil || m.State != queue.StateLeased {
		t.Fatalf("b's message after a restarts: %v, %v; want still leased", m, err)
	}
	ls := leaseWithin(t, a2, 5, time.Hour, 5*time.Second)
	if len(ls) != 1 || ls[0].Message.ID != idA {
		t.Fatalf("restarted a leased %v, want only %s", ls, idA)
	}
	if _, err := b.Settle(context.Background(), lb[0], []queue.Outcome{{Rcpt: "r@example.test", Result: queue.Delivered}}); err != nil {
		t.Errorf("b's lease was disturbed: %v", err)
	}
}

// TestOpen_BodyRemovedWhileReading: a reader of a message deleted under
// it fails instead of returning a short body.
func TestOpen_BodyRemovedWhileReading(t *testing.T) {
	url := startNATS(t)
	q := openQueue(t, url, jetstream.Config{Prefix: uniquePrefix(), ChunkSize: 1024})
	id, err := q.Enqueue(context.Background(), env("r@example.test"), bytes.NewReader(make([]byte, 10*1024)))
	if err != nil {
		t.Fatal(err)
	}
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.ReadFull(rc, make([]byte, 1500)); err != nil {
		t.Fatal(err)
	}
	if err := q.Delete(context.Background(), id); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(rc); !errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("reading a deleted body: %v, want ErrNotFound", err)
	}
}

// TestServerRestart_QueueKeepsWorking restarts the NATS server under two
// open queues: the messages survive, the connections come back, and a
// Lease waiting on one queue sees what the other enqueues afterwards.
func TestServerRestart_QueueKeepsWorking(t *testing.T) {
	dir := t.TempDir()
	var port int
	var srv *server.Server
	start := func() {
		o := &server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true, StoreDir: dir, NoLog: true, NoSigs: true, DisableJetStreamBanner: true}
		if port != 0 {
			o.Port = port
		}
		s, err := server.NewServer(o)
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		if !s.ReadyForConnections(10 * time.Second) {
			t.Fatal("nats server did not start")
		}
		port = s.Addr().(*net.TCPAddr).Port
		srv = s
	}
	start()
	t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
	prefix := uniquePrefix()
	a := openQueue(t, srv.ClientURL(), jetstream.Config{Prefix: prefix})
	b := openQueue(t, srv.ClientURL(), jetstream.Config{Prefix: prefix})
	first := enqueue(t, a, env("r@example.test"), "before")

	srv.Shutdown()
	srv.WaitForShutdown()
	start()

	var second queue.ID
	eventually(t, 30*time.Second, func() error {
		id, err := b.Enqueue(context.Background(), env("r@example.test"), strings.NewReader("after"))
		second = id
		return err
	})
	got := map[queue.ID]bool{}
	deadline := time.Now().Add(30 * time.Second)
	for len(got) < 2 && time.Now().Before(deadline) {
		for _, l := range leaseWithin(t, a, 2, time.Hour, 5*time.Second) {
			got[l.Message.ID] = true
		}
	}
	if !got[first] || !got[second] {
		t.Fatalf("after the restart a leased %v, want %s and %s", got, first, second)
	}
	if string(readBody(t, a, first)) != "before" || string(readBody(t, a, second)) != "after" {
		t.Error("bodies changed across the restart")
	}
}
