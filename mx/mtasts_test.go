package mx

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/internal/dnstest"
	"github.com/batonmail/baton/internal/testcert"
	"github.com/miekg/dns"
)

// stsResponse is what the test policy server answers for one host.
type stsResponse struct {
	status      int
	contentType string
	body        string
	location    string
}

// stsFixture is a DNS server, an HTTPS policy server with a certificate
// from a test CA, and an MTASTS resolver wired to both.
type stsFixture struct {
	t   *testing.T
	dns *dnstest.Server
	m   *MTASTS

	mu        sync.Mutex
	responses map[string]stsResponse // by Host header
	fetches   map[string]int
	now       time.Time
}

// newSTSFixture starts the servers. certNames are the names the policy
// server's certificate is valid for.
func newSTSFixture(t *testing.T, certNames ...string) *stsFixture {
	t.Helper()
	f := &stsFixture{
		t:         t,
		dns:       dnstest.Start(t),
		responses: make(map[string]stsResponse),
		fetches:   make(map[string]int),
		now:       time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC),
	}
	caCert, leaf := testCA(t, certNames)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(f.serveHTTP))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)

	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	srvAddr := srv.Listener.Addr().String()
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool},
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, port, err := net.SplitHostPort(addr)
			if err != nil || port != "443" || !strings.HasPrefix(host, "mta-sts.") || !strings.HasSuffix(host, ".test") {
				return nil, fmt.Errorf("test dialer: refusing %s", addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, srvAddr)
		},
	}}
	r := newTestDNS(t, 5*time.Second, f.dns.Addr())
	m, err := NewMTASTS(MTASTSConfig{
		Next:       r,
		HTTPClient: client,
		Now:        f.clock,
	})
	if err != nil {
		t.Fatal(err)
	}
	f.m = m
	return f
}

func (f *stsFixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *stsFixture) advance(d time.Duration) {
	f.mu.Lock()
	f.now = f.now.Add(d)
	f.mu.Unlock()
}

func (f *stsFixture) serve(domain string, r stsResponse) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if r.status == 0 {
		r.status = http.StatusOK
	}
	if r.contentType == "" {
		r.contentType = "text/plain; charset=utf-8"
	}
	f.responses["mta-sts."+domain] = r
}

func (f *stsFixture) servePolicy(domain, policy string) {
	f.serve(domain, stsResponse{body: policy})
}

func (f *stsFixture) fetchCount(domain string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.fetches["mta-sts."+domain]
}

func (f *stsFixture) serveHTTP(w http.ResponseWriter, req *http.Request) {
	host, _, err := net.SplitHostPort(req.Host)
	if err != nil {
		host = req.Host
	}
	f.mu.Lock()
	f.fetches[host]++
	r, ok := f.responses[host]
	f.mu.Unlock()
	if !ok || req.URL.Path != "/.well-known/mta-sts.txt" {
		http.NotFound(w, req)
		return
	}
	if r.location != "" {
		w.Header().Set("Location", r.location)
	}
	w.Header().Set("Content-Type", r.contentType)
	w.WriteHeader(r.status)
	fmt.Fprint(w, r.body)
}

// addDomain publishes MX records for domain, addresses for the hosts,
// and the _mta-sts TXT record with id (none when id is "").
func (f *stsFixture) addDomain(domain, id string, mxHosts ...string) {
	for i, h := range mxHosts {
		f.dns.Add(fmt.Sprintf("%s. 300 IN MX %d %s.", domain, 10*(i+1), h),
			fmt.Sprintf("%s. 300 IN A 192.0.2.%d", h, i+1))
	}
	f.setID(domain, id)
}

func (f *stsFixture) setID(domain, id string) {
	f.dns.Remove("_mta-sts."+domain, dns.TypeTXT)
	if id != "" {
		f.dns.Add(fmt.Sprintf(`_mta-sts.%s. 300 IN TXT "v=STSv1; id=%s;"`, domain, id))
	}
}

