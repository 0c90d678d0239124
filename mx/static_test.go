package mx

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/batonmail/baton/internal/dnstest"
	"github.com/miekg/dns"
)

func TestStatic_RoutesAndFallback(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"smart.example.test. 300 IN A 192.0.2.25",
		"other.test. 300 IN MX 10 mx.other.test.",
		"mx.other.test. 300 IN A 192.0.2.99",
	)
	d := newTestDNS(t, 5*time.Second, s.Addr())
	st, err := NewStatic(StaticConfig{
		Routes: []StaticRoute{
			{Domain: "Partner.TEST", Host: "[2001:db8::7]:2525", TLS: TLSVerified},
			{Domain: ".corp.test", Host: "smart.example.test", Port: 587,
				Auth: &Credentials{Username: "u", Password: "p"}},
			{Domain: "a.test", Host: "smart.example.test:587", Auth: &Credentials{Username: "u", Password: "p"}},
			{Domain: "none.test", Name: "sink", Host: "127.0.0.1:2525", TLS: TLSNone},
		},
		Next:   d,
		Lookup: d.LookupAddrs,
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		domain string
		key    string
		host   string
		port   int
		addr   string
		tls    TLSMode
		auth   bool
	}{
		{"partner.test", "route:[2001:db8::7]:2525", "2001:db8::7", 2525, "2001:db8::7", TLSVerified, false},
		{"x.corp.test", "route:u@smart.example.test:587", "smart.example.test", 587, "192.0.2.25", TLSRequired, true},
		{"y.x.corp.test", "route:u@smart.example.test:587", "smart.example.test", 587, "192.0.2.25", TLSRequired, true},
		{"a.test", "route:u@smart.example.test:587", "smart.example.test", 587, "192.0.2.25", TLSRequired, true},
		{"none.test", "route:sink", "127.0.0.1", 2525, "127.0.0.1", TLSNone, false},
		{"other.test", "mx:other.test", "mx.other.test", 25, "192.0.2.99", TLSOpportunistic, false},
		// ".corp.test" is for subdomains only: corp.test itself goes to DNS.
		{"corp.test", "", "", 0, "", 0, false},
	}
	for _, tt := range tests {
		rt, err := st.Resolve(t.Context(), tt.domain)
		if tt.key == "" {
			wantError(t, err, false, 550, "5.1.2")
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", tt.domain, err)
		}
		if rt.Key != tt.key || rt.Domain != tt.domain || rt.TLS != tt.tls || (rt.Auth != nil) != tt.auth {
			t.Errorf("%s: route %+v", tt.domain, rt)
		}
		h := rt.Hosts[0]
		if h.Name != tt.host || h.Port != tt.port || !slices.Contains(h.Addrs, netip.MustParseAddr(tt.addr)) {
			t.Errorf("%s: host %+v", tt.domain, h)
		}
	}
	// Credentials are copied out, not shared.
	rt, _ := st.Resolve(t.Context(), "a.test")
	rt.Auth.Password = "changed"
	rt, _ = st.Resolve(t.Context(), "a.test")
	if rt.Auth.Password != "p" {
		t.Fatal("route credentials were changed through a returned Route")
	}
}

func TestStatic_Wildcard(t *testing.T) {
	var looked []string
	st, err := NewStatic(StaticConfig{
		Routes: []StaticRoute{
			{Domain: "*", Host: "relay.example.test"},
			{Domain: "direct.test", Host: "192.0.2.1"},
		},
		Lookup: func(ctx context.Context, host string) ([]netip.Addr, error) {
			looked = append(looked, host)
			return []netip.Addr{netip.MustParseAddr("::ffff:192.0.2.50")}, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"anything.test", "b\u00fccher.test", "[192.0.2.8]"} {
		rt, err := st.Resolve(t.Context(), d)
		if err != nil {
			t.Fatal(err)
		}
		if rt.Key != "route:relay.example.test:25" || rt.Hosts[0].Addrs[0] != netip.MustParseAddr("192.0.2.50") {
			t.Fatalf("%s: route %+v", d, rt)
		}
	}
	rt, err := st.Resolve(t.Context(), "direct.test")
	if err != nil || rt.Key != "route:192.0.2.1:25" {
		t.Fatalf("route %+v, %v", rt, err)
	}
	if len(looked) != 3 {
		t.Fatalf("lookups %v: IP literals must not be looked up", looked)
	}
}

func TestStatic_NoRouteNoNext_Permanent(t *testing.T) {
	st, err := NewStatic(StaticConfig{Routes: []StaticRoute{{Domain: "a.test", Host: "192.0.2.1"}}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.Resolve(t.Context(), "b.test")
	wantError(t, err, false, 550, "5.4.4")
}

func TestStatic_HostLookupFailure_Temporary(t *testing.T) {
	s := dnstest.Start(t)
	s.SetRcode("smart.example.test", dns.TypeANY, dns.RcodeServerFailure)
	d := newTestDNS(t, 5*time.Second, s.Addr())
	st, err := NewStatic(StaticConfig{
		Routes: []StaticRoute{{Domain: "*", Host: "smart.example.test"}, {Domain: "gone.test", Host: "gone.example.test"}},
		Lookup: d.LookupAddrs,
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = st.Resolve(t.Context(), "x.test")
	wantError(t, err, true, 451, "4.4.3")
	// Even a smarthost name that does not exist is a configuration
	// problem, not a reason to bounce.
	_, err = st.Resolve(t.Context(), "gone.test")
	e := wantError(t, err, true, 451, "4.4.3")
	if !errors.Is(e, ErrNotFound) {
		t.Fatalf("cause %v", e.Err)
	}
}

func TestNewStatic_RejectsBadConfig(t *testing.T) {
	bad := [][]StaticRoute{
		{{Domain: "a.test"}},
		{{Domain: "a.test", Host: "h.test:0x"}},
		{{Domain: "a.test", Host: "h.test", Port: 70000}},
		{{Domain: "a test", Host: "h.test"}},
		{{Domain: "a.test", Host: "h.test"}, {Domain: "A.test.", Host: "h.test"}},
		{{Domain: "*", Host: "h.test"}, {Domain: "*", Host: "i.test"}},
		{{Domain: ".a.test", Host: "h.test"}, {Domain: ".a.test", Host: "i.test"}},
		{{Domain: "a.test", Name: "x", Host: "h.test"}, {Domain: "b.test", Name: "x", Host: "i.test"}},
		{{Domain: "a.test", Host: "h.test", TLS: TLSMode(42)}},
	}
	for i, routes := range bad {
		if _, err := NewStatic(StaticConfig{Routes: routes}); err == nil {
			t.Errorf("config %d accepted: %+v", i, routes)
		}
	}
	// Same name, same destination: fine.
	if _, err := NewStatic(StaticConfig{Routes: []StaticRoute{
		{Domain: "a.test", Name: "x", Host: "h.test"}, {Domain: "b.test", Name: "x", Host: "h.test:25"},
	}}); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkStatic_Resolve(b *testing.B) {
	st, err := NewStatic(StaticConfig{Routes: []StaticRoute{{Domain: "*", Host: "192.0.2.1:587"}}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := st.Resolve(ctx, "sub.example.test"); err != nil {
			b.Fatal(err)
		}
	}
}
