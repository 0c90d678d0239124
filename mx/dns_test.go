package mx

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/batonmail/baton/internal/dnstest"
	"github.com/miekg/dns"
)

// newTestDNS returns a resolver asking servers with one attempt each.
func newTestDNS(t testing.TB, timeout time.Duration, servers ...string) *DNS {
	t.Helper()
	r, err := NewDNS(DNSConfig{Servers: servers, Timeout: timeout, Attempts: 1})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func hostNames(r *Route) []string {
	var names []string
	for _, h := range r.Hosts {
		names = append(names, h.Name)
	}
	return names
}

// wantError checks that err is an *Error with the given class and codes.
func wantError(t *testing.T, err error, temporary bool, code int, enhanced string) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *mx.Error", err, err)
	}
	if e.Temporary != temporary || e.Code != code || e.Enhanced != enhanced {
		t.Fatalf("got temporary=%v %d %s (%v), want temporary=%v %d %s",
			e.Temporary, e.Code, e.Enhanced, e, temporary, code, enhanced)
	}
	return e
}

func TestDNS_MXOrderedByPreference(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 20 b.example.test.",
		"example.test. 300 IN MX 10 a.example.test.",
		"example.test. 300 IN MX 30 c.example.test.",
		"a.example.test. 300 IN A 192.0.2.1",
		"a.example.test. 300 IN AAAA 2001:db8::1",
		"b.example.test. 300 IN A 192.0.2.2",
		"c.example.test. 300 IN AAAA 2001:db8::3",
	)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := hostNames(route), []string{"a.example.test", "b.example.test", "c.example.test"}; !slices.Equal(got, want) {
		t.Fatalf("hosts %v, want %v", got, want)
	}
	if route.Key != "mx:example.test" || route.Domain != "example.test" || route.TLS != TLSOpportunistic {
		t.Fatalf("route %+v", route)
	}
	a := route.Hosts[0]
	if a.Preference != 10 || a.Port != 25 {
		t.Fatalf("host a %+v", a)
	}
	wantAddrs := []netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	if !slices.Equal(a.Addrs, wantAddrs) {
		t.Fatalf("addrs of a %v, want %v (IPv4 first)", a.Addrs, wantAddrs)
	}
	if got := route.Hosts[2].Addrs; len(got) != 1 || got[0] != netip.MustParseAddr("2001:db8::3") {
		t.Fatalf("addrs of c %v", got)
	}
}

func TestDNS_EqualPreferencesShuffled(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 10 a.example.test.",
		"example.test. 300 IN MX 10 b.example.test.",
		"example.test. 300 IN MX 5 first.example.test.",
		"example.test. 300 IN MX 50 last.example.test.",
		"a.example.test. 300 IN A 192.0.2.1",
		"b.example.test. 300 IN A 192.0.2.2",
		"first.example.test. 300 IN A 192.0.2.3",
		"last.example.test. 300 IN A 192.0.2.4",
	)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	seen := map[string]int{}
	// The chance of one order never showing in 100 fair shuffles is 2^-99.
	for range 100 {
		route, err := r.Resolve(t.Context(), "example.test")
		if err != nil {
			t.Fatal(err)
		}
		names := hostNames(route)
		if len(names) != 4 || names[0] != "first.example.test" || names[3] != "last.example.test" {
			t.Fatalf("preference order broken: %v", names)
		}
		seen[names[1]]++
	}
	if seen["a.example.test"] == 0 || seen["b.example.test"] == 0 {
		t.Fatalf("equal preferences not shuffled: %v", seen)
	}
}

func TestDNS_ImplicitMX(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN A 192.0.2.9", "example.test. 300 IN TXT \"v=spf1 -all\"")
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 {
		t.Fatalf("hosts %+v", route.Hosts)
	}
	h := route.Hosts[0]
	if h.Name != "example.test" || h.Preference != 0 || !slices.Equal(h.Addrs, []netip.Addr{netip.MustParseAddr("192.0.2.9")}) {
		t.Fatalf("implicit MX host %+v", h)
	}
}

func TestDNS_ImplicitMX_NoAddress_Permanent(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN TXT \"hello\"")
	r := newTestDNS(t, 5*time.Second, s.Addr())
	_, err := r.Resolve(t.Context(), "example.test")
	wantError(t, err, false, 550, "5.1.2")
}

