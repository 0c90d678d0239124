package queuetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

// Helpers.

func envelope(from string, to ...string) *queue.Envelope {
	e := &queue.Envelope{From: from}
	for _, a := range to {
		e.To = append(e.To, queue.Recipient{Addr: a})
	}
	return e
}

func (f *fixture) enqueue(env *queue.Envelope, body string) queue.ID {
	f.t.Helper()
	id, err := f.q.Enqueue(f.ctx, env, strings.NewReader(body))
	if err != nil {
		f.t.Fatalf("Enqueue: %v", err)
	}
	if id == "" {
		f.t.Fatal("Enqueue returned an empty ID")
	}
	return id
}

// lease leases what is due now; it fails the test if nothing is.
func (f *fixture) lease(max int, d time.Duration) []*queue.Lease {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, 20*time.Second)
	defer cancel()
	ls, err := f.q.Lease(ctx, max, d)
	if err != nil {
		f.t.Fatalf("Lease: %v (a due message was expected)", err)
	}
	if len(ls) == 0 {
		f.t.Fatal("Lease returned no leases and no error")
	}
	return ls
}

func (f *fixture) leaseOne(id queue.ID) *queue.Lease {
	f.t.Helper()
	ls := f.lease(1, time.Minute)
	if ls[0].Message.ID != id {
		f.t.Fatalf("leased %s, want %s", ls[0].Message.ID, id)
	}
	return ls[0]
}

// noLease checks that nothing is due: Lease must block until its context
// ends.
func (f *fixture) noLease() {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(f.ctx, 100*time.Millisecond)
	defer cancel()
	ls, err := f.q.Lease(ctx, 10, time.Minute)
	if len(ls) > 0 {
		f.t.Fatalf("Lease returned %s, but nothing should be due", ls[0].Message.ID)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		f.t.Fatalf("Lease with nothing due returned %v, want context.DeadlineExceeded", err)
	}
}

func (f *fixture) get(id queue.ID) *queue.Message {
	f.t.Helper()
	m, err := f.q.Get(f.ctx, id)
	if err != nil {
		f.t.Fatalf("Get(%s): %v", id, err)
	}
	return m
}

func (f *fixture) body(id queue.ID) []byte {
	f.t.Helper()
	rc, err := f.q.Open(f.ctx, id)
	if err != nil {
		f.t.Fatalf("Open(%s): %v", id, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		f.t.Fatalf("reading body of %s: %v", id, err)
	}
	return b
}

func (f *fixture) settle(l *queue.Lease, outcomes ...queue.Outcome) *queue.Message {
	f.t.Helper()
	m, err := f.q.Settle(f.ctx, l, outcomes)
	if err != nil {
		f.t.Fatalf("Settle(%s): %v", l.Message.ID, err)
	}
	return m
}

func (f *fixture) list(flt queue.Filter) []queue.ID {
	f.t.Helper()
	var ids []queue.ID
	err := f.q.List(f.ctx, flt, func(m *queue.Message) error {
		ids = append(ids, m.ID)
		return nil
	})
	if err != nil {
		f.t.Fatalf("List(%+v): %v", flt, err)
	}
	slices.Sort(ids)
	return ids
}

func (f *fixture) stats() *queue.Stats {
	f.t.Helper()
	s, err := f.q.Stats(f.ctx)
	if err != nil {
		f.t.Fatalf("Stats: %v", err)
	}
	return s
}

func sorted(ids ...queue.ID) []queue.ID {
	ids = slices.Clone(ids)
	slices.Sort(ids)
	return ids
}

func rcpt(m *queue.Message, addr string) *queue.RecipientStatus {
	for i := range m.Recipients {
		if m.Recipients[i].Addr == addr {
			return &m.Recipients[i]
		}
	}
	return nil
}

func retry(addr string, code int, text string) queue.Outcome {
	return queue.Outcome{Rcpt: addr, Result: queue.Retry, Reply: queue.Reply{Code: code, Enhanced: "4.0.0", Text: text}}
}

func delivered(addr string) queue.Outcome {
	return queue.Outcome{Rcpt: addr, Result: queue.Delivered, Reply: queue.Reply{Code: 250, Enhanced: "2.0.0", Text: "ok"}}
}

func failed(addr string) queue.Outcome {
	return queue.Outcome{Rcpt: addr, Result: queue.Failed, Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}}
}

// patternReader yields n deterministic pseudo-random bytes without
// holding them.
type patternReader struct {
	rng *rand.ChaCha8
	n   int64
}

func newPattern(n int64) *patternReader {
	return &patternReader{rng: rand.NewChaCha8([32]byte{'b', 'a', 't', 'o', 'n'}), n: n}
}

func (p *patternReader) Read(b []byte) (int, error) {
	if p.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(b)) > p.n {
		b = b[:p.n]
	}
	p.rng.Read(b)
	p.n -= int64(len(b))
	return len(b), nil
}

// cancelAfter cancels a context after the first read, then keeps
// producing data.
type cancelAfter struct {
	cancel func()
	reads  int
}

func (c *cancelAfter) Read(b []byte) (int, error) {
	c.reads++
	if c.reads == 2 {
		c.cancel()
	}
	for i := range b {
		b[i] = 'x'
	}
	return len(b), nil
}

