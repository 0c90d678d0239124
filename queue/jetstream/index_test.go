package jetstream

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func rec(next time.Time, held bool, until time.Time) *record {
	return recIn("", next, held, until)
}

// recIn is rec for a message of the given stream.
func recIn(stream string, next time.Time, held bool, until time.Time) *record {
	m := queue.NewMessage("x", &queue.Envelope{To: []queue.Recipient{{Addr: "r@example.test"}}, Stream: stream}, 0, next, queue.Schedule{})
	if held {
		m.State = queue.StateHeld
	}
	r := &record{Msg: m}
	if !until.IsZero() {
		r.Token, r.Until = "tok", until
	}
	return r
}

func TestIndex_CandidatesEarliestFirst_StaleEntriesDropped(t *testing.T) {
	x := newIndex()
	x.put("late", 1, rec(t0.Add(2*time.Minute), false, time.Time{}))
	x.put("b", 2, rec(t0.Add(-time.Minute), false, time.Time{}))
	x.put("a", 3, rec(t0.Add(-2*time.Minute), false, time.Time{}))
	x.put("held", 4, rec(t0.Add(-3*time.Minute), true, time.Time{}))
	x.put("leased", 5, rec(t0.Add(-3*time.Minute), false, t0.Add(time.Minute)))
	// "b" is leased at a newer revision: its old heap entry is stale.
	x.put("b", 6, rec(t0.Add(-time.Minute), false, t0.Add(30*time.Second)))
	// An older revision arriving late changes nothing.
	x.put("b", 2, rec(t0.Add(-time.Minute), false, time.Time{}))

	ids, _, _ := x.candidates("", t0, 10, t0.Add(time.Hour))
	if !slices.Equal(ids, []queue.ID{"a"}) {
		t.Fatalf("candidates = %v, want [a]", ids)
	}
	// While "a" is being claimed it is not offered again.
	ids, wake, next := x.candidates("", t0, 10, t0.Add(time.Hour))
	if len(ids) != 0 || wake == nil || !next.Equal(t0.Add(30*time.Second)) {
		t.Fatalf("second call = %v, next %v; want none, next at b's lease expiry", ids, next)
	}
	x.unwait("")
	// The claim of "a" failed without a change: it is offered again.
	x.claimed("a")
	if ids, _, _ := x.candidates("", t0, 10, t0.Add(time.Hour)); !slices.Equal(ids, []queue.ID{"a"}) {
		t.Fatalf("after a failed claim: %v, want [a]", ids)
	}
	x.claimed("a")
	later := t0.Add(time.Minute)
	ids, _, _ = x.candidates("", later, 10, later.Add(time.Hour))
	slices.Sort(ids)
	if !slices.Equal(ids, []queue.ID{"a", "b", "leased"}) {
		t.Fatalf("a minute later = %v, want [a b leased]", ids)
	}
}

func TestIndex_WaiterWokenOnlyByEarlierDueTime(t *testing.T) {
	x := newIndex()
	x.put("m", 1, rec(t0.Add(10*time.Minute), false, time.Time{}))
	_, wake, next := x.candidates("", t0, 1, t0.Add(time.Hour))
	if !next.Equal(t0.Add(10 * time.Minute)) {
		t.Fatalf("next = %v", next)
	}
	x.put("later", 2, rec(t0.Add(20*time.Minute), false, time.Time{}))
	select {
	case <-wake:
		t.Fatal("woken by a message due after the planned wake-up")
	default:
	}
	x.put("sooner", 3, rec(t0, false, time.Time{}))
	select {
	case <-wake:
	default:
		t.Fatal("not woken by a message due now")
	}
	x.unwait("")
}

func TestIndex_HeapStaysBounded(t *testing.T) {
	x := newIndex()
	for rev := uint64(1); rev <= 10000; rev++ {
		x.put("m", rev, rec(t0.Add(time.Duration(rev)*time.Second), false, time.Time{}))
	}
	if x.nh > 2*len(x.m)+1025 {
		t.Fatalf("heap holds %d entries for %d messages", x.nh, len(x.m))
	}
	ids, _, _ := x.candidates("", t0.Add(time.Hour*3), 10, t0.Add(time.Hour*4))
	if !slices.Equal(ids, []queue.ID{"m"}) {
		t.Fatalf("candidates = %v, want [m]", ids)
	}
}