func TestDNS_ImplicitMX_AddressServfail_Temporary(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN TXT \"hello\"")
	s.SetRcode("example.test", dns.TypeA, dns.RcodeServerFailure)
	s.SetRcode("example.test", dns.TypeAAAA, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	_, err := r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.3")
}

func TestDNS_NullMX_Permanent(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN MX 0 .", "example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(t, 5*time.Second, s.Addr())
	_, err := r.Resolve(t.Context(), "example.test")
	wantError(t, err, false, 556, "5.1.10")
}

func TestDNS_NullMXWithOtherMX_UsesOthers(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN MX 0 .", "example.test. 300 IN MX 10 mx.example.test.",
		"mx.example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx.example.test"}) {
		t.Fatalf("hosts %v", got)
	}
}

func TestDNS_NXDOMAIN_Permanent(t *testing.T) {
	s := dnstest.Start(t)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	_, err := r.Resolve(t.Context(), "nowhere.invalid")
	wantError(t, err, false, 550, "5.1.2")
}

func TestDNS_SERVFAIL_Temporary(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN MX 10 mx.example.test.", "mx.example.test. 300 IN A 192.0.2.1")
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	_, err := r.Resolve(t.Context(), "example.test")
	e := wantError(t, err, true, 451, "4.4.3")
	var f *dnsFailure
	if !errors.As(e, &f) || f.rcode != dns.RcodeServerFailure {
		t.Fatalf("cause %v, want the SERVFAIL", e.Err)
	}
	// REFUSED is trouble with the server too, not an answer about the domain.
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeRefused)
	_, err = r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.3")
}

func TestDNS_HostsWithoutAddressSkipped(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 10 gone.example.test.",
		"example.test. 300 IN MX 20 empty.example.test.",
		"example.test. 300 IN MX 30 broken.example.test.",
		"example.test. 300 IN MX 40 ok.example.test.",
		"empty.example.test. 300 IN TXT \"no address\"",
		"broken.example.test. 300 IN A 192.0.2.3",
		"ok.example.test. 300 IN A 192.0.2.4",
	)
	s.SetRcode("broken.example.test", dns.TypeANY, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"ok.example.test"}) {
		t.Fatalf("hosts %v", got)
	}
	s.Remove("ok.example.test", dns.TypeA)
	_, err = r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.4")
}

func TestDNS_NonsenseTargetsSkipped(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 1 192.0.2.66.",
		"example.test. 300 IN MX 2 localhost.",
		"example.test. 300 IN MX 3 evil.localhost.",
		"example.test. 300 IN MX 4 zero.example.test.",
		"example.test. 300 IN MX 9 mx.example.test.",
		"192.0.2.66. 300 IN A 192.0.2.66",
		"localhost. 300 IN A 127.0.0.1",
		"evil.localhost. 300 IN A 127.0.0.1",
		"zero.example.test. 300 IN A 0.0.0.0",
		"zero.example.test. 300 IN AAAA ff02::1",
		"mx.example.test. 300 IN A 192.0.2.1",
	)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx.example.test"}) {
		t.Fatalf("hosts %v", got)
	}

	s.Remove("example.test", dns.TypeMX)
	s.Add("example.test. 300 IN MX 1 localhost.")
	_, err = r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.4")
}

func TestDNS_RejectLocal(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 1 inside.example.test.",
		"example.test. 300 IN MX 2 outside.example.test.",
		"inside.example.test. 300 IN A 10.1.2.3",
		"inside.example.test. 300 IN A 127.0.0.1",
		"inside.example.test. 300 IN AAAA fe80::1",
		"outside.example.test. 300 IN A 198.51.100.7",
		"outside.example.test. 300 IN A 192.168.1.1",
	)
	r, err := NewDNS(DNSConfig{Servers: []string{s.Addr()}, Attempts: 1, RejectLocal: true})
	if err != nil {
		t.Fatal(err)
	}
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 || route.Hosts[0].Name != "outside.example.test" ||
		!slices.Equal(route.Hosts[0].Addrs, []netip.Addr{netip.MustParseAddr("198.51.100.7")}) {
		t.Fatalf("hosts %+v", route.Hosts)
	}
	// Without RejectLocal, loopback is allowed (tests deliver to it).
	r2 := newTestDNS(t, 5*time.Second, s.Addr())
	route, err = r2.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 2 || len(route.Hosts[0].Addrs) != 3 {
		t.Fatalf("hosts %+v", route.Hosts)
	}
}