// testCA returns a CA certificate and a leaf signed by it for names.
func testCA(t *testing.T, names []string) (*x509.Certificate, tls.Certificate) {
	t.Helper()
	ca := testcert.NewCA()
	return ca.Cert, ca.Leaf(names...)
}

const enforcePolicy = "version: STSv1\r\nmode: enforce\r\nmx: *.enforce.test\r\nmx: backup.elsewhere.test\r\nmax_age: 86400\r\n"

func TestMTASTS_Enforce_KeepsMatchingHostsAndRequiresVerifiedTLS(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	f.addDomain("enforce.test", "1", "mx1.enforce.test", "rogue.attacker.test", "mx2.enforce.test", "deep.mx.enforce.test")
	f.servePolicy("enforce.test", enforcePolicy)

	route, err := f.m.Resolve(t.Context(), "enforce.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx1.enforce.test", "mx2.enforce.test"}) {
		t.Fatalf("hosts %v", got)
	}
	if route.TLS != TLSVerified {
		t.Fatalf("TLS %v, want verified", route.TLS)
	}
	st := route.MTASTS
	if st == nil || st.Mode != "enforce" || st.ID != "1" ||
		!slices.Equal(st.Mismatched, []string{"rogue.attacker.test", "deep.mx.enforce.test"}) {
		t.Fatalf("status %+v", st)
	}
}

func TestMTASTS_Enforce_NoMatchingHost_Temporary(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	f.addDomain("enforce.test", "1", "rogue.attacker.test")
	f.servePolicy("enforce.test", enforcePolicy)
	_, err := f.m.Resolve(t.Context(), "enforce.test")
	wantError(t, err, true, 451, "4.4.4")
}

func TestMTASTS_Testing_OnlyReports(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.testing.test")
	f.addDomain("testing.test", "abc", "mx.testing.test", "rogue.attacker.test")
	f.servePolicy("testing.test", "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 600\n")
	route, err := f.m.Resolve(t.Context(), "testing.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx.testing.test", "rogue.attacker.test"}) {
		t.Fatalf("hosts %v", got)
	}
	if route.TLS != TLSOpportunistic {
		t.Fatalf("TLS %v changed in testing mode", route.TLS)
	}
	if st := route.MTASTS; st == nil || st.Mode != "testing" || st.ID != "abc" ||
		!slices.Equal(st.Mismatched, []string{"rogue.attacker.test"}) {
		t.Fatalf("status %+v", route.MTASTS)
	}
}

func TestMTASTS_NoneAndNoPolicy_Unchanged(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.none.test", "mta-sts.nopolicy.test")
	f.addDomain("none.test", "1", "mx.none.test", "other.none-else.test")
	f.servePolicy("none.test", "version: STSv1\nmode: none\nmax_age: 600\n")
	f.addDomain("nopolicy.test", "", "mx.nopolicy.test")
	f.servePolicy("nopolicy.test", enforcePolicy) // never fetched: no TXT

	for _, d := range []string{"none.test", "nopolicy.test"} {
		route, err := f.m.Resolve(t.Context(), d)
		if err != nil {
			t.Fatal(err)
		}
		if route.MTASTS != nil || route.TLS != TLSOpportunistic {
			t.Fatalf("%s: route %+v", d, route)
		}
	}
	if f.fetchCount("none.test") != 1 || f.fetchCount("nopolicy.test") != 0 {
		t.Fatalf("fetches none=%d nopolicy=%d", f.fetchCount("none.test"), f.fetchCount("nopolicy.test"))
	}
}

