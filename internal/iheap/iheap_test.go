package iheap

import (
	"container/heap"
	"math/rand/v2"
	"testing"
)

type item struct {
	key, index int
}

func (a *item) Less(b *item) bool { return a.key < b.key }
func (a *item) SetIndex(i int)    { a.index = i }

// Random pushes, pops, fixes and removes keep the heap ordered and every
// item's recorded index true.
func TestHeap_IndexesAndOrder(t *testing.T) {
	var h Heap[*item]
	var in []*item
	check := func() {
		t.Helper()
		for i, it := range h {
			if it.index != i {
				t.Fatalf("item at %d records index %d", i, it.index)
			}
			if i > 0 && h[i].key < h[(i-1)/2].key {
				t.Fatalf("heap out of order at %d", i)
			}
		}
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 5000 {
		switch op := r.IntN(4); {
		case op == 0 || len(in) == 0:
			it := &item{key: r.IntN(1000)}
			heap.Push(&h, it)
			in = append(in, it)
		case op == 1:
			it := heap.Pop(&h).(*item)
			if it.index != -1 {
				t.Fatalf("popped item records index %d", it.index)
			}
			for i, x := range in {
				if x == it {
					in = append(in[:i], in[i+1:]...)
					break
				}
			}
			for _, x := range in {
				if x.key < it.key {
					t.Fatalf("popped %d while %d was in the heap", it.key, x.key)
				}
			}
		case op == 2:
			it := in[r.IntN(len(in))]
			it.key = r.IntN(1000)
			heap.Fix(&h, it.index)
		default:
			i := r.IntN(len(in))
			it := in[i]
			heap.Remove(&h, it.index)
			in = append(in[:i], in[i+1:]...)
			if it.index != -1 {
				t.Fatalf("removed item records index %d", it.index)
			}
		}
		check()
		if len(h) != len(in) {
			t.Fatalf("heap holds %d items, want %d", len(h), len(in))
		}
	}
}

// Place pushes, fixes and removes as asked, and does nothing to remove an
// item that is not there.
func TestPlace(t *testing.T) {
	var h Heap[*item]
	a, b := &item{key: 5, index: -1}, &item{key: 7, index: -1}
	Place(&h, a, a.index, true)
	Place(&h, b, b.index, true)
	if len(h) != 2 || h[0] != a {
		t.Fatalf("after two pushes: %v", h)
	}
	b.key = 1
	Place(&h, b, b.index, true)
	if len(h) != 2 || h[0] != b {
		t.Fatalf("after fixing b: top %d", h[0].key)
	}
	Place(&h, b, b.index, false)
	if len(h) != 1 || h[0] != a || b.index != -1 {
		t.Fatalf("after removing b: %v, b.index %d", h, b.index)
	}
	Place(&h, b, b.index, false)
	if len(h) != 1 {
		t.Fatalf("removing an absent item changed the heap: %v", h)
	}
}