func TestDNS_CNAMEs(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"alias.test. 300 IN CNAME example.test.",
		"example.test. 300 IN MX 10 mxalias.example.test.",
		"mxalias.example.test. 300 IN CNAME real.example.test.",
		"real.example.test. 300 IN A 192.0.2.5",
	)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "alias.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 || route.Hosts[0].Name != "mxalias.example.test" ||
		!slices.Equal(route.Hosts[0].Addrs, []netip.Addr{netip.MustParseAddr("192.0.2.5")}) {
		t.Fatalf("hosts %+v", route.Hosts)
	}
	if route.Key != "mx:alias.test" {
		t.Fatalf("key %q", route.Key)
	}
}

func TestDNS_NamesNormalized(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 10 MX.Example.TEST.",
		"mx.example.test. 300 IN A 192.0.2.1",
		"xn--bcher-kva.test. 300 IN MX 10 mx.example.test.",
	)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	for _, in := range []string{"Example.TEST.", " example.test"} {
		route, err := r.Resolve(t.Context(), in)
		if err != nil {
			t.Fatalf("%q: %v", in, err)
		}
		if route.Domain != "example.test" || route.Key != "mx:example.test" || route.Hosts[0].Name != "mx.example.test" {
			t.Fatalf("%q: route %+v", in, route)
		}
	}
	route, err := r.Resolve(t.Context(), "BÜCHER.test")
	if err != nil {
		t.Fatal(err)
	}
	if route.Domain != "xn--bcher-kva.test" || route.Key != "mx:xn--bcher-kva.test" {
		t.Fatalf("IDN route %+v", route)
	}
	for _, bad := range []string{"", ".", "a..test", "spa ce.test", "semi;colon.test", "bad\x00.test"} {
		before := s.Queries("")
		_, err := r.Resolve(t.Context(), bad)
		wantError(t, err, false, 550, "5.1.2")
		if s.Queries("") != before {
			t.Fatalf("%q was sent to DNS", bad)
		}
	}
}

func TestDNS_AddressLiteral(t *testing.T) {
	s := dnstest.Start(t)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "[192.0.2.1]")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 || route.Hosts[0].Addrs[0] != netip.MustParseAddr("192.0.2.1") || route.Key != "mx:[192.0.2.1]" {
		t.Fatalf("route %+v", route)
	}
	route, err = r.Resolve(t.Context(), "[IPv6:2001:DB8::1]")
	if err != nil {
		t.Fatal(err)
	}
	if route.Hosts[0].Addrs[0] != netip.MustParseAddr("2001:db8::1") || route.Domain != "[IPv6:2001:db8::1]" {
		t.Fatalf("route %+v", route)
	}
	_, err = r.Resolve(t.Context(), "[0.0.0.0]")
	wantError(t, err, false, 550, "5.1.2")
	if s.Queries("") != 0 {
		t.Fatalf("address literals were sent to DNS")
	}
}

func TestDNS_TruncatedAnswerRetriedOverTCP(t *testing.T) {
	s := dnstest.Start(t)
	for i := range 100 {
		s.Add(fmt.Sprintf("big.test. 300 IN MX %d mx%03d.a-rather-long-mail-host-name.big.test.", i, i))
		s.Add(fmt.Sprintf("mx%03d.a-rather-long-mail-host-name.big.test. 300 IN A 192.0.2.%d", i, i+1))
	}
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "big.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := s.Queries("tcp"); got != 1 {
		t.Fatalf("TCP queries %d, want 1 (the truncated MX answer)", got)
	}
	if len(route.Hosts) != DefaultMaxHosts {
		t.Fatalf("%d hosts, want the first %d", len(route.Hosts), DefaultMaxHosts)
	}
	for i, h := range route.Hosts {
		if int(h.Preference) != i {
			t.Fatalf("host %d has preference %d: the full answer was not used", i, h.Preference)
		}
	}
}

func TestDNS_TruncatedAddressAnswerRetriedOverTCP(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("many.test. 300 IN MX 10 mx.many.test.")
	for i := range 120 {
		s.Add(fmt.Sprintf("mx.many.test. 300 IN AAAA 2001:db8::%x", i+1))
	}
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "many.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := len(route.Hosts[0].Addrs); got != 120 {
		t.Fatalf("%d addresses, want 120", got)
	}
	if got := s.Queries("tcp"); got != 1 {
		t.Fatalf("TCP queries %d, want 1", got)
	}
}