func TestMTASTS_Cache(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	f.addDomain("enforce.test", "1", "mx1.enforce.test", "mx.new.test")
	f.servePolicy("enforce.test", enforcePolicy)

	resolve := func() *Route {
		t.Helper()
		route, err := f.m.Resolve(t.Context(), "enforce.test")
		if err != nil {
			t.Fatal(err)
		}
		return route
	}
	resolve()
	resolve()
	if n := f.fetchCount("enforce.test"); n != 1 {
		t.Fatalf("%d fetches for an unchanged id, want 1", n)
	}
	if got := f.m.CachedDomains(); !slices.Equal(got, []string{"enforce.test"}) {
		t.Fatalf("cached %v", got)
	}

	// A new id fetches the new policy.
	f.servePolicy("enforce.test", "version: STSv1\nmode: enforce\nmx: mx.new.test\nmax_age: 3600\n")
	f.setID("enforce.test", "2")
	route := resolve()
	if n := f.fetchCount("enforce.test"); n != 2 {
		t.Fatalf("%d fetches after the id changed, want 2", n)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx.new.test"}) || route.MTASTS.ID != "2" {
		t.Fatalf("hosts %v status %+v", got, route.MTASTS)
	}

	// The TXT record going away does not remove a cached policy...
	f.setID("enforce.test", "")
	f.advance(59 * time.Minute)
	if route = resolve(); route.MTASTS == nil || route.MTASTS.ID != "2" {
		t.Fatalf("cached policy not used without TXT: %+v", route.MTASTS)
	}
	// ...until it expires.
	f.advance(2 * time.Minute)
	if route = resolve(); route.MTASTS != nil || len(route.Hosts) != 2 {
		t.Fatalf("expired policy still applied: %+v", route)
	}
	if n := f.fetchCount("enforce.test"); n != 2 {
		t.Fatalf("%d fetches, want 2", n)
	}
	if got := f.m.CachedDomains(); len(got) != 0 {
		t.Fatalf("cached %v after expiry", got)
	}

	// An expired policy is fetched again even if the id is the same.
	f.setID("enforce.test", "2")
	resolve()
	if n := f.fetchCount("enforce.test"); n != 3 {
		t.Fatalf("%d fetches after expiry, want 3", n)
	}
}

func TestMTASTS_FetchFailure_KeepsCachedPolicy(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	f.addDomain("enforce.test", "1", "mx1.enforce.test", "rogue.attacker.test")
	f.servePolicy("enforce.test", enforcePolicy)
	if _, err := f.m.Resolve(t.Context(), "enforce.test"); err != nil {
		t.Fatal(err)
	}
	f.serve("enforce.test", stsResponse{status: http.StatusInternalServerError, body: "oops"})
	f.setID("enforce.test", "2")
	route, err := f.m.Resolve(t.Context(), "enforce.test")
	if err != nil {
		t.Fatal(err)
	}
	if route.MTASTS == nil || route.MTASTS.ID != "1" || !slices.Equal(hostNames(route), []string{"mx1.enforce.test"}) {
		t.Fatalf("cached policy not used after a failed fetch: %+v", route)
	}
	if n := f.fetchCount("enforce.test"); n != 2 {
		t.Fatalf("%d fetches, want 2", n)
	}
	// A failed fetch is not retried at once...
	f.m.Resolve(t.Context(), "enforce.test")
	if n := f.fetchCount("enforce.test"); n != 2 {
		t.Fatalf("%d fetches during the failure backoff, want 2", n)
	}
	// ...but after the backoff.
	f.advance(DefaultMTASTSFailureBackoff + time.Second)
	f.servePolicy("enforce.test", "version: STSv1\nmode: testing\nmx: mx1.enforce.test\nmax_age: 86400\n")
	route, err = f.m.Resolve(t.Context(), "enforce.test")
	if err != nil {
		t.Fatal(err)
	}
	if n := f.fetchCount("enforce.test"); n != 3 || route.MTASTS.ID != "2" || route.MTASTS.Mode != "testing" {
		t.Fatalf("%d fetches, status %+v", n, route.MTASTS)
	}
}