func TestIndex_Streams_CandidatesPerStreamAndEarliestAcross(t *testing.T) {
	x := newIndex()
	for i := range 1000 {
		x.put(queue.ID(fmt.Sprintf("bulk%04d", i)), uint64(i+1), recIn("bulk", t0.Add(-time.Hour+time.Duration(i)*time.Second), false, time.Time{}))
	}
	x.put("tx", 2000, recIn("", t0, false, time.Time{}))
	x.put("txlate", 2001, recIn(queue.DefaultStream, t0.Add(time.Minute), false, time.Time{}))

	ids, _, _ := x.candidates(queue.DefaultStream, t0, 10, t0.Add(time.Hour))
	if !slices.Equal(ids, []queue.ID{"tx"}) {
		t.Fatalf("transactional candidates = %v, want [tx] (Stream \"\" is the default stream)", ids)
	}
	if len(x.streams[queue.DefaultStream].h) != 1 {
		t.Errorf("the transactional heap holds %d entries, want only txlate's", len(x.streams[queue.DefaultStream].h))
	}
	x.claimed("tx")
	// Every stream: the earliest first, whatever its stream.
	ids, _, _ = x.candidates("", t0, 3, t0.Add(time.Hour))
	if !slices.Equal(ids, []queue.ID{"bulk0000", "bulk0001", "bulk0002"}) {
		t.Fatalf("all-stream candidates = %v, want the three earliest bulk messages", ids)
	}
	ids, _, _ = x.candidates("bulk", t0, 2000, t0.Add(time.Hour))
	if len(ids) != 997 || slices.Contains(ids, "tx") {
		t.Fatalf("bulk candidates: %d (tx among them: %v), want the other 997 bulk messages", len(ids), slices.Contains(ids, "tx"))
	}
	ids, _, _ = x.candidates("", t0, 10, t0.Add(time.Hour))
	if !slices.Equal(ids, []queue.ID{"tx"}) {
		t.Fatalf("all-stream candidates while bulk is claimed = %v, want [tx]", ids)
	}
	_, wake, next := x.candidates("nosuch", t0, 1, t0.Add(time.Hour))
	if wake == nil || !next.Equal(t0.Add(time.Hour)) {
		t.Fatalf("unknown stream: next %v, want the limit", next)
	}
	x.unwait("nosuch")
}

func TestIndex_Streams_WaiterWokenByItsStream(t *testing.T) {
	x := newIndex()
	// A bulk waiter plans to look again soon; a transactional one only at
	// its limit. A transactional message due now must wake them.
	x.put("b", 1, recIn("bulk", t0.Add(time.Second), false, time.Time{}))
	_, _, nb := x.candidates("bulk", t0, 1, t0.Add(time.Minute))
	_, wake, nt := x.candidates(queue.DefaultStream, t0, 1, t0.Add(time.Minute))
	if !nb.Equal(t0.Add(time.Second)) || !nt.Equal(t0.Add(time.Minute)) {
		t.Fatalf("plans %v and %v", nb, nt)
	}
	// The bulk waiter wakes by its timer and goes away.
	x.unwait("bulk")
	x.put("later", 2, recIn(queue.DefaultStream, t0.Add(2*time.Minute), false, time.Time{}))
	select {
	case <-wake:
		t.Fatal("woken by a message due after every waiter's plan")
	default:
	}
	x.put("t", 3, recIn(queue.DefaultStream, t0.Add(10*time.Second), false, time.Time{}))
	select {
	case <-wake:
	default:
		t.Fatal("transactional waiter not woken by a transactional message due before its plan")
	}
	x.unwait(queue.DefaultStream)
	if len(x.waits) != 0 {
		t.Errorf("waits left behind: %v", x.waits)
	}
}

func TestIndex_WaiterAfterTimerWakeStillSignalled(t *testing.T) {
	// A waiter that planned an early look and woke by its timer must not
	// leave a past plan behind that keeps later waiters from being woken.
	x := newIndex()
	x.put("m", 1, rec(t0.Add(time.Second), false, time.Time{}))
	x.candidates("", t0, 1, t0.Add(time.Minute))
	x.unwait("")
	now := t0.Add(time.Second)
	ids, _, _ := x.candidates("", now, 1, now.Add(time.Minute))
	if !slices.Equal(ids, []queue.ID{"m"}) {
		t.Fatalf("candidates = %v", ids)
	}
	_, wake, _ := x.candidates("", now, 1, now.Add(time.Minute))
	x.put("n", 2, rec(now.Add(5*time.Second), false, time.Time{}))
	select {
	case <-wake:
	default:
		t.Fatal("waiter not woken by a message due before its plan")
	}
	x.unwait("")
}