func TestDNS_NextServerWhenFirstDown(t *testing.T) {
	// A port with no UDP listener: queries are refused at once. Holding
	// the TCP port keeps another test's DNS server off it.
	hold, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hold.Close()
	good := dnstest.Start(t)
	good.Add("example.test. 300 IN MX 10 mx.example.test.", "mx.example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(t, 2*time.Second, hold.Addr().String(), good.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 {
		t.Fatalf("hosts %+v", route.Hosts)
	}
}

func TestDNS_NextServerWhenFirstSilent(t *testing.T) {
	silent := dnstest.Start(t)
	silent.SetRcode("example.test", dns.TypeANY, dnstest.Drop)
	silent.SetRcode("mx.example.test", dns.TypeANY, dnstest.Drop)
	good := dnstest.Start(t)
	good.Add("example.test. 300 IN MX 10 mx.example.test.", "mx.example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(t, 100*time.Millisecond, silent.Addr(), good.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 || silent.Queries("udp") == 0 {
		t.Fatalf("hosts %+v, silent server asked %d times", route.Hosts, silent.Queries("udp"))
	}
}

func TestDNS_NextServerWhenFirstServfails(t *testing.T) {
	bad := dnstest.Start(t)
	bad.SetRcode("example.test", dns.TypeANY, dns.RcodeServerFailure)
	bad.SetRcode("mx.example.test", dns.TypeANY, dns.RcodeServerFailure)
	good := dnstest.Start(t)
	good.Add("example.test. 300 IN MX 10 mx.example.test.", "mx.example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(t, 2*time.Second, bad.Addr(), good.Addr())
	if _, err := r.Resolve(t.Context(), "example.test"); err != nil {
		t.Fatal(err)
	}
	if bad.Queries("") != 3 { // MX, A, AAAA
		t.Fatalf("first server asked %d times", bad.Queries(""))
	}
}

func TestDNS_Attempts(t *testing.T) {
	s := dnstest.Start(t)
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeServerFailure)
	r, err := NewDNS(DNSConfig{Servers: []string{s.Addr()}, Attempts: 3})
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.3")
	if got := s.Queries(""); got != 3 {
		t.Fatalf("%d queries, want 3", got)
	}
}

func TestDNS_Timeout_Temporary(t *testing.T) {
	s := dnstest.Start(t)
	s.SetRcode("example.test", dns.TypeANY, dnstest.Drop)
	r := newTestDNS(t, 50*time.Millisecond, s.Addr())
	_, err := r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.3")
	if s.Queries("udp") != 1 {
		t.Fatalf("udp queries %d", s.Queries("udp"))
	}
}

func TestDNS_ContextCancelled(t *testing.T) {
	s := dnstest.Start(t)
	s.SetRcode("example.test", dns.TypeANY, dnstest.Drop)
	// A timeout far longer than the test: only the cancellation can end it.
	r := newTestDNS(t, time.Hour, s.Addr())
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := r.Resolve(ctx, "example.test")
		done <- err
	}()
	for s.Queries("") == 0 {
		time.Sleep(time.Millisecond)
	}
	cancel()
	err := <-done
	wantError(t, err, true, 451, "4.4.3")
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v does not wrap context.Canceled", err)
	}
}

func TestDNS_LookupTXT(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		`_mta-sts.example.test. 300 IN TXT "v=STSv1; " "id=20260101"`,
		`example.test. 300 IN TXT "v=spf1 -all"`,
		`example.test. 300 IN TXT "other"`,
		`example.test. 300 IN A 192.0.2.1`,
	)
	s.SetRcode("broken.test", dns.TypeTXT, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())

	got, err := r.LookupTXT(t.Context(), "_MTA-STS.example.test")
	if err != nil || !slices.Equal(got, []string{"v=STSv1; id=20260101"}) {
		t.Fatalf("got %q, %v", got, err)
	}
	got, err = r.LookupTXT(t.Context(), "example.test.")
	slices.Sort(got)
	if err != nil || !slices.Equal(got, []string{"other", "v=spf1 -all"}) {
		t.Fatalf("got %q, %v", got, err)
	}
	for _, name := range []string{"nowhere.test", "192.0.2.1.example.test"} {
		_, err = r.LookupTXT(t.Context(), name)
		if !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: error %v, want ErrNotFound", name, err)
		}
		wantError(t, err, false, 550, "5.1.2")
	}
	s.Remove("example.test", dns.TypeTXT)
	if _, err = r.LookupTXT(t.Context(), "example.test"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("NODATA: error %v, want ErrNotFound", err)
	}
	_, err = r.LookupTXT(t.Context(), "broken.test")
	if errors.Is(err, ErrNotFound) {
		t.Fatal("SERVFAIL reported as not found")
	}
	wantError(t, err, true, 451, "4.4.3")
}