func TestMTASTS_BadPolicyServer_NoPolicy(t *testing.T) {
	big := "version: STSv1\nmode: enforce\nmx: mx.bad.test\nmax_age: 600\n" + strings.Repeat("# padding\n", MaxMTASTSPolicySize/10+1)
	tests := []struct {
		name string
		resp stsResponse
		cert bool
	}{
		{"not found", stsResponse{status: http.StatusNotFound}, true},
		{"redirect", stsResponse{status: http.StatusFound, location: "https://mta-sts.enforce.test/.well-known/mta-sts.txt"}, true},
		{"wrong media type", stsResponse{contentType: "text/html", body: enforcePolicy}, true},
		{"too large", stsResponse{body: big}, true},
		{"invalid policy", stsResponse{body: "version: STSv2\nmode: enforce\nmx: x.test\nmax_age: 1\n"}, true},
		{"certificate for another name", stsResponse{body: enforcePolicy}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			names := []string{"mta-sts.enforce.test"}
			if tt.cert {
				names = append(names, "mta-sts.bad.test")
			}
			f := newSTSFixture(t, names...)
			f.servePolicy("enforce.test", enforcePolicy)
			f.addDomain("bad.test", "1", "rogue.attacker.test")
			f.serve("bad.test", tt.resp)
			route, err := f.m.Resolve(t.Context(), "bad.test")
			if err != nil {
				t.Fatal(err)
			}
			if route.MTASTS != nil || route.TLS != TLSOpportunistic || len(route.Hosts) != 1 {
				t.Fatalf("route %+v", route)
			}
			if tt.cert && f.fetchCount("bad.test") != 1 {
				t.Fatalf("%d fetches", f.fetchCount("bad.test"))
			}
			if !tt.cert && f.fetchCount("bad.test") != 0 {
				t.Fatal("request sent over a connection with a bad certificate")
			}
			if f.fetchCount("enforce.test") != 0 {
				t.Fatal("redirect followed")
			}
		})
	}
}

