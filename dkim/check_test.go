package dkim_test

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/batonmail/baton/dkim"
	"github.com/batonmail/baton/internal/dnstest"
	"github.com/batonmail/baton/mx"
)

// mx.DNS is the resolver relayd hands to CheckDomain.
var _ dkim.TXTResolver = (*mx.DNS)(nil)

// The relay addresses below are documentation addresses used as data
// only: nothing is ever sent to them.
var (
	relay4 = netip.MustParseAddr("192.0.2.10")
	relay6 = netip.MustParseAddr("2001:db8::10")
)

type checkEnv struct {
	dns  *dnstest.Server
	res  *mx.DNS
	keys *dkim.KeyStore
	recs map[string]string // the correct DKIM records
}

func newCheckEnv(t *testing.T) *checkEnv {
	t.Helper()
	srv := dnstest.Start(t)
	res, err := mx.NewDNS(mx.DNSConfig{Servers: []string{srv.Addr()}, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ks, recs := testKeys(t)
	return &checkEnv{dns: srv, res: res, keys: ks, recs: recs}
}

// publishGood publishes correct SPF, DKIM and DMARC records for
// example.test.
func (e *checkEnv) publishGood() {
	e.dns.Add(
		`example.test. 300 IN TXT "google-site-verification=abc"`,
		`example.test. 300 IN TXT "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all"`,
		`_dmarc.example.test. 300 IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@example.test"`,
	)
	for name, txt := range e.recs {
		e.dns.Add(dkim.ZoneRecord(name, txt))
	}
}

func (e *checkEnv) check(t *testing.T, cfg dkim.CheckConfig) *dkim.Report {
	t.Helper()
	cfg.Resolver = e.res
	if cfg.LookupAddrs == nil {
		cfg.LookupAddrs = e.res.LookupAddrs
	}
	if cfg.Keys == nil {
		cfg.Keys = e.keys
	}
	if cfg.Domain == "" {
		cfg.Domain = "example.test"
	}
	rep, err := dkim.CheckDomain(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

func item(t *testing.T, rep *dkim.Report, kind, name string) dkim.Item {
	t.Helper()
	for _, it := range rep.Items {
		if it.Kind == kind && (name == "" || it.Name == name) {
			return it
		}
	}
	t.Fatalf("no %s item %q in report:\n%s", kind, name, reportText(rep))
	return dkim.Item{}
}

func reportText(rep *dkim.Report) string {
	var b bytes.Buffer
	rep.WriteText(&b)
	return b.String()
}

func wantStatus(t *testing.T, rep *dkim.Report, kind, name string, want dkim.Status, problem string) dkim.Item {
	t.Helper()
	it := item(t, rep, kind, name)
	if it.Status != want {
		t.Errorf("%s %s: status %s, want %s\n%s", kind, it.Name, it.Status, want, reportText(rep))
	}
	if problem != "" && !strings.Contains(it.Problem, problem) {
		t.Errorf("%s %s: problem %q, want it to mention %q", kind, it.Name, it.Problem, problem)
	}
	return it
}

func TestCheckDomain_AllCorrect(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	rep := e.check(t, dkim.CheckConfig{RelayIPs: []netip.Addr{relay4, relay6}})
	if !rep.OK() {
		t.Fatalf("report not OK:\n%s", reportText(rep))
	}
	if n := len(rep.Items); n != 4 {
		t.Errorf("%d items, want SPF, 2 DKIM, DMARC:\n%s", n, reportText(rep))
	}
	spf := wantStatus(t, rep, "SPF", "example.test", dkim.StatusPresent, "authorised by")
	if len(spf.Found) != 1 || !strings.HasPrefix(spf.Found[0], "v=spf1") {
		t.Errorf("SPF found %q, want only the SPF record", spf.Found)
	}
	wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", dkim.StatusPresent, "")
	wantStatus(t, rep, "DKIM", "ed1._domainkey.example.test", dkim.StatusPresent, "")
	wantStatus(t, rep, "DMARC", "_dmarc.example.test", dkim.StatusPresent, "")
	if !strings.Contains(reportText(rep), "All records are in place.") {
		t.Errorf("text report does not say all is well:\n%s", reportText(rep))
	}
}

// TestCheckDomain_MissingThenPublished publishes exactly the records the
// report asks for and expects a clean report afterwards.
func TestCheckDomain_MissingThenPublished(t *testing.T) {
	e := newCheckEnv(t)
	cfg := dkim.CheckConfig{RelayIPs: []netip.Addr{relay4, relay6}}
	rep := e.check(t, cfg)
	if rep.OK() {
		t.Fatal("report OK with no records published")
	}
	spf := wantStatus(t, rep, "SPF", "example.test", dkim.StatusMissing, "")
	if spf.Publish != "v=spf1 ip4:192.0.2.10 ip6:2001:db8::10 ~all" {
		t.Errorf("SPF publish %q", spf.Publish)
	}
	rsa := wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", dkim.StatusMissing, "")
	if rsa.Publish != e.recs["rsa1._domainkey.example.test"] {
		t.Errorf("DKIM publish %q, want %q", rsa.Publish, e.recs["rsa1._domainkey.example.test"])
	}
	wantStatus(t, rep, "DKIM", "ed1._domainkey.example.test", dkim.StatusMissing, "")
	dmarc := wantStatus(t, rep, "DMARC", "_dmarc.example.test", dkim.StatusMissing, "no DMARC record")
	if !strings.HasPrefix(dmarc.Publish, "v=DMARC1; p=") {
		t.Errorf("DMARC publish %q", dmarc.Publish)
	}
	text := reportText(rep)
	for _, it := range rep.Items {
		zone := dkim.ZoneRecord(it.Name, it.Publish)
		if !strings.Contains(text, zone) {
			t.Errorf("text report lacks %s", zone)
		}
		e.dns.Add(zone)
	}
	if rep := e.check(t, cfg); !rep.OK() {
		t.Fatalf("still not OK after publishing the suggested records:\n%s", reportText(rep))
	}
}

func TestCheckDomain_DKIMKeyMismatch(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	// Publish other.test's key under example.test's RSA selector.
	e.dns.Remove("rsa1._domainkey.example.test", dns.TypeTXT)
	e.dns.Add(dkim.ZoneRecord("rsa1._domainkey.example.test", e.recs["k1._domainkey.other.test"]))
	rep := e.check(t, dkim.CheckConfig{})
	it := wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", dkim.StatusWrong, "does not match the private key")
	if it.Publish != e.recs["rsa1._domainkey.example.test"] {
		t.Errorf("publish %q, want the correct key", it.Publish)
	}
	wantStatus(t, rep, "DKIM", "ed1._domainkey.example.test", dkim.StatusPresent, "")
	if rep.OK() {
		t.Error("report OK with a mismatched key")
	}
}

func TestCheckDomain_DKIMRecordProblems(t *testing.T) {
	_, recs := testKeys(t)
	good := strings.TrimPrefix(recs["rsa1._domainkey.example.test"], "v=DKIM1; k=rsa; p=")
	cases := []struct {
		name    string
		records []string
		status  dkim.Status
		problem string
	}{
		{"revoked", []string{`"v=DKIM1; k=rsa; p="`}, dkim.StatusWrong, "revoked"},
		{"no p", []string{`"v=DKIM1; k=rsa"`}, dkim.StatusWrong, "no p= tag"},
		{"bad base64", []string{`"v=DKIM1; p=!!!"`}, dkim.StatusWrong, "base64"},
		{"wrong type", []string{`"v=DKIM1; k=ed25519; p=` + good + `"`}, dkim.StatusWrong, "k=ed25519"},
		{"unknown k", []string{`"v=DKIM1; k=dsa; p=AAAA"`}, dkim.StatusWrong, "unknown key type"},
		{"bad version", []string{`"v=DKIM2; p=AAAA"`}, dkim.StatusWrong, "DKIM1"},
		{"version not first", []string{`"k=rsa; v=DKIM1; p=` + good + `"`}, dkim.StatusWrong, "first tag"},
		{"sha1 only", []string{`"v=DKIM1; h=sha1; p=` + good + `"`}, dkim.StatusWrong, "sha256"},
		{"two records", []string{`"v=DKIM1; p=` + good + `"`, `"v=DKIM1; p=` + good + `"`}, dkim.StatusWrong, "several"},
		{"testing flag", []string{`"v=DKIM1; t=y; p=` + good + `"`}, dkim.StatusPresent, "t=y"},
		{"no version", []string{`"k=rsa; p=` + good + `"`}, dkim.StatusPresent, ""},
		{"split strings", []string{`"v=DKIM1; k=rsa; p=` + good[:100] + `" "` + good[100:] + `"`}, dkim.StatusPresent, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newCheckEnv(t)
			for _, r := range c.records {
				e.dns.Add("rsa1._domainkey.example.test. 300 IN TXT " + r)
			}
			rep := e.check(t, dkim.CheckConfig{Selectors: []string{"rsa1"}})
			wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", c.status, c.problem)
		})
	}
}

func TestCheckDomain_SelectorWithoutPrivateKey(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	e.dns.Add(dkim.ZoneRecord("legacy._domainkey.example.test", e.recs["k1._domainkey.other.test"]))
	rep := e.check(t, dkim.CheckConfig{Selectors: []string{"legacy", "absent"}})
	wantStatus(t, rep, "DKIM", "legacy._domainkey.example.test", dkim.StatusPresent, "no private key")
	it := wantStatus(t, rep, "DKIM", "absent._domainkey.example.test", dkim.StatusMissing, "not configured")
	if it.Publish != "" {
		t.Errorf("publish %q for a key we do not hold", it.Publish)
	}
}

func TestCheckDomain_NoKeysConfigured(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	rep := e.check(t, dkim.CheckConfig{Domain: "other-domain.test", Keys: &dkim.KeyStore{}})
	wantStatus(t, rep, "DKIM", "", dkim.StatusMissing, "keygen")
}

func TestCheckDomain_SPF(t *testing.T) {
	cases := []struct {
		name    string
		records []string
		status  dkim.Status
		problem string
		publish string
		noAddrs bool
	}{
		{name: "ip4 match", records: []string{`example.test. TXT "v=spf1 ip4:192.0.2.10 -all"`},
			status: dkim.StatusPresent, problem: `"ip4:192.0.2.10"`},
		{name: "not mentioned", records: []string{
			`example.test. TXT "v=spf1 ip4:198.51.100.1 a:other.example.test -all"`,
			`other.example.test. A 198.51.100.2`},
			status: dkim.StatusWrong, problem: "does not authorise the relay (192.0.2.10)",
			publish: "v=spf1 ip4:198.51.100.1 a:other.example.test ip4:192.0.2.10 -all"},
		{name: "mx not evaluated", records: []string{`example.test. TXT "v=spf1 ip4:198.51.100.1 mx -all"`},
			status: dkim.StatusUnknown, problem: "not checked: mx",
			publish: "v=spf1 ip4:198.51.100.1 mx ip4:192.0.2.10 -all"},
		{name: "failing qualifier does not authorise", records: []string{`example.test. TXT "v=spf1 -ip4:192.0.2.10 ~all"`},
			status: dkim.StatusWrong, problem: "does not authorise"},
		{name: "include chain", records: []string{
			`example.test. TXT "v=spf1 include:_spf.provider.test -all"`,
			`_spf.provider.test. TXT "v=spf1 include:_net2.provider.test ~all"`,
			`_net2.provider.test. TXT "v=spf1 ip4:192.0.2.0/28 ~all"`},
			status: dkim.StatusPresent, problem: "authorised by"},
		{name: "redirect", records: []string{
			`example.test. TXT "v=spf1 redirect=_spf.provider.test"`,
			`_spf.provider.test. TXT "v=spf1 ip4:192.0.2.10 -all"`},
			status: dkim.StatusPresent, problem: "authorised by"},
		{name: "a mechanism", records: []string{
			`example.test. TXT "v=spf1 a:out.example.test/30 -all"`,
			`out.example.test. A 192.0.2.9`},
			status: dkim.StatusPresent, problem: "a:out.example.test/30"},
		{name: "a mechanism without address lookups", noAddrs: true, records: []string{
			`example.test. TXT "v=spf1 a:out.example.test -all"`,
			`out.example.test. A 192.0.2.10`},
			status: dkim.StatusUnknown, problem: "not checked"},
		{name: "plus all", records: []string{`example.test. TXT "v=spf1 +all"`},
			status: dkim.StatusWrong, problem: "any host", publish: "v=spf1 ~all"},
		{name: "two records", records: []string{`example.test. TXT "v=spf1 -all"`, `example.test. TXT "v=spf1 ip4:192.0.2.10 -all"`},
			status: dkim.StatusWrong, problem: "several SPF records"},
		{name: "include without record", records: []string{`example.test. TXT "v=spf1 include:nothing.test -all"`},
			status: dkim.StatusWrong, problem: "no SPF record"},
		{name: "unknown mechanism", records: []string{`example.test. TXT "v=spf1 ipv4:192.0.2.10 -all"`},
			status: dkim.StatusWrong, problem: "unknown mechanism"},
		{name: "too many lookups", records: loopRecords(12),
			status: dkim.StatusWrong, problem: "more than 10 DNS lookups"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newCheckEnv(t)
			e.dns.Add(c.records...)
			cfg := dkim.CheckConfig{RelayIPs: []netip.Addr{relay4}}
			if c.noAddrs {
				cfg.LookupAddrs = func(context.Context, string) ([]netip.Addr, error) {
					return nil, fmt.Errorf("%w", mx.ErrNotFound)
				}
			}
			rep := e.check(t, cfg)
			if c.noAddrs {
				// Check with no address lookup at all.
				rep2, err := dkim.CheckDomain(context.Background(), dkim.CheckConfig{
					Resolver: e.res, Domain: "example.test", Keys: e.keys, RelayIPs: []netip.Addr{relay4}})
				if err != nil {
					t.Fatal(err)
				}
				rep = rep2
			}
			it := wantStatus(t, rep, "SPF", "example.test", c.status, c.problem)
			if c.publish != "" && it.Publish != c.publish {
				t.Errorf("publish %q, want %q", it.Publish, c.publish)
			}
		})
	}
}

// loopRecords returns an SPF record that needs n include look-ups.
func loopRecords(n int) []string {
	recs := []string{`example.test. TXT "v=spf1 include:i0.example.test -all"`}
	for i := range n {
		recs = append(recs, fmt.Sprintf(`i%d.example.test. TXT "v=spf1 include:i%d.example.test ~all"`, i, i+1))
	}
	recs = append(recs, fmt.Sprintf(`i%d.example.test. TXT "v=spf1 ip4:192.0.2.10 ~all"`, n))
	return recs
}

func TestCheckDomain_SPFWithoutRelayIPs(t *testing.T) {
	e := newCheckEnv(t)
	rep := e.check(t, dkim.CheckConfig{})
	it := wantStatus(t, rep, "SPF", "example.test", dkim.StatusMissing, "relay's addresses")
	if it.Publish != "" {
		t.Errorf("publish %q without knowing the relay's addresses", it.Publish)
	}
	e.dns.Add(`example.test. TXT "v=spf1 mx -all"`)
	rep = e.check(t, dkim.CheckConfig{})
	wantStatus(t, rep, "SPF", "example.test", dkim.StatusPresent, "only the syntax")
}

func TestCheckDomain_DMARC(t *testing.T) {
	cases := []struct {
		name    string
		domain  string
		records []string
		status  dkim.Status
		problem string
	}{
		{"p=none is present with a note", "example.test", []string{`_dmarc.example.test. TXT "v=DMARC1; p=none"`}, dkim.StatusPresent, "only monitors"},
		{"no policy", "example.test", []string{`_dmarc.example.test. TXT "v=DMARC1; rua=mailto:x@example.test"`}, dkim.StatusWrong, "no p= policy"},
		{"bad policy", "example.test", []string{`_dmarc.example.test. TXT "v=DMARC1; p=drop"`}, dkim.StatusWrong, "invalid policy"},
		{"two records", "example.test", []string{`_dmarc.example.test. TXT "v=DMARC1; p=reject"`, `_dmarc.example.test. TXT "v=DMARC1; p=none"`}, dkim.StatusWrong, "several DMARC records"},
		{"other TXT only", "example.test", []string{`_dmarc.example.test. TXT "hello"`}, dkim.StatusMissing, "no DMARC record"},
		{"inherited", "news.example.test", []string{`_dmarc.example.test. TXT "v=DMARC1; p=reject; sp=quarantine"`}, dkim.StatusPresent, "inherited from the organisational domain example.test"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e := newCheckEnv(t)
			e.dns.Add(c.records...)
			rep := e.check(t, dkim.CheckConfig{Domain: c.domain})
			wantStatus(t, rep, "DMARC", "_dmarc."+c.domain, c.status, c.problem)
		})
	}
}

func TestCheckDomain_ParentDomainSigning(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	e.dns.Add(`news.example.test. TXT "v=spf1 ip4:192.0.2.10 -all"`,
		`_dmarc.news.example.test. TXT "v=DMARC1; p=reject; adkim=s"`)
	rep := e.check(t, dkim.CheckConfig{Domain: "news.example.test", ParentDomains: true, RelayIPs: []netip.Addr{relay4}})
	if rep.SigningDomain != "example.test" {
		t.Errorf("SigningDomain %q", rep.SigningDomain)
	}
	wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", dkim.StatusPresent, "")
	wantStatus(t, rep, "DMARC", "_dmarc.news.example.test", dkim.StatusWrong, "adkim=s")
}

func TestCheckDomain_DNSFailureIsUnknown(t *testing.T) {
	e := newCheckEnv(t)
	e.publishGood()
	e.dns.SetRcode("ed1._domainkey.example.test", dns.TypeTXT, dns.RcodeServerFailure)
	e.dns.SetRcode("example.test", dns.TypeTXT, dns.RcodeServerFailure)
	rep := e.check(t, dkim.CheckConfig{RelayIPs: []netip.Addr{relay4}})
	wantStatus(t, rep, "DKIM", "ed1._domainkey.example.test", dkim.StatusUnknown, "DNS lookup failed")
	wantStatus(t, rep, "SPF", "example.test", dkim.StatusUnknown, "DNS lookup failed")
	wantStatus(t, rep, "DKIM", "rsa1._domainkey.example.test", dkim.StatusPresent, "")
	if rep.OK() {
		t.Error("report OK despite DNS failures")
	}
}

func TestCheckDomain_BadConfig(t *testing.T) {
	if _, err := dkim.CheckDomain(context.Background(), dkim.CheckConfig{Domain: "example.test"}); err == nil {
		t.Error("no resolver accepted")
	}
	r := dkim.TXTResolverFunc(func(context.Context, string) ([]string, error) { return nil, nil })
	if _, err := dkim.CheckDomain(context.Background(), dkim.CheckConfig{Resolver: r}); err == nil {
		t.Error("empty domain accepted")
	}
	if _, err := dkim.CheckDomain(context.Background(), dkim.CheckConfig{Resolver: r, Domain: "example.test", Selectors: []string{"bad/sel"}}); err == nil {
		t.Error("bad selector accepted")
	}
}