func TestDNS_LookupAddrs(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("smart.example.test. 300 IN AAAA 2001:db8::25", "smart.example.test. 300 IN A 192.0.2.25")
	s.SetRcode("broken.test", dns.TypeANY, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	got, err := r.LookupAddrs(t.Context(), "smart.example.test")
	want := []netip.Addr{netip.MustParseAddr("192.0.2.25"), netip.MustParseAddr("2001:db8::25")}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("got %v, %v", got, err)
	}
	got, err = r.LookupAddrs(t.Context(), "[2001:db8::1]")
	if err != nil || !slices.Equal(got, []netip.Addr{netip.MustParseAddr("2001:db8::1")}) {
		t.Fatalf("literal: got %v, %v", got, err)
	}
	if _, err = r.LookupAddrs(t.Context(), "nowhere.test"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("error %v, want ErrNotFound", err)
	}
	_, err = r.LookupAddrs(t.Context(), "broken.test")
	wantError(t, err, true, 451, "4.4.3")

	r6, err := NewDNS(DNSConfig{Servers: []string{s.Addr()}, Network: "ip6"})
	if err != nil {
		t.Fatal(err)
	}
	got, err = r6.LookupAddrs(t.Context(), "smart.example.test")
	if err != nil || !slices.Equal(got, want[1:]) {
		t.Fatalf("ip6: got %v, %v", got, err)
	}
}