func TestMTASTS_ConcurrentResolvesFetchOnce(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	f.addDomain("enforce.test", "1", "mx1.enforce.test")
	f.servePolicy("enforce.test", enforcePolicy)
	var wg sync.WaitGroup
	errs := make(chan error, 20)
	for range 20 {
		wg.Go(func() {
			route, err := f.m.Resolve(context.Background(), "enforce.test")
			if err == nil && (route.MTASTS == nil || route.TLS != TLSVerified) {
				err = fmt.Errorf("policy not applied: %+v", route)
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := f.fetchCount("enforce.test"); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}
}

func TestMTASTS_NextErrorsAndStaticRoutesPassThrough(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test")
	_, err := f.m.Resolve(t.Context(), "nowhere.test")
	wantError(t, err, false, 550, "5.1.2")

	static := ResolverFunc(func(ctx context.Context, d string) (*Route, error) {
		return &Route{Domain: d, Key: "route:smart", Hosts: []Host{{Name: "smart.test"}}}, nil
	})
	m, err := NewMTASTS(MTASTSConfig{Next: static, LookupTXT: func(ctx context.Context, name string) ([]string, error) {
		return []string{"v=STSv1; id=1"}, nil
	}, HTTPClient: &http.Client{Transport: roundTripFunc(func(*http.Request) (*http.Response, error) {
		return nil, errors.New("no network in this test")
	})}})
	if err != nil {
		t.Fatal(err)
	}
	route, err := m.Resolve(t.Context(), "enforce.test")
	if err != nil || route.Key != "route:smart" || route.MTASTS != nil || route.TLS != TLSOpportunistic {
		t.Fatalf("route %+v, %v", route, err)
	}
	if _, err := NewMTASTS(MTASTSConfig{}); err == nil {
		t.Fatal("missing Next accepted")
	}
}

func TestParseMTASTSPolicy(t *testing.T) {
	good := []struct {
		in   string
		want MTASTSPolicy
	}{
		{"version: STSv1\nmode: enforce\nmx: mail.example.test\nmx: *.Example.NET.\nmax_age: 604800\n",
			MTASTSPolicy{Mode: MTASTSEnforce, MX: []string{"mail.example.test", "*.example.net"}, MaxAge: 604800 * time.Second}},
		{"version:STSv1\r\nmode:testing\r\nmx:a.test\r\nmax_age:0\r\nfuture: thing\r\n",
			MTASTSPolicy{Mode: MTASTSTesting, MX: []string{"a.test"}, MaxAge: 0}},
		{"version: STSv1\nmode: none\nmax_age: 31557600",
			MTASTSPolicy{Mode: MTASTSNone, MaxAge: MaxMTASTSMaxAge}},
	}
	for _, tt := range good {
		p, err := ParseMTASTSPolicy([]byte(tt.in))
		if err != nil {
			t.Fatalf("%q: %v", tt.in, err)
		}
		if p.Mode != tt.want.Mode || !slices.Equal(p.MX, tt.want.MX) || p.MaxAge != tt.want.MaxAge {
			t.Fatalf("%q: got %+v, want %+v", tt.in, p, tt.want)
		}
	}
	bad := []string{
		"",
		"mode: enforce\nmx: a.test\nmax_age: 1\n",
		"version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
		"version: STSv1\nmode: enforce\nmax_age: 1\n",
		"version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
		"version: STSv1\nmode: enforce\nmx: a.test\n",
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 99999999999999999999\n",
		"version: STSv1\nmode: enforce\nmx: *.test\nmax_age: 1\n",
		"version: STSv1\nmode: enforce\nmx: a.*.test\nmax_age: 1\n",
		"version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\nmode: none\n",
		"version: STSv1\nmode: enforce\nmx a.test\nmax_age: 1\n",
	}
	for _, in := range bad {
		if p, err := ParseMTASTSPolicy([]byte(in)); err == nil {
			t.Errorf("%q accepted: %+v", in, p)
		}
	}
}

func TestMTASTSPolicy_Match(t *testing.T) {
	p := &MTASTSPolicy{MX: []string{"mail.example.test", "*.example.net"}}
	tests := []struct {
		host string
		want bool
	}{
		{"mail.example.test", true},
		{"MAIL.Example.Test.", true},
		{"mx.mail.example.test", false},
		{"example.test", false},
		{"mx1.example.net", true},
		{"a.b.example.net", false},
		{"example.net", false},
		{".example.net", false},
		{"mx1.example.net.evil.test", false},
	}
	for _, tt := range tests {
		if got := p.Match(tt.host); got != tt.want {
			t.Errorf("Match(%q) = %v, want %v", tt.host, got, tt.want)
		}
	}
}

func TestParseSTSRecord(t *testing.T) {
	good := map[string]string{
		"v=STSv1; id=20160831085700Z;": "20160831085700Z",
		"v=STSv1;id=abc":               "abc",
		"v=STSv1; id=x; ext=1":         "x",
	}
	for in, want := range good {
		if id, err := parseSTSRecord(in); err != nil || id != want {
			t.Errorf("%q: %q, %v", in, id, err)
		}
	}
	for _, in := range []string{"v=STSv1", "v=STSv1; id=", "v=STSv1; id=a-b", "v=STSv1; id=a; id=b",
		"v=STSv1; id=" + strings.Repeat("a", 33), "v=STSv10; id=a", "v=STSv1; junk"} {
		if id, err := parseSTSRecord(in); err == nil {
			t.Errorf("%q accepted: %q", in, id)
		}
	}
}

func FuzzParseMTASTSPolicy(f *testing.F) {
	f.Add([]byte(enforcePolicy))
	f.Add([]byte("version: STSv1\nmode: none\nmax_age: 1"))
	f.Add([]byte("version: STSv1\nmode: testing\nmx: *.a.test\nmax_age: 5\nx:y\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParseMTASTSPolicy(data)
		if err != nil {
			return
		}
		if p.MaxAge < 0 || p.MaxAge > MaxMTASTSMaxAge {
			t.Fatalf("max_age %v out of range", p.MaxAge)
		}
		if p.Mode != MTASTSNone && len(p.MX) == 0 {
			t.Fatalf("mode %s without mx", p.Mode)
		}
		for _, pat := range p.MX {
			if !validMXPattern(pat) {
				t.Fatalf("invalid pattern %q accepted", pat)
			}
		}
	})
}

func BenchmarkMTASTS_Resolve_Cached(b *testing.B) {
	s := dnstest.Start(b)
	s.Add("enforce.test. 300 IN MX 10 mx1.enforce.test.", "mx1.enforce.test. 300 IN A 192.0.2.1",
		`_mta-sts.enforce.test. 300 IN TXT "v=STSv1; id=1"`)
	d := newTestDNS(b, 5*time.Second, s.Addr())
	m, err := NewMTASTS(MTASTSConfig{Next: d})
	if err != nil {
		b.Fatal(err)
	}
	// Prime the cache without the network: the benchmark measures the
	// lookups and the policy check, not HTTPS.
	p, _ := ParseMTASTSPolicy([]byte(enforcePolicy))
	m.mu.Lock()
	m.cache["enforce.test"] = &stsEntry{policy: p, id: "1", expires: time.Now().Add(time.Hour)}
	m.mu.Unlock()
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		route, err := m.Resolve(ctx, "enforce.test")
		if err != nil || route.TLS != TLSVerified {
			b.Fatalf("%+v %v", route, err)
		}
	}
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestMTASTS_PolicyDialerUsesResolver(t *testing.T) {
	caCert, leaf := testCA(t, []string{"mta-sts.enforce.test"})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, enforcePolicy)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())

	s := dnstest.Start(t)
	s.Add(
		"enforce.test. 300 IN MX 10 mx1.enforce.test.",
		"mx1.enforce.test. 300 IN A 192.0.2.1",
		`_mta-sts.enforce.test. 300 IN TXT "v=STSv1; id=1"`,
		"mta-sts.enforce.test. 300 IN A 127.0.0.1",
	)
	pool := x509.NewCertPool()
	pool.AddCert(caCert)
	for _, rejectLocal := range []bool{false, true} {
		d, err := NewDNS(DNSConfig{Servers: []string{s.Addr()}, RejectLocal: rejectLocal})
		if err != nil {
			t.Fatal(err)
		}
		client := &http.Client{Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext:     policyDialer(d, port),
		}}
		m, err := NewMTASTS(MTASTSConfig{Next: d, HTTPClient: client})
		if err != nil {
			t.Fatal(err)
		}
		p, id := m.Policy(t.Context(), "enforce.test")
		switch {
		case !rejectLocal && (p == nil || p.Mode != MTASTSEnforce || id != "1"):
			t.Fatalf("policy %+v id %q: not fetched through the resolver's address", p, id)
		case rejectLocal && p != nil:
			t.Fatalf("policy fetched from a loopback address with RejectLocal set")
		}
	}
}

