package jetstream

import (
	"slices"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func rec(next time.Time, held bool, until time.Time) *record {
	m := queue.NewMessage("x", &queue.Envelope{To: []queue.Recipient{{Addr: "r@example.test"}}}, 0, next, queue.Schedule{})
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

	ids, _, _ := x.candidates(t0, 10, t0.Add(time.Hour))
	if !slices.Equal(ids, []queue.ID{"a"}) {
		t.Fatalf("candidates = %v, want [a]", ids)
	}
	// While "a" is being claimed it is not offered again.
	ids, wake, next := x.candidates(t0, 10, t0.Add(time.Hour))
	if len(ids) != 0 || wake == nil || !next.Equal(t0.Add(30*time.Second)) {
		t.Fatalf("second call = %v, next %v; want none, next at b's lease expiry", ids, next)
	}
	x.unwait()
	// The claim of "a" failed without a change: it is offered again.
	x.claimed("a")
	if ids, _, _ := x.candidates(t0, 10, t0.Add(time.Hour)); !slices.Equal(ids, []queue.ID{"a"}) {
		t.Fatalf("after a failed claim: %v, want [a]", ids)
	}
	x.claimed("a")
	later := t0.Add(time.Minute)
	ids, _, _ = x.candidates(later, 10, later.Add(time.Hour))
	slices.Sort(ids)
	if !slices.Equal(ids, []queue.ID{"a", "b", "leased"}) {
		t.Fatalf("a minute later = %v, want [a b leased]", ids)
	}
}

func TestIndex_WaiterWokenOnlyByEarlierDueTime(t *testing.T) {
	x := newIndex()
	x.put("m", 1, rec(t0.Add(10*time.Minute), false, time.Time{}))
	_, wake, next := x.candidates(t0, 1, t0.Add(time.Hour))
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
	x.unwait()
}

func TestIndex_HeapStaysBounded(t *testing.T) {
	x := newIndex()
	for rev := uint64(1); rev <= 10000; rev++ {
		x.put("m", rev, rec(t0.Add(time.Duration(rev)*time.Second), false, time.Time{}))
	}
	if len(x.h) > 2*len(x.m)+1025 {
		t.Fatalf("heap holds %d entries for %d messages", len(x.h), len(x.m))
	}
	ids, _, _ := x.candidates(t0.Add(time.Hour*3), 10, t0.Add(time.Hour*4))
	if !slices.Equal(ids, []queue.ID{"m"}) {
		t.Fatalf("candidates = %v, want [m]", ids)
	}
}