func TestNewDNS_ResolvConfAndServers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "resolv.conf")
	conf := "# test\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0 timeout:3 attempts:4\n"
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := NewDNS(DNSConfig{ResolvConf: path})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.53:53", "[::1]:53"}; !slices.Equal(r.servers, want) {
		t.Fatalf("servers %v, want %v", r.servers, want)
	}
	if r.timeout != 3*time.Second || r.attempts != 4 {
		t.Fatalf("timeout %v attempts %d, want resolv.conf's 3s and 4", r.timeout, r.attempts)
	}
	empty := filepath.Join(t.TempDir(), "empty.conf")
	if err := os.WriteFile(empty, []byte("search example.test\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err = NewDNS(DNSConfig{ResolvConf: empty, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"127.0.0.1:53", "[::1]:53"}; !slices.Equal(r.servers, want) || r.timeout != time.Second {
		t.Fatalf("servers %v timeout %v, want %v and 1s", r.servers, r.timeout, want)
	}
	r, err = NewDNS(DNSConfig{Servers: []string{"127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5300", "dns.example.test"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"127.0.0.1:53", "127.0.0.1:5353", "[::1]:53", "[::1]:5300", "dns.example.test:53"}
	if !slices.Equal(r.servers, want) {
		t.Fatalf("servers %v, want %v", r.servers, want)
	}
	if _, err := NewDNS(DNSConfig{ResolvConf: filepath.Join(t.TempDir(), "missing")}); err == nil {
		t.Fatal("missing resolv.conf accepted")
	}
	if _, err := NewDNS(DNSConfig{Servers: []string{"127.0.0.1:99999"}}); err == nil {
		t.Fatal("bad port accepted")
	}
	if _, err := NewDNS(DNSConfig{Servers: []string{"127.0.0.1"}, Network: "ipx"}); err == nil {
		t.Fatal("bad network accepted")
	}
}

func TestToASCII(t *testing.T) {
	tests := []struct{ in, want string }{
		{"example.test", "example.test"},
		{"EXAMPLE.Test", "example.test"},
		{"bücher.test", "xn--bcher-kva.test"},
		{"MÜNCHEN.test", "xn--mnchen-3ya.test"},
		{"中文.test", "xn--fiq228c.test"},
		{"例え.テスト", "xn--r8jz45g.xn--zckzah"},
		{"ドメイン名例.test", "xn--eckwd4c7cu47r2wf.test"},
		{"ñ.test", "xn--ida.test"},
	}
	for _, tt := range tests {
		got, err := toASCII(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("toASCII(%q) = %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"b\u00fccher\u200b.test", "a b\u00fc.test", "\xff.test", "\u00fc!.test"} {
		if got, err := toASCII(bad); err == nil {
			t.Errorf("toASCII(%q) = %q, want an error", bad, got)
		}
	}
}

func BenchmarkDNS_Resolve(b *testing.B) {
	s := dnstest.Start(b)
	s.Add(
		"example.test. 300 IN MX 10 a.example.test.",
		"example.test. 300 IN MX 10 b.example.test.",
		"example.test. 300 IN MX 20 c.example.test.",
		"a.example.test. 300 IN A 192.0.2.1",
		"b.example.test. 300 IN A 192.0.2.2",
		"b.example.test. 300 IN AAAA 2001:db8::2",
		"c.example.test. 300 IN A 192.0.2.3",
	)
	r := newTestDNS(b, 5*time.Second, s.Addr())
	ctx := context.Background()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			route, err := r.Resolve(ctx, "example.test")
			if err != nil || len(route.Hosts) != 3 {
				b.Errorf("route %+v, %v", route, err)
				return
			}
		}
	})
}

func BenchmarkDNS_Resolve_ImplicitMX(b *testing.B) {
	s := dnstest.Start(b)
	s.Add("example.test. 300 IN A 192.0.2.1")
	r := newTestDNS(b, 5*time.Second, s.Addr())
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Resolve(ctx, "example.test"); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkToASCII(b *testing.B) {
	for b.Loop() {
		if _, err := toASCII("Bücher.Example.test"); err != nil {
			b.Fatal(err)
		}
	}
}

func TestDNS_LookupMX(t *testing.T) {
	s := dnstest.Start(t)
	s.Add(
		"example.test. 300 IN MX 20 B.example.test.",
		"example.test. 300 IN MX 10 a.example.test.",
		"null.test. 300 IN MX 0 .",
		"nomx.test. 300 IN A 192.0.2.1",
	)
	s.SetRcode("broken.test", dns.TypeMX, dns.RcodeServerFailure)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	got, err := r.LookupMX(t.Context(), "example.test")
	if err != nil || !slices.Equal(got, []string{"a.example.test", "b.example.test"}) {
		t.Fatalf("got %v, %v", got, err)
	}
	got, err = r.LookupMX(t.Context(), "null.test")
	if err != nil || len(got) != 0 {
		t.Fatalf("null MX: got %v, %v", got, err)
	}
	for _, d := range []string{"nomx.test", "nowhere.test"} {
		if _, err := r.LookupMX(t.Context(), d); !errors.Is(err, ErrNotFound) {
			t.Fatalf("%s: error %v, want ErrNotFound", d, err)
		}
	}
	_, err = r.LookupMX(t.Context(), "broken.test")
	wantError(t, err, true, 451, "4.4.3")
}

func FuzzNormalizeDomain(f *testing.F) {
	for _, s := range []string{"example.test", "Bücher.TEST.", "[192.0.2.1]", "[IPv6:2001:db8::1]", "a..b", "xn--bcher-kva.test", "-a.test"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := normalizeDomain(in)
		if err != nil {
			return
		}
		if _, ok := addressLiteral(out); ok {
			return
		}
		if !validName(out, false) {
			t.Fatalf("normalizeDomain(%q) = %q, not a valid host name", in, out)
		}
		again, err := normalizeDomain(out)
		if err != nil || again != out {
			t.Fatalf("not idempotent: %q -> %q -> %q, %v", in, out, again, err)
		}
	})
}

func TestDNS_FORMERR_RetriedWithoutEDNS0(t *testing.T) {
	s := dnstest.Start(t)
	s.Add("example.test. 300 IN MX 10 mx.example.test.", "mx.example.test. 300 IN A 192.0.2.1")
	s.RejectEDNS(true)
	r := newTestDNS(t, 5*time.Second, s.Addr())
	route, err := r.Resolve(t.Context(), "example.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(route.Hosts) != 1 || route.Hosts[0].Addrs[0] != netip.MustParseAddr("192.0.2.1") {
		t.Fatalf("hosts %+v", route.Hosts)
	}
	// MX, A and AAAA, each asked with and without EDNS0.
	if got := s.Queries("udp"); got != 6 {
		t.Fatalf("%d UDP queries, want 6", got)
	}
	// A server that answers FORMERR whatever the query is a failure.
	s.RejectEDNS(false)
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeFormatError)
	_, err = r.Resolve(t.Context(), "example.test")
	wantError(t, err, true, 451, "4.4.3")
}
