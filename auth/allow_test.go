package auth

import (
	"context"
	"errors"
	"net/netip"
	"testing"
)

func TestAllowList_Matching(t *testing.T) {
	l, err := NewAllowList([]AllowEntry{
		{Identity: Identity{Name: "office"}, Networks: []string{"10.0.0.0/8", "2001:db8::/32"}},
		{Identity: Identity{Name: "printer", SenderAddrs: []string{"printer@corp.test"}}, Networks: []string{"10.1.2.3"}},
		{Identity: Identity{Name: "mapped"}, Networks: []string{"::ffff:192.0.2.0/120"}},
		{Identity: Identity{Name: "loopback"}, Networks: []string{"127.0.0.1/32", "::1"}},
		{Identity: Identity{Name: "linklocal"}, Networks: []string{"fe80::/10"}},
		{Identity: Identity{Name: "hostbits"}, Networks: []string{"172.16.5.9/16"}},
		{Identity: Identity{Name: "office-dup"}, Networks: []string{"10.0.0.0/8"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		addr string
		want string // "" = not allowed
	}{
		{"10.200.0.1", "office"}, // first of two equal prefixes wins
		{"10.1.2.3", "printer"},  // most specific wins over the earlier /8
		{"10.1.2.4", "office"},
		{"::ffff:10.1.2.3", "printer"}, // IPv4-mapped client address
		{"::ffff:10.9.9.9", "office"},
		{"11.0.0.1", ""},
		{"2001:db8:1::5", "office"},
		{"2001:db9::1", ""},
		{"192.0.2.77", "mapped"}, // mapped prefix taken as IPv4
		{"192.0.3.1", ""},
		{"127.0.0.1", "loopback"},
		{"127.0.0.2", ""},
		{"::1", "loopback"},
		{"fe80::1%eth0", "linklocal"}, // zones ignored
		{"172.16.200.1", "hostbits"},  // host bits in the prefix masked
		{"172.17.0.1", ""},
		{"0.0.0.0", ""},
		{"::", ""},
	} {
		a := netip.MustParseAddr(c.addr)
		id, err := l.AuthenticateAddr(context.Background(), a)
		if c.want == "" {
			if !errors.Is(err, ErrNotAllowed) || id != nil {
				t.Errorf("%s: got %v, %v; want ErrNotAllowed", c.addr, id, err)
			}
			continue
		}
		if err != nil || id.Name != c.want {
			t.Errorf("%s: got %v, %v; want %s", c.addr, id, err, c.want)
		}
	}
	// The zero address (in-process caller) is never allowed.
	if _, err := l.AuthenticateAddr(context.Background(), netip.Addr{}); !errors.Is(err, ErrNotAllowed) {
		t.Errorf("zero addr: %v", err)
	}
	// Returned identities are copies.
	id := l.Match(netip.MustParseAddr("10.1.2.3"))
	id.SenderAddrs[0] = "evil@x.test"
	if l.Match(netip.MustParseAddr("10.1.2.3")).SenderAddrs[0] != "printer@corp.test" {
		t.Error("caller changed the list's identity")
	}
}

func TestAllowList_InvalidNetworks(t *testing.T) {
	for _, n := range []string{"10.0.0.0/33", "not-an-ip", "10.0.0", "fe80::1%eth0", "::ffff:0:0/64", ""} {
		if _, err := NewAllowList([]AllowEntry{{Identity: Identity{Name: "x"}, Networks: []string{n}}}); err == nil {
			t.Errorf("NewAllowList accepted %q", n)
		}
	}
	var nilList *AllowList
	if nilList.Match(netip.MustParseAddr("10.0.0.1")) != nil || nilList.Len() != 0 {
		t.Error("nil list matched")
	}
}
