package policy

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
)

func TestConnLimit_PerIP(t *testing.T) {
	p := NewConnLimit(&ConnLimitConfig{PerIP: 2})
	a, b, c := unauth("192.0.2.1"), unauth("192.0.2.1"), unauth("::ffff:192.0.2.1")
	want(t, "conn 1", p.Connect(ctx, a), "ok")
	want(t, "conn 2", p.Connect(ctx, b), "ok")
	want(t, "conn 3 (mapped form of the same address)", p.Connect(ctx, c), "421 4.7.0")
	want(t, "other address", p.Connect(ctx, unauth("192.0.2.2")), "ok")
	// Disconnecting the refused connection releases nothing.
	p.Disconnect(ctx, c)
	if n := p.Open(netip.MustParseAddr("192.0.2.1")); n != 2 {
		t.Fatalf("open = %d, want 2", n)
	}
	p.Disconnect(ctx, a)
	p.Disconnect(ctx, a) // twice is harmless
	if n := p.Open(netip.MustParseAddr("192.0.2.1")); n != 1 {
		t.Fatalf("open = %d, want 1", n)
	}
	d := unauth("192.0.2.1")
	want(t, "after a disconnect", p.Connect(ctx, d), "ok")
	p.Disconnect(ctx, b)
	p.Disconnect(ctx, d)
	if len(p.open) != 1 { // only 192.0.2.2 remains
		t.Fatalf("entries = %d, want 1", len(p.open))
	}
	// In-process clients are not counted.
	for range 5 {
		want(t, "in-process", p.Connect(ctx, &Client{}), "ok")
	}
}

func TestConnLimit_InChainWithOtherRefusals(t *testing.T) {
	cl := NewConnLimit(&ConnLimitConfig{PerIP: 1})
	refuse := Funcs{OnConnect: func(context.Context, *Client) error { return Reject(554, [3]int{5, 7, 1}, "No") }}
	addr := netip.MustParseAddr("198.51.100.1")

	// Refused before ConnLimit saw it: Disconnect must not release a
	// count that another connection holds.
	held := unauth("198.51.100.1")
	want(t, "held", Chain{cl}.Connect(ctx, held), "ok")
	early := unauth("198.51.100.1")
	want(t, "refused early", Chain{refuse, cl}.Connect(ctx, early), "554 5.7.1")
	Chain{refuse, cl}.Disconnect(ctx, early)
	if n := cl.Open(addr); n != 1 {
		t.Fatalf("open = %d after an early refusal, want 1", n)
	}
	Chain{cl}.Disconnect(ctx, held)

	// Counted, then refused by a later member: Disconnect releases it.
	late := unauth("198.51.100.1")
	want(t, "refused late", Chain{cl, refuse}.Connect(ctx, late), "554 5.7.1")
	if n := cl.Open(addr); n != 1 {
		t.Fatalf("open = %d while the late-refused connection is up, want 1", n)
	}
	Chain{cl, refuse}.Disconnect(ctx, late)
	if n := cl.Open(addr); n != 0 {
		t.Fatalf("open = %d after all ended, want 0", n)
	}
}

func TestConnLimit_Concurrent(t *testing.T) {
	p := NewConnLimit(&ConnLimitConfig{PerIP: 5})
	var wg sync.WaitGroup
	var mu sync.Mutex
	accepted := 0
	for i := range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := unauth(fmt.Sprintf("10.0.0.%d", i%2))
			if p.Connect(ctx, c) == nil {
				mu.Lock()
				accepted++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if accepted != 10 {
		t.Fatalf("accepted %d, want 10 (5 per address)", accepted)
	}
}
