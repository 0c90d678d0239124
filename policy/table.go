package policy

import (
	"container/list"
	"net/netip"
	"time"
)

// table is a map whose entries are kept in least-recently-used order, so
// the policies that remember clients can drop idle entries cheaply and
// bound their memory. It is not safe for concurrent use; its owner locks.
type table[K comparable, V any] struct {
	m  map[K]*list.Element
	ll list.List // of *tentry[K, V], most recently used at the front
}

type tentry[K comparable, V any] struct {
	key  K
	last time.Time
	val  V
}

func newTable[K comparable, V any]() *table[K, V] {
	return &table[K, V]{m: make(map[K]*list.Element)}
}

// lookup returns the entry for key, or nil, without touching its order.
func (t *table[K, V]) lookup(key K) *tentry[K, V] {
	if el, ok := t.m[key]; ok {
		return el.Value.(*tentry[K, V])
	}
	return nil
}

// touch returns the entry for key, creating it with val() when missing,
// marks it used at now and moves it to the front.
func (t *table[K, V]) touch(key K, now time.Time, val func() V) *tentry[K, V] {
	if el, ok := t.m[key]; ok {
		e := el.Value.(*tentry[K, V])
		if now.After(e.last) {
			e.last = now
		}
		t.ll.MoveToFront(el)
		return e
	}
	e := &tentry[K, V]{key: key, last: now, val: val()}
	t.m[key] = t.ll.PushFront(e)
	return e
}

func (t *table[K, V]) remove(key K) {
	if el, ok := t.m[key]; ok {
		t.ll.Remove(el)
		delete(t.m, key)
	}
}

func (t *table[K, V]) len() int { return len(t.m) }

// sweep removes up to n entries from the least recently used end for as
// long as idle says they can go; it returns how many it removed.
func (t *table[K, V]) sweep(n int, idle func(*tentry[K, V]) bool) int {
	removed := 0
	for removed < n {
		el := t.ll.Back()
		if el == nil {
			break
		}
		e := el.Value.(*tentry[K, V])
		if !idle(e) {
			break
		}
		t.ll.Remove(el)
		delete(t.m, e.key)
		removed++
	}
	return removed
}

// trim removes least recently used entries until at most max remain,
// whether idle or not, and returns how many it removed.
func (t *table[K, V]) trim(max int) int {
	removed := 0
	for max > 0 && len(t.m) > max {
		el := t.ll.Back()
		e := el.Value.(*tentry[K, V])
		t.ll.Remove(el)
		delete(t.m, e.key)
		removed++
	}
	return removed
}

// addrKey groups a client address for per-address accounting: IPv4 (and
// IPv4-mapped IPv6) addresses stand alone, IPv6 addresses are grouped by
// their first v6Bits bits, since one host or site usually holds a whole
// /64.
func addrKey(a netip.Addr, v6Bits int) netip.Prefix {
	a = a.Unmap().WithZone("")
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, err := a.Prefix(v6Bits)
	if err != nil {
		return netip.PrefixFrom(a, a.BitLen())
	}
	return p
}