func TestStack_StaticThenMTASTSThenDNS(t *testing.T) {
	f := newSTSFixture(t, "mta-sts.enforce.test", "mta-sts.routed.test")
	f.addDomain("enforce.test", "1", "mx1.enforce.test", "rogue.attacker.test")
	f.servePolicy("enforce.test", enforcePolicy)
	// routed.test publishes a policy its smarthost route must not be
	// held to: the policy is about its MX hosts, which are not used.
	f.addDomain("routed.test", "1", "mx.routed.test")
	f.servePolicy("routed.test", "version: STSv1\nmode: enforce\nmx: other.test\nmax_age: 600\n")
	st, err := NewStatic(StaticConfig{
		Routes: []StaticRoute{{Domain: "routed.test", Host: "192.0.2.200:2525"}},
		Next:   f.m,
	})
	if err != nil {
		t.Fatal(err)
	}
	route, err := st.Resolve(t.Context(), "enforce.test")
	if err != nil {
		t.Fatal(err)
	}
	if got := hostNames(route); !slices.Equal(got, []string{"mx1.enforce.test"}) || route.TLS != TLSVerified {
		t.Fatalf("enforce.test: hosts %v TLS %v", got, route.TLS)
	}
	route, err = st.Resolve(t.Context(), "routed.test")
	if err != nil {
		t.Fatal(err)
	}
	if route.Key != "route:192.0.2.200:2525" || route.MTASTS != nil || route.TLS != TLSOpportunistic {
		t.Fatalf("routed.test: route %+v", route)
	}
	if n := f.fetchCount("routed.test"); n != 0 {
		t.Fatalf("policy of a statically routed domain fetched %d times", n)
	}
}
