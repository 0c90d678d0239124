// Package iheap is a binary min-heap, for container/heap, of items that
// record their own position, so that an item whose key changed can be
// fixed (heap.Fix) or removed (heap.Remove) in O(log n). The queue
// backends order their due messages, and their streams, with it.
package iheap

import "container/heap"

// Item is what a Heap holds: usually a pointer, which orders itself
// against another item and is told its index in the heap (-1 once popped
// or removed).
type Item[T any] interface {
	Less(other T) bool
	SetIndex(i int)
}

// Heap implements heap.Interface over a slice of items; the zero value is
// an empty heap. Index it directly to look at items (h[0] is the least).
type Heap[T Item[T]] []T

// Len implements heap.Interface.
func (h Heap[T]) Len() int { return len(h) }

// Less implements heap.Interface.
func (h Heap[T]) Less(i, j int) bool { return h[i].Less(h[j]) }

// Swap implements heap.Interface, keeping the items' indexes.
func (h Heap[T]) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].SetIndex(i)
	h[j].SetIndex(j)
}

// Push implements heap.Interface; use heap.Push.
func (h *Heap[T]) Push(x any) {
	t := x.(T)
	t.SetIndex(len(*h))
	*h = append(*h, t)
}

// Pop implements heap.Interface; use heap.Pop or heap.Remove.
func (h *Heap[T]) Pop() any {
	old := *h
	t := old[len(old)-1]
	var zero T
	old[len(old)-1] = zero // no reference kept for the collector
	t.SetIndex(-1)
	*h = old[:len(old)-1]
	return t
}

// Place puts x where it belongs in h after its key changed, or after it
// stopped or started belonging at all: with in false it removes x (if it
// is there), else it fixes x's position, pushing x when it is not in h
// yet. at is x's recorded index, -1 when it is not in h.
func Place[T Item[T]](h *Heap[T], x T, at int, in bool) {
	switch {
	case !in:
		if at >= 0 {
			heap.Remove(h, at)
		}
	case at >= 0:
		heap.Fix(h, at)
	default:
		heap.Push(h, x)
	}
}