var cases = []testCase{
	{name: "Enqueue_Body_ByteExact", run: func(t *testing.T, f *fixture, caps Capabilities) {
		all := make([]byte, 256)
		for i := range all {
			all[i] = byte(i)
		}
		bodies := map[string]string{
			"empty":         "",
			"simple":        "Subject: hi\r\n\r\nhello\r\n",
			"8bit":          "Subject: caf\xc3\xa9\r\n\r\n" + string(all) + "\r\n",
			"long line":     strings.Repeat("0123456789", 100_000),
			"bare CR LF":    "a\rb\nc\r\n\r\r\n.\r\n\n.\n\r.\r",
			"no final CRLF": "x",
			"NUL bytes":     "\x00\x00\r\n\x00",
			"dot lines":     ".\r\n..\r\n.x\r\n",
		}
		for name, b := range bodies {
			id := f.enqueue(envelope("s@example.test", "r@example.test"), b)
			if got := f.body(id); !bytes.Equal(got, []byte(b)) {
				t.Errorf("%s: body differs: got %d bytes, want %d", name, len(got), len(b))
			}
			if m := f.get(id); m.Size != int64(len(b)) {
				t.Errorf("%s: Size = %d, want %d", name, m.Size, len(b))
			}
		}
	}},
	{name: "Enqueue_LargeBody_Streamed", run: func(t *testing.T, f *fixture, caps Capabilities) {
		if caps.LargeBody < 0 {
			t.Skip("Capabilities.LargeBody is negative")
		}
		want := sha256.New()
		io.Copy(want, newPattern(caps.LargeBody))
		id, err := f.q.Enqueue(f.ctx, envelope("s@example.test", "r@example.test"), newPattern(caps.LargeBody))
		if err != nil {
			t.Fatalf("Enqueue: %v", err)
		}
		rc, err := f.q.Open(f.ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		got := sha256.New()
		n, err := io.Copy(got, rc)
		rc.Close()
		if err != nil || n != caps.LargeBody || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
			t.Fatalf("large body: read %d bytes (err %v), want %d identical bytes", n, err, caps.LargeBody)
		}
		// Two readers at once are independent.
		r1, _ := f.q.Open(f.ctx, id)
		r2, _ := f.q.Open(f.ctx, id)
		b1 := make([]byte, 1000)
		b2 := make([]byte, 1000)
		io.ReadFull(r1, b1)
		io.ReadFull(r2, b2)
		r1.Close()
		r2.Close()
		if !bytes.Equal(b1, b2) {
			t.Fatal("two readers of one body saw different bytes")
		}
	}},
	{name: "Enqueue_Envelope_AllFieldsKept", run: func(t *testing.T, f *fixture, caps Capabilities) {
		env := &queue.Envelope{
			From: "Sender+tag@Example.test",
			To: []queue.Recipient{
				{Addr: "a@one.test", Notify: queue.NotifySuccess | queue.NotifyFailure, ORCPT: "rfc822;a@one.test"},
				{Addr: "b@two.test", Notify: queue.NotifyNever},
				{Addr: "Ünï@three.test"},
			},
			Ret: queue.RetHeaders, EnvID: "env-123", SMTPUTF8: true, EightBit: true, RequireTLS: true, Identity: "alice",
		}
		id := f.enqueue(env, "body\r\n")
		m := f.get(id)
		if m.ID != id || m.Envelope.From != env.From || !slices.Equal(m.Envelope.To, env.To) || m.Envelope.Ret != env.Ret ||
			m.Envelope.EnvID != env.EnvID || !m.Envelope.SMTPUTF8 || !m.Envelope.EightBit || !m.Envelope.RequireTLS || m.Envelope.Identity != "alice" {
			t.Fatalf("envelope changed:\n got %+v\nwant %+v", m.Envelope, *env)
		}
		if !m.Received.Equal(start) || !m.Expires.Equal(start.Add(TestSchedule.MaxAge)) {
			t.Errorf("Received %v Expires %v, want %v and %v", m.Received, m.Expires, start, start.Add(TestSchedule.MaxAge))
		}
		if m.State != queue.StateQueued || len(m.Recipients) != 3 {
			t.Fatalf("State %v with %d recipients, want queued with 3", m.State, len(m.Recipients))
		}
		for i, r := range m.Recipients {
			if r.Recipient != env.To[i] || r.State != queue.RcptPending || r.Attempts != 0 || !r.NextAttempt.Equal(start) {
				t.Errorf("recipient %d = %+v, want pending, due at %v", i, r, start)
			}
		}
		// The caller's envelope is not aliased.
		env.To[0].Addr = "changed@one.test"
		if f.get(id).Envelope.To[0].Addr != "a@one.test" {
			t.Error("queue aliases the caller's recipient slice")
		}
	}},
	{name: "Enqueue_InvalidEnvelope_ErrInvalid", run: func(t *testing.T, f *fixture, caps Capabilities) {
		for _, env := range []*queue.Envelope{
			envelope("s@example.test"),
			envelope("s@example.test", "a@example.test", "A@example.test"),
			envelope("s@example.test", "a@exa\r\nmple.test"),
		} {
			if _, err := f.q.Enqueue(f.ctx, env, strings.NewReader("x")); !errors.Is(err, queue.ErrInvalid) {
				t.Errorf("Enqueue(%v) = %v, want ErrInvalid", env.To, err)
			}
		}
		if n := len(f.list(queue.Filter{})); n != 0 {
			t.Errorf("%d messages stored after invalid enqueues", n)
		}
	}},
	{name: "Enqueue_CancelledContext_StoresNothing", run: func(t *testing.T, f *fixture, caps Capabilities) {
		ctx, cancel := context.WithCancel(f.ctx)
		cancel()
		if _, err := f.q.Enqueue(ctx, envelope("s@example.test", "r@example.test"), strings.NewReader("x")); !errors.Is(err, context.Canceled) {
			t.Errorf("Enqueue with a cancelled context = %v, want context.Canceled", err)
		}
		ctx, cancel = context.WithCancel(f.ctx)
		defer cancel()
		r := &cancelAfter{cancel: cancel}
		if _, err := f.q.Enqueue(ctx, envelope("s@example.test", "r@example.test"), io.LimitReader(r, 1<<30)); !errors.Is(err, context.Canceled) {
			t.Errorf("Enqueue cancelled during the body = %v, want context.Canceled", err)
		}
		if n := len(f.list(queue.Filter{})); n != 0 {
			t.Errorf("%d messages stored by cancelled enqueues", n)
		}
		f.noLease()
	}},
	{name: "Enqueue_BodyReadError_StoresNothing", run: func(t *testing.T, f *fixture, caps Capabilities) {
		boom := errors.New("client went away")
		_, err := f.q.Enqueue(f.ctx, envelope("s@example.test", "r@example.test"), io.MultiReader(strings.NewReader("partial"), errReader{boom}))
		if !errors.Is(err, boom) {
			t.Errorf("Enqueue = %v, want the body's error", err)
		}
		if n := len(f.list(queue.Filter{})); n != 0 {
			t.Errorf("%d messages stored after a failed body", n)
		}
	}},
	{name: "Enqueue_Concurrent_DistinctIDs", run: func(t *testing.T, f *fixture, caps Capabilities) {
		const workers, each = 16, 8
		var mu sync.Mutex
		seen := map[queue.ID]string{}
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := range each {
					body := fmt.Sprintf("message %d/%d\r\n", w, i)
					id, err := f.q.Enqueue(f.ctx, envelope("s@example.test", "r@example.test"), strings.NewReader(body))
					if err != nil {
						t.Errorf("Enqueue: %v", err)
						return
					}
					mu.Lock()
					if _, dup := seen[id]; dup {
						t.Errorf("duplicate ID %s", id)
					}
					seen[id] = body
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if len(f.list(queue.Filter{})) != workers*each {
			t.Fatalf("listed %d messages, want %d", len(f.list(queue.Filter{})), workers*each)
		}
		for id, body := range seen {
			if string(f.body(id)) != body {
				t.Fatalf("body of %s mixed up", id)
			}
		}
	}},
	{name: "Reopen_AcknowledgedMessagesSurvive", durable: true, run: func(t *testing.T, f *fixture, caps Capabilities) {
		plain := f.enqueue(envelope("s@example.test", "r@example.test"), "plain\r\n")
		big := strings.Repeat("line of text\r\n", 20000)
		bigID := f.enqueue(envelope("", "r@example.test"), big)
		deferred := f.enqueue(envelope("s@example.test", "a@one.test", "b@two.test", "c@three.test"), "deferred\r\n")
		held := f.enqueue(envelope("s@example.test", "r@example.test"), "held\r\n")
		if err := f.q.Hold(f.ctx, held); err != nil {
			t.Fatal(err)
		}
		var leasedD *queue.Lease
		for _, l := range f.lease(10, time.Hour) {
			if l.Message.ID == deferred {
				leasedD = l
			}
		}
		if leasedD == nil {
			t.Fatal("deferred message was not leased")
		}
		f.settle(leasedD, delivered("a@one.test"), retry("b@two.test", 451, "try later"), failed("c@three.test"))
		before := f.get(deferred)

		f.reopen()

		if got := f.list(queue.Filter{}); !slices.Equal(got, sorted(plain, bigID, deferred, held)) {
			t.Fatalf("after reopen listed %v, want %v", got, sorted(plain, bigID, deferred, held))
		}
		if string(f.body(bigID)) != big || string(f.body(plain)) != "plain\r\n" {
			t.Fatal("bodies changed across reopen")
		}
		if f.get(bigID).Envelope.From != "" {
			t.Error("null sender changed across reopen")
		}
		if f.get(held).State != queue.StateHeld {
			t.Errorf("held message is %v after reopen", f.get(held).State)
		}
		after := f.get(deferred)
		if after.State != queue.StateDeferred {
			t.Errorf("deferred message is %v after reopen", after.State)
		}
		for i := range before.Recipients {
			b, a := before.Recipients[i], after.Recipients[i]
			if b.State != a.State || b.Attempts != a.Attempts || !b.NextAttempt.Equal(a.NextAttempt) || b.Last != a.Last || len(b.History) != len(a.History) {
				t.Errorf("recipient %s changed across reopen:\n got %+v\nwant %+v", b.Addr, a, b)
			}
		}
		// The leases of the previous process are gone: everything not
		// held and due is leasable now (the deferred one only later).
		var got []queue.ID
		for _, l := range f.lease(10, time.Hour) {
			got = append(got, l.Message.ID)
		}
		if slices.Sort(got); !slices.Equal(got, sorted(plain, bigID)) {
			t.Errorf("leased %v after reopen, want %v", got, sorted(plain, bigID))
		}
		f.clock.Advance(TestSchedule.Min)
		if l := f.leaseOne(deferred); !slices.Equal(l.Due, []int{1}) {
			t.Errorf("deferred message due for %v, want [1]", l.Due)
		}
	}},
	{name: "Reopen_LeasedMessageDueAgain", durable: true, run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l := f.leaseOne(id)
		f.reopen()
		l2 := f.leaseOne(id)
		if l2.Token == l.Token {
			t.Error("lease token reused after reopen")
		}
		if _, err := f.q.Settle(f.ctx, l, []queue.Outcome{delivered("r@example.test")}); !errors.Is(err, queue.ErrLeaseLost) {
			t.Errorf("Settle with a lease from before the reopen = %v, want ErrLeaseLost", err)
		}
		f.settle(l2, delivered("r@example.test"))
		f.reopen()
		if n := len(f.list(queue.Filter{})); n != 0 {
			t.Errorf("delivered message came back after reopen (%d listed)", n)
		}
	}},
	{name: "Lease_CompetingWorkers_EachMessageOnce", run: func(t *testing.T, f *fixture, caps Capabilities) {
		const n, workers = 60, 8
		for i := range n {
			f.enqueue(envelope("s@example.test", fmt.Sprintf("r%d@example.test", i)), "x")
		}
		ctx, cancel := context.WithCancel(f.ctx)
		defer cancel()
		var mu sync.Mutex
		seen := map[queue.ID]int{}
		var wg sync.WaitGroup
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					ls, err := f.q.Lease(ctx, 3, time.Hour)
					if err != nil {
						if ctx.Err() == nil {
							t.Errorf("Lease: %v", err)
						}
						return
					}
					mu.Lock()
					for _, l := range ls {
						seen[l.Message.ID]++
					}
					if len(seen) == n {
						cancel()
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if len(seen) != n {
			t.Fatalf("%d distinct messages leased, want %d", len(seen), n)
		}
		for id, c := range seen {
			if c != 1 {
				t.Errorf("%s leased %d times", id, c)
			}
		}
		f.noLease()
	}},
	{name: "Lease_RespectsMax", run: func(t *testing.T, f *fixture, caps Capabilities) {
		for i := range 5 {
			f.enqueue(envelope("s@example.test", fmt.Sprintf("r%d@example.test", i)), "x")
		}
		if ls := f.lease(2, time.Minute); len(ls) > 2 {
			t.Errorf("Lease(max 2) returned %d", len(ls))
		}
		for _, l := range f.lease(0, time.Minute) {
			if len(l.Due) != 1 || !l.Until.Equal(start.Add(time.Minute)) || l.Token == "" || l.Message.State != queue.StateLeased {
				t.Errorf("lease %+v: want one due recipient, Until %v, a token, state leased", l, start.Add(time.Minute))
			}
		}
	}},
	{name: "Lease_Expiry_Redelivers", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l1 := f.leaseOne(id)
		if got := f.get(id).State; got != queue.StateLeased {
			t.Errorf("state while leased = %v", got)
		}
		f.noLease()
		f.clock.Advance(time.Minute - time.Nanosecond)
		f.noLease()
		f.clock.Advance(time.Nanosecond)
		if got := f.get(id).State; got != queue.StateQueued {
			t.Errorf("state after the lease expired = %v, want queued", got)
		}
		l2 := f.leaseOne(id)
		if l2.Token == l1.Token {
			t.Fatal("expired lease re-issued with the same token")
		}
		if _, err := f.q.Settle(f.ctx, l1, []queue.Outcome{delivered("r@example.test")}); !errors.Is(err, queue.ErrLeaseLost) {
			t.Fatalf("Settle of the expired lease = %v, want ErrLeaseLost", err)
		}
		if f.get(id).Recipients[0].State != queue.RcptPending {
			t.Fatal("a lost lease changed the message")
		}
		f.settle(l2, delivered("r@example.test"))
		if _, err := f.q.Settle(f.ctx, l2, []queue.Outcome{delivered("r@example.test")}); !errors.Is(err, queue.ErrLeaseLost) {
			t.Errorf("second Settle of one lease = %v, want ErrLeaseLost", err)
		}
	}},
	{name: "Lease_ExpiredButNotRetaken_StillSettles", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l := f.leaseOne(id)
		f.clock.Advance(2 * time.Minute)
		f.settle(l, delivered("r@example.test"))
		if _, err := f.q.Get(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Get after delivery = %v, want ErrNotFound", err)
		}
	}},
	{name: "Lease_BlocksUntilEnqueue", run: func(t *testing.T, f *fixture, caps Capabilities) {
		got := make(chan []*queue.Lease, 1)
		errc := make(chan error, 1)
		go func() {
			ls, err := f.q.Lease(f.ctx, 1, time.Minute)
			got <- ls
			errc <- err
		}()
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		ls := <-got
		if err := <-errc; err != nil || len(ls) != 1 || ls[0].Message.ID != id {
			t.Fatalf("blocked Lease returned %v, %v; want the new message", ls, err)
		}
	}},
	{name: "Lease_ContextCancelled_Returns", run: func(t *testing.T, f *fixture, caps Capabilities) {
		ctx, cancel := context.WithCancel(f.ctx)
		errc := make(chan error, 1)
		go func() {
			_, err := f.q.Lease(ctx, 1, time.Minute)
			errc <- err
		}()
		cancel()
		if err := <-errc; !errors.Is(err, context.Canceled) {
			t.Fatalf("Lease = %v, want context.Canceled", err)
		}
	}},
	{name: "Settle_PerRecipientOutcomes", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "a@one.test", "b@two.test", "c@three.test"), "x")
		l := f.leaseOne(id)
		if !slices.Equal(l.Due, []int{0, 1, 2}) {
			t.Fatalf("Due = %v", l.Due)
		}
		f.clock.Advance(10 * time.Second)
		now := f.clock.Now()
		m := f.settle(l, delivered("a@one.test"), failed("b@two.test"), retry("c@three.test", 451, "greylisted"))
		for _, mm := range []*queue.Message{m, f.get(id)} {
			a, b, c := rcpt(mm, "a@one.test"), rcpt(mm, "b@two.test"), rcpt(mm, "c@three.test")
			if a.State != queue.RcptDelivered || b.State != queue.RcptFailed || c.State != queue.RcptPending {
				t.Fatalf("states %v %v %v, want delivered failed pending", a.State, b.State, c.State)
			}
			if b.Last.Code != 550 || b.Last.Enhanced != "5.1.1" || c.Last.Text != "greylisted" || b.Expired {
				t.Errorf("replies not recorded: %+v / %+v", b.Last, c.Last)
			}
			if a.Attempts != 1 || b.Attempts != 1 || c.Attempts != 1 {
				t.Errorf("attempts %d %d %d, want 1 each", a.Attempts, b.Attempts, c.Attempts)
			}
			if !c.NextAttempt.Equal(now.Add(TestSchedule.Min)) {
				t.Errorf("retry at %v, want %v (Schedule.Min after the attempt)", c.NextAttempt, now.Add(TestSchedule.Min))
			}
			if len(c.History) != 1 || c.History[0].Result != queue.Retry || !c.History[0].At.Equal(now) || c.History[0].Reply.Code != 451 {
				t.Errorf("history %+v", c.History)
			}
			if mm.State != queue.StateDeferred {
				t.Errorf("state %v, want deferred", mm.State)
			}
		}
		f.noLease()
		f.clock.Advance(TestSchedule.Min)
		l = f.leaseOne(id)
		if !slices.Equal(l.Due, []int{2}) {
			t.Fatalf("Due = %v, want only the pending recipient [2]", l.Due)
		}
		// Second failure: the delay doubles.
		now = f.clock.Now()
		m = f.settle(l, retry("c@three.test", 421, "busy"))
		c := rcpt(m, "c@three.test")
		if c.Attempts != 2 || !c.NextAttempt.Equal(now.Add(2*TestSchedule.Min)) || len(c.History) != 2 {
			t.Errorf("after the second failure: %+v, want 2 attempts, next at %v", c, now.Add(2*TestSchedule.Min))
		}
		f.clock.Advance(2 * TestSchedule.Min)
		l = f.leaseOne(id)
		m = f.settle(l, delivered("c@three.test"))
		if rcpt(m, "c@three.test").State != queue.RcptDelivered {
			t.Error("final snapshot does not show the delivery")
		}
		if _, err := f.q.Get(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("message with every recipient final is still there: %v", err)
		}
		if _, err := f.q.Open(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Open of a finished message = %v, want ErrNotFound", err)
		}
	}},
	{name: "Settle_MissingOutcome_StaysDue", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "a@one.test", "b@two.test"), "x")
		l := f.leaseOne(id)
		f.settle(l, delivered("a@one.test"), queue.Outcome{Rcpt: "nobody@else.test", Result: queue.Delivered})
		l = f.leaseOne(id)
		if !slices.Equal(l.Due, []int{1}) || l.Message.Recipients[1].Attempts != 0 {
			t.Fatalf("Due %v, attempts %d: the recipient without an outcome should be due, untried", l.Due, l.Message.Recipients[1].Attempts)
		}
	}},
	{name: "Settle_HistoryBounded", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		const attempts = queue.MaxHistory + 4
		for i := range attempts {
			l := f.leaseOne(id)
			o := retry("r@example.test", 451, fmt.Sprint("attempt ", i+1))
			o.RetryAt = f.clock.Now().Add(time.Second)
			f.settle(l, o)
			f.clock.Advance(time.Second)
		}
		check := func(when string) {
			r := f.get(id).Recipients[0]
			if r.Attempts != attempts || len(r.History) != queue.MaxHistory {
				t.Fatalf("%s: %d attempts, %d history entries; want %d and %d", when, r.Attempts, len(r.History), attempts, queue.MaxHistory)
			}
			if first, last := r.History[0].Reply.Text, r.History[len(r.History)-1].Reply.Text; first != "attempt 5" || last != fmt.Sprint("attempt ", attempts) {
				t.Errorf("%s: history runs from %q to %q; want the most recent, oldest first", when, first, last)
			}
		}
		check("before reopen")
		if caps.Durable {
			f.reopen()
			check("after reopen")
		}
	}},
	{name: "Settle_ExplicitRetryAt_NotDueBefore", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l := f.leaseOne(id)
		at := start.Add(17 * time.Minute)
		o := retry("r@example.test", 452, "mailbox full")
		o.RetryAt = at
		f.settle(l, o)
		if got := f.get(id).Recipients[0].NextAttempt; !got.Equal(at) {
			t.Fatalf("NextAttempt %v, want %v", got, at)
		}
		f.clock.Advance(17*time.Minute - time.Second)
		f.noLease()
		f.clock.Advance(time.Second)
		f.leaseOne(id)
	}},
	{name: "Settle_MaxAge_FailsAsExpired", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "a@one.test", "b@two.test"), "x")
		f.clock.Advance(TestSchedule.MaxAge - 30*time.Second)
		l := f.leaseOne(id)
		// A retry that would fall after the deadline gets one last try at
		// the deadline itself.
		m := f.settle(l, retry("a@one.test", 451, "later"), retry("b@two.test", 451, "later"))
		if a := rcpt(m, "a@one.test"); a.State != queue.RcptPending || !a.NextAttempt.Equal(m.Expires) {
			t.Fatalf("retry near the deadline: %+v, want pending until %v", a, m.Expires)
		}
		f.clock.Advance(30 * time.Second)
		l = f.leaseOne(id)
		m = f.settle(l, retry("a@one.test", 451, "still later"), delivered("b@two.test"))
		a := rcpt(m, "a@one.test")
		if a.State != queue.RcptFailed || !a.Expired || a.Last.Text != "still later" {
			t.Fatalf("at the deadline: %+v, want failed and Expired with the last reply", a)
		}
		if _, err := f.q.Get(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("expired message still queued: %v", err)
		}
	}},
	{name: "Hold_NotLeased_ReleaseMakesDue", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		if err := f.q.Hold(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := f.q.Hold(f.ctx, id); err != nil {
			t.Fatalf("second Hold: %v", err)
		}
		if f.get(id).State != queue.StateHeld {
			t.Fatalf("state %v, want held", f.get(id).State)
		}
		f.noLease()
		if n, err := f.q.Retry(f.ctx, queue.Filter{}); err != nil || n != 0 {
			t.Errorf("Retry touched %d held messages (%v)", n, err)
		}
		f.noLease()
		if err := f.q.Release(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if f.get(id).State != queue.StateQueued {
			t.Errorf("state after release %v", f.get(id).State)
		}
		f.leaseOne(id)
	}},
	{name: "Hold_DeferredMessage_ReleaseMakesDueNow", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		f.settle(f.leaseOne(id), retry("r@example.test", 451, "later"))
		if err := f.q.Hold(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		f.clock.Advance(time.Hour / 2)
		f.noLease()
		if err := f.q.Release(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if m := f.get(id); m.State != queue.StateDeferred || m.Recipients[0].NextAttempt.After(f.clock.Now()) {
			t.Errorf("after release: %v next %v", m.State, m.Recipients[0].NextAttempt)
		}
		f.leaseOne(id)
	}},
	{name: "Hold_EnqueuedHeld", run: func(t *testing.T, f *fixture, caps Capabilities) {
		env := envelope("s@example.test", "r@example.test")
		env.Held = true
		id := f.enqueue(env, "sandbox")
		if f.get(id).State != queue.StateHeld {
			t.Fatalf("state %v, want held", f.get(id).State)
		}
		f.noLease()
		if err := f.q.Release(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		f.leaseOne(id)
	}},
	{name: "Hold_WhileLeased_HeldAfterSettle", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "a@one.test", "b@two.test"), "x")
		l := f.leaseOne(id)
		if err := f.q.Hold(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		m := f.settle(l, delivered("a@one.test"), retry("b@two.test", 451, "later"))
		if m.State != queue.StateHeld || f.get(id).State != queue.StateHeld {
			t.Errorf("after settle: %v / %v, want held", m.State, f.get(id).State)
		}
		f.clock.Advance(time.Hour / 2)
		f.noLease()
	}},
	{name: "Delete_TwiceIsSafe", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l := f.leaseOne(id)
		other := f.enqueue(envelope("s@example.test", "r@example.test"), "y")
		if err := f.q.Delete(f.ctx, id); err != nil {
			t.Fatal(err)
		}
		if err := f.q.Delete(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("second Delete = %v, want ErrNotFound", err)
		}
		if _, err := f.q.Settle(f.ctx, l, []queue.Outcome{delivered("r@example.test")}); !errors.Is(err, queue.ErrLeaseLost) {
			t.Errorf("Settle of a deleted message = %v, want ErrLeaseLost", err)
		}
		if got := f.list(queue.Filter{}); !slices.Equal(got, []queue.ID{other}) {
			t.Errorf("after delete listed %v, want only %s", got, other)
		}
		if s := f.stats(); s.ByDomain["example.test"] != 1 {
			t.Errorf("ByDomain after delete = %v, want example.test: 1", s.ByDomain)
		}
	}},
	{name: "Errors_UnknownID_ErrNotFound", run: func(t *testing.T, f *fixture, caps Capabilities) {
		const id = queue.ID("NOSUCHMESSAGEID0")
		if _, err := f.q.Get(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Get: %v", err)
		}
		if _, err := f.q.Open(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Open: %v", err)
		}
		if err := f.q.Hold(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Hold: %v", err)
		}
		if err := f.q.Release(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Release: %v", err)
		}
		if err := f.q.Delete(f.ctx, id); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Delete: %v", err)
		}
		if _, err := f.q.Get(f.ctx, "../../etc/passwd"); !errors.Is(err, queue.ErrNotFound) {
			t.Errorf("Get of a path: %v", err)
		}
		if n, err := f.q.Retry(f.ctx, queue.Filter{ID: id}); err != nil || n != 0 {
			t.Errorf("Retry of an unknown ID = %d, %v", n, err)
		}
	}},
	{name: "Retry_ByID_Domain_All", run: func(t *testing.T, f *fixture, caps Capabilities) {
		a := f.enqueue(envelope("s@example.test", "x@one.test", "y@two.test"), "a")
		b := f.enqueue(envelope("s@example.test", "z@two.test"), "b")
		c := f.enqueue(envelope("s@example.test", "w@three.test"), "c")
		h := f.enqueue(envelope("s@example.test", "v@two.test"), "h")
		for _, l := range f.lease(10, time.Minute) {
			var o []queue.Outcome
			for _, i := range l.Due {
				o = append(o, retry(l.Message.Recipients[i].Addr, 451, "later"))
			}
			f.settle(l, o...)
		}
		if err := f.q.Hold(f.ctx, h); err != nil {
			t.Fatal(err)
		}
		f.noLease()
		if n, err := f.q.Retry(f.ctx, queue.Filter{ID: c}); err != nil || n != 1 {
			t.Fatalf("Retry(ID) = %d, %v", n, err)
		}
		if l := f.leaseOne(c); l.Message.ID != c {
			t.Fatal("wrong message")
		}
		f.noLease()
		if n, err := f.q.Retry(f.ctx, queue.Filter{Domain: "TWO.test"}); err != nil || n != 2 {
			t.Fatalf("Retry(domain) = %d, %v; want 2 (the held one is not touched)", n, err)
		}
		got := map[queue.ID][]int{}
		for _, l := range f.lease(10, time.Minute) {
			got[l.Message.ID] = l.Due
		}
		if len(got) != 2 || !slices.Equal(got[a], []int{1}) || !slices.Equal(got[b], []int{0}) {
			t.Fatalf("after Retry(domain) leased %v; want %s for [1] and %s for [0]", got, a, b)
		}
		f.clock.Advance(2 * time.Minute) // the leases expire
		if _, err := f.q.Retry(f.ctx, queue.Filter{}); err != nil {
			t.Fatal(err)
		}
		ids := []queue.ID{}
		for _, l := range f.lease(10, time.Minute) {
			ids = append(ids, l.Message.ID)
		}
		if slices.Sort(ids); !slices.Equal(ids, sorted(a, b, c)) {
			t.Errorf("after Retry(all) leased %v, want %v", ids, sorted(a, b, c))
		}
	}},
	{name: "List_Filters", run: func(t *testing.T, f *fixture, caps Capabilities) {
		// Timeline: a at start (deferred), b a minute later (leased), c
		// and h two minutes after start (queued and held).
		a := f.enqueue(envelope("Alice@Example.test", "x@one.test", "y@two.test"), "a")
		later := retry("y@two.test", 451, "later")
		later.RetryAt = start.Add(30 * time.Minute)
		f.settle(f.leaseOne(a), delivered("x@one.test"), later)
		f.clock.Advance(time.Minute)
		b := f.enqueue(envelope("", "z@two.test"), "b")
		if ls := f.lease(1, time.Hour); ls[0].Message.ID != b {
			t.Fatalf("leased %s, want %s", ls[0].Message.ID, b)
		}
		f.clock.Advance(time.Minute)
		c := f.enqueue(envelope("bob@example.test", "w@three.test"), "c")
		h := f.enqueue(envelope("bob@example.test", "v@one.test"), "h")
		if err := f.q.Hold(f.ctx, h); err != nil {
			t.Fatal(err)
		}
		checks := []struct {
			f    queue.Filter
			want []queue.ID
		}{
			{queue.Filter{}, sorted(a, b, c, h)},
			{queue.Filter{ID: c}, []queue.ID{c}},
			{queue.Filter{Domain: "one.test"}, []queue.ID{h}}, // a's one.test recipient is delivered
			{queue.Filter{Domain: "two.test."}, sorted(a, b)},
			{queue.Filter{Sender: "alice@example.TEST"}, []queue.ID{a}},
			{queue.Filter{Null: true}, []queue.ID{b}},
			{queue.Filter{State: queue.StateDeferred}, []queue.ID{a}},
			{queue.Filter{State: queue.StateLeased}, []queue.ID{b}},
			{queue.Filter{State: queue.StateHeld}, []queue.ID{h}},
			{queue.Filter{State: queue.StateQueued}, []queue.ID{c}},
			{queue.Filter{ReceivedBefore: start.Add(time.Minute)}, []queue.ID{a}},
			{queue.Filter{ReceivedBefore: start.Add(2 * time.Minute)}, sorted(a, b)},
			{queue.Filter{Sender: "bob@example.test", State: queue.StateHeld}, []queue.ID{h}},
		}
		for _, ck := range checks {
			if got := f.list(ck.f); !slices.Equal(got, ck.want) {
				t.Errorf("List(%+v) = %v, want %v", ck.f, got, ck.want)
			}
		}
		stop := errors.New("stop")
		n := 0
		err := f.q.List(f.ctx, queue.Filter{}, func(*queue.Message) error { n++; return stop })
		if !errors.Is(err, stop) || n != 1 {
			t.Errorf("List with fn error: %v after %d calls, want the error after 1", err, n)
		}
		ctx, cancel := context.WithCancel(f.ctx)
		cancel()
		if err := f.q.List(ctx, queue.Filter{}, func(*queue.Message) error { return nil }); !errors.Is(err, context.Canceled) {
			t.Errorf("List with a cancelled context = %v", err)
		}
		// Snapshots are copies.
		m := f.get(a)
		m.Recipients[1].State = queue.RcptDelivered
		m.Envelope.To[0].Addr = "changed@x.test"
		if g := f.get(a); g.Recipients[1].State != queue.RcptPending || g.Envelope.To[0].Addr != "x@one.test" {
			t.Error("changing a snapshot changed the queue")
		}
	}},
	{name: "Stats_ByStateAndDomain", run: func(t *testing.T, f *fixture, caps Capabilities) {
		if s := f.stats(); len(s.ByDomain) != 0 || s.ByState[queue.StateQueued] != 0 {
			t.Fatalf("empty queue stats %+v", s)
		}
		a := f.enqueue(envelope("s@example.test", "x@one.test", "y@Two.test"), "a")
		f.settle(f.leaseOne(a), delivered("x@one.test"), retry("y@Two.test", 451, "later"))
		b := f.enqueue(envelope("s@example.test", "z@two.test"), "b")
		f.leaseOne(b)
		f.enqueue(envelope("s@example.test", "w@three.test"), "c")
		h := f.enqueue(envelope("s@example.test", "v@one.test"), "h")
		if err := f.q.Hold(f.ctx, h); err != nil {
			t.Fatal(err)
		}
		s := f.stats()
		wantState := map[queue.State]int{queue.StateQueued: 1, queue.StateDeferred: 1, queue.StateLeased: 1, queue.StateHeld: 1}
		for st, n := range wantState {
			if s.ByState[st] != n {
				t.Errorf("ByState[%v] = %d, want %d (all: %v)", st, s.ByState[st], n, s.ByState)
			}
		}
		wantDom := map[string]int{"one.test": 1, "two.test": 2, "three.test": 1}
		if len(s.ByDomain) != len(wantDom) {
			t.Errorf("ByDomain = %v, want %v", s.ByDomain, wantDom)
		}
		for d, n := range wantDom {
			if s.ByDomain[d] != n {
				t.Errorf("ByDomain[%s] = %d, want %d", d, s.ByDomain[d], n)
			}
		}
	}},
	{name: "Close_ThenErrClosed", run: func(t *testing.T, f *fixture, caps Capabilities) {
		id := f.enqueue(envelope("s@example.test", "r@example.test"), "x")
		l := f.leaseOne(id)
		q := f.q
		blocked := make(chan error, 1)
		go func() {
			_, err := q.Lease(f.ctx, 1, time.Minute)
			blocked <- err
		}()
		if err := q.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		f.q = nil
		if err := <-blocked; !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Lease blocked at Close returned %v, want ErrClosed", err)
		}
		if _, err := q.Enqueue(f.ctx, envelope("s@example.test", "r@example.test"), strings.NewReader("x")); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Enqueue after Close: %v", err)
		}
		if _, err := q.Lease(f.ctx, 1, time.Minute); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Lease after Close: %v", err)
		}
		if _, err := q.Settle(f.ctx, l, nil); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Settle after Close: %v", err)
		}
		if _, err := q.Get(f.ctx, id); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Get after Close: %v", err)
		}
		if err := q.List(f.ctx, queue.Filter{}, func(*queue.Message) error { return nil }); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("List after Close: %v", err)
		}
		if _, err := q.Stats(f.ctx); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Stats after Close: %v", err)
		}
		if _, err := q.Open(f.ctx, id); !errors.Is(err, queue.ErrClosed) {
			t.Errorf("Open after Close: %v", err)
		}
		if err := q.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	}},
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }
