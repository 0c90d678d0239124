package dkim

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
)

// TXTResolver looks up DNS TXT records. Each element of the result is one
// TXT record with its strings joined. A name without TXT records yields no
// records and either a nil error or an error that reports not-found (a
// *net.DNSError with IsNotFound set, or any error with a NotFound() bool
// method returning true); other errors mean the answer is unknown.
// mx.DNS implements it.
type TXTResolver interface {
	LookupTXT(ctx context.Context, name string) ([]string, error)
}

// TXTResolverFunc adapts a function to TXTResolver.
type TXTResolverFunc func(ctx context.Context, name string) ([]string, error)

// LookupTXT calls f.
func (f TXTResolverFunc) LookupTXT(ctx context.Context, name string) ([]string, error) {
	return f(ctx, name)
}

var _ TXTResolver = TXTResolverFunc(nil)

// CheckConfig says what CheckDomain checks.
type CheckConfig struct {
	// Resolver looks up TXT records; required.
	Resolver TXTResolver
	// LookupAddrs and LookupMX, when set, let the SPF check evaluate "a"
	// and "mx" mechanisms; without them such mechanisms are reported as
	// not checked. LookupMX returns the MX host names of a domain.
	LookupAddrs func(ctx context.Context, host string) ([]netip.Addr, error)
	LookupMX    func(ctx context.Context, domain string) ([]string, error)
	// Domain is the sender (From) domain to check; required.
	Domain string
	// Selectors are the DKIM selectors to check. Nil means every selector
	// Keys holds for the signing domain.
	Selectors []string
	// Keys, when set, holds the private keys the relay signs with: each
	// published public key is compared with the private key.
	Keys *KeyStore
	// ParentDomains is the Signer option of the same name: the signing
	// domain may be a parent of Domain.
	ParentDomains bool
	// RelayIPs are the addresses the relay sends from; SPF must authorise
	// each of them. Empty skips that part of the SPF check.
	RelayIPs []netip.Addr
	// Logger receives debug lines; nil discards.
	Logger *slog.Logger
}

// Status is the outcome of one check.
type Status string

// Check outcomes.
const (
	// StatusPresent means the record is published and correct.
	StatusPresent Status = "present"
	// StatusMissing means no record is published.
	StatusMissing Status = "missing"
	// StatusWrong means a record is published but is wrong; Problem says
	// why.
	StatusWrong Status = "wrong"
	// StatusUnknown means the record could not be looked up (DNS
	// failure) or checked fully.
	StatusUnknown Status = "unknown"
)

// Item is the result for one DNS record.
type Item struct {
	// Kind is "SPF", "DKIM" or "DMARC".
	Kind string
	// Name is the DNS name of the TXT record.
	Name string
	// Status is the outcome.
	Status Status
	// Found are the relevant TXT records found at Name.
	Found []string
	// Problem explains a wrong, missing or unknown status, or carries a
	// note for a present record; empty when there is nothing to say.
	Problem string
	// Publish is the TXT record text to publish at Name to fix the
	// problem; empty when nothing needs publishing.
	Publish string
}

// Report is the readiness of one sender domain.
type Report struct {
	// Domain is the checked sender domain.
	Domain string
	// SigningDomain is the d= domain the relay signs with (Domain, or a
	// parent with ParentDomains); empty when no key applies.
	SigningDomain string
	// Items has the SPF item first, then one per DKIM selector, then
	// DMARC.
	Items []Item
}

// OK reports whether every item is present.
func (r *Report) OK() bool {
	for _, it := range r.Items {
		if it.Status != StatusPresent {
			return false
		}
	}
	return true
}

// WriteText writes the report for people, with zone-file lines to publish.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "Domain %s", r.Domain)
	if r.SigningDomain != "" && r.SigningDomain != r.Domain {
		fmt.Fprintf(&b, " (signed as %s)", r.SigningDomain)
	}
	b.WriteString("\n")
	for _, it := range r.Items {
		fmt.Fprintf(&b, "\n%-5s %-8s %s\n", it.Kind, it.Status, it.Name)
		for _, f := range it.Found {
			fmt.Fprintf(&b, "      found:   %s\n", f)
		}
		if it.Problem != "" {
			fmt.Fprintf(&b, "      note:    %s\n", it.Problem)
		}
		if it.Publish != "" {
			fmt.Fprintf(&b, "      publish: %s\n", ZoneRecord(it.Name, it.Publish))
		}
	}
	if r.OK() {
		b.WriteString("\nAll records are in place.\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// CheckDomain looks up the SPF, DKIM and DMARC records of a sender domain
// through cfg.Resolver and reports, record by record, what is present,
// missing or wrong, with the exact records to publish. DNS failures are
// reported as StatusUnknown items; the error is for bad configuration and
// a cancelled ctx only.
//
// SPF (RFC 7208): exactly one v=spf1 record; with RelayIPs, it must
// authorise every relay address (ip4, ip6, include, redirect, and a/mx when
// the lookups are configured; at most 10 DNS-querying terms); "+all" is
// wrong. DKIM (RFC 6376 §3.6): one key record per selector, whose p= must
// be the public half of the configured private key. DMARC (RFC 7489): one
// v=DMARC1 record at _dmarc.Domain (or, failing that, at a parent domain
// as the organisational domain) with a valid p=.
func CheckDomain(ctx context.Context, cfg CheckConfig) (*Report, error) {
	if cfg.Resolver == nil {
		return nil, errors.New("dkim: CheckDomain needs a Resolver")
	}
	domain, err := NormalizeDomain(cfg.Domain)
	if err != nil {
		return nil, fmt.Errorf("dkim: domain %q: %w", cfg.Domain, err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &checker{cfg: cfg, log: log}
	rep := &Report{Domain: domain}

	rep.Items = append(rep.Items, c.spf(ctx, domain))

	keys := cfg.Keys.lookup(domain, cfg.ParentDomains)
	signing := domain
	if len(keys) > 0 {
		signing = keys[0].Domain
		rep.SigningDomain = signing
	}
	selectors := cfg.Selectors
	if selectors == nil {
		for _, k := range keys {
			selectors = append(selectors, k.Selector)
		}
	}
	if len(selectors) == 0 {
		rep.Items = append(rep.Items, Item{
			Kind:    "DKIM",
			Name:    "<selector>._domainkey." + domain,
			Status:  StatusMissing,
			Problem: "no DKIM key is configured for this domain; generate one (relayd dkim keygen) and publish the record it prints",
		})
	}
	for _, sel := range selectors {
		sel, err := normalizeSelector(sel)
		if err != nil {
			return nil, fmt.Errorf("dkim: selector %q: %w", sel, err)
		}
		var key *Key
		for _, k := range keys {
			if k.Selector == sel {
				key = k
			}
		}
		rep.Items = append(rep.Items, c.dkim(ctx, signing, sel, key))
	}

	rep.Items = append(rep.Items, c.dmarc(ctx, domain, signing))
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return rep, nil
}

type checker struct {
	cfg CheckConfig
	log *slog.Logger
}

// lookup returns the TXT records at name; notFound is true when the name
// has none (including NXDOMAIN).
func (c *checker) lookup(ctx context.Context, name string) ([]string, error) {
	recs, err := c.cfg.Resolver.LookupTXT(ctx, name)
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		c.log.DebugContext(ctx, "dkim check: TXT lookup failed", "name", name, "err", err)
		return nil, err
	}
	return recs, nil
}

func isNotFound(err error) bool {
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
		return true
	}
	var nf interface{ NotFound() bool }
	return errors.As(err, &nf) && nf.NotFound()
}

// withPrefix returns the records that start with prefix (case-insensitive)
// followed by a space or the end.
func withPrefix(recs []string, prefix string) []string {
	var out []string
	for _, r := range recs {
		t := strings.TrimSpace(r)
		if len(t) >= len(prefix) && strings.EqualFold(t[:len(prefix)], prefix) &&
			(len(t) == len(prefix) || t[len(prefix)] == ' ' || t[len(prefix)] == ';') {
			out = append(out, r)
		}
	}
	return out
}

// --- DKIM ---

func (c *checker) dkim(ctx context.Context, domain, selector string, key *Key) Item {
	it := Item{Kind: "DKIM", Name: selector + "._domainkey." + domain}
	want := ""
	if key != nil {
		want, _ = key.TXT()
	}
	recs, err := c.lookup(ctx, it.Name)
	if err != nil {
		it.Status = StatusUnknown
		it.Problem = "DNS lookup failed: " + err.Error()
		return it
	}
	it.Found = recs
	switch {
	case len(recs) == 0:
		it.Status = StatusMissing
		if want == "" {
			it.Problem = "no key record; the private key for this selector is not configured here, so the record cannot be shown"
		} else {
			it.Problem = "no key record: receivers cannot verify signatures made with this selector"
		}
		it.Publish = want
		return it
	case len(recs) > 1:
		it.Status = StatusWrong
		it.Problem = "several TXT records at this name; verifiers reject an ambiguous key (RFC 6376 §3.6.2.2): keep exactly one"
		it.Publish = want
		return it
	}
	pub, notes, err := parseKeyRecord(recs[0])
	if err != nil {
		it.Status = StatusWrong
		it.Problem = err.Error()
		it.Publish = want
		return it
	}
	if key != nil && !samePublicKey(pub, key.Signer.Public()) {
		it.Status = StatusWrong
		it.Problem = "the public key in DNS does not match the private key the relay signs with"
		it.Publish = want
		return it
	}
	it.Status = StatusPresent
	if key == nil {
		notes = append(notes, "record is valid, but no private key for this selector is configured here to compare with")
	}
	it.Problem = strings.Join(notes, "; ")
	return it
}

// parseKeyRecord parses a DKIM key record (RFC 6376 §3.6.1) and returns
// its public key and notes about acceptable oddities.
func parseKeyRecord(rec string) (crypto.PublicKey, []string, error) {
	tags := parseTags(rec)
	if v, ok := tags["v"]; ok {
		if v != "DKIM1" {
			return nil, nil, fmt.Errorf("unsupported version v=%s (must be DKIM1)", v)
		}
		if t := strings.TrimSpace(rec); !strings.HasPrefix(t, "v=") && !strings.HasPrefix(t, "v =") {
			return nil, nil, errors.New("v=DKIM1 must be the first tag of the record")
		}
	}
	var notes []string
	if h, ok := tags["h"]; ok {
		okHash := false
		for _, a := range strings.Split(h, ":") {
			if strings.EqualFold(a, "sha256") {
				okHash = true
			}
		}
		if !okHash {
			return nil, nil, fmt.Errorf("h=%s does not allow sha256, the only hash this relay signs with", h)
		}
	}
	if s, ok := tags["s"]; ok {
		okSvc := false
		for _, a := range strings.Split(s, ":") {
			if a == "*" || strings.EqualFold(a, "email") {
				okSvc = true
			}
		}
		if !okSvc {
			return nil, nil, fmt.Errorf("s=%s excludes email", s)
		}
	}
	if t, ok := tags["t"]; ok {
		for _, f := range strings.Split(t, ":") {
			switch f {
			case "y":
				notes = append(notes, "t=y: the domain is testing DKIM and verifiers may ignore failures; remove it when done")
			case "s":
				notes = append(notes, "t=s: signatures must use exactly this domain in d= (no subdomains)")
			}
		}
	}
	p, ok := tags["p"]
	if !ok {
		return nil, nil, errors.New("no p= tag: the record has no public key")
	}
	if p == "" {
		return nil, nil, errors.New("p= is empty: the key is revoked")
	}
	der, err := base64.StdEncoding.DecodeString(p)
	if err != nil {
		return nil, nil, errors.New("p= is not valid base64")
	}
	switch k := strings.ToLower(tags["k"]); k {
	case "", "rsa":
		pub, err := x509.ParsePKIXPublicKey(der)
		if err != nil {
			pk, err1 := x509.ParsePKCS1PublicKey(der)
			if err1 != nil {
				return nil, nil, errors.New("p= is not an RSA public key")
			}
			pub = pk
		}
		rsaPub, ok := pub.(*rsa.PublicKey)
		if !ok {
			return nil, nil, fmt.Errorf("k=rsa but p= holds a %T", pub)
		}
		if rsaPub.N.BitLen() < 1024 {
			return nil, nil, fmt.Errorf("RSA key of %d bits is too short; verifiers ignore keys under 1024 bits (RFC 8301)", rsaPub.N.BitLen())
		}
		if rsaPub.N.BitLen() < MinRSABits {
			notes = append(notes, fmt.Sprintf("RSA key of %d bits is weak; use 2048 bits", rsaPub.N.BitLen()))
		}
		return rsaPub, notes, nil
	case "ed25519":
		if len(der) != ed25519.PublicKeySize {
			return nil, nil, fmt.Errorf("k=ed25519 but p= holds %d bytes, not %d", len(der), ed25519.PublicKeySize)
		}
		return ed25519.PublicKey(der), notes, nil
	default:
		return nil, nil, fmt.Errorf("unknown key type k=%s", k)
	}
}

func samePublicKey(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

// --- DMARC ---

func (c *checker) dmarc(ctx context.Context, domain, signing string) Item {
	it := Item{Kind: "DMARC", Name: "_dmarc." + domain}
	suggest := "v=DMARC1; p=none; adkim=r; aspf=r"
	name := it.Name
	recs, err := c.lookup(ctx, name)
	if err != nil {
		it.Status = StatusUnknown
		it.Problem = "DNS lookup failed: " + err.Error()
		return it
	}
	recs = withPrefix(recs, "v=DMARC1")
	inherited := ""
	if len(recs) == 0 {
		// RFC 7489 §6.6.3: fall back to the organisational domain. Without
		// the public suffix list, try each parent of two labels or more.
		for d := domain; ; {
			_, rest, ok := strings.Cut(d, ".")
			if !ok || !strings.Contains(rest, ".") {
				break
			}
			d = rest
			prs, err := c.lookup(ctx, "_dmarc."+d)
			if err != nil {
				break
			}
			if prs = withPrefix(prs, "v=DMARC1"); len(prs) > 0 {
				recs, inherited, name = prs, d, "_dmarc."+d
				break
			}
		}
	}
	it.Found = recs
	switch {
	case len(recs) == 0:
		it.Status = StatusMissing
		it.Problem = "no DMARC record: receivers apply no policy and send no reports; start with p=none (add rua=mailto:... for reports) and tighten to quarantine or reject once reports are clean"
		it.Publish = suggest
		return it
	case len(recs) > 1:
		it.Status = StatusWrong
		it.Problem = "several DMARC records at " + name + "; receivers ignore them all (RFC 7489 §6.6.3): keep exactly one"
		it.Publish = suggest
		return it
	}
	tags := parseTags(recs[0])
	var notes []string
	if inherited != "" {
		notes = append(notes, "inherited from the organisational domain "+inherited)
	}
	p, ok := tags["p"]
	if inherited != "" {
		if sp, ok2 := tags["sp"]; ok2 {
			p, ok = sp, true
		}
	}
	switch strings.ToLower(p) {
	case "none":
		notes = append(notes, "p=none only monitors; move to quarantine or reject once reports show all mail passes")
	case "quarantine", "reject":
	default:
		it.Status = StatusWrong
		if !ok {
			it.Problem = "no p= policy tag"
		} else {
			it.Problem = "invalid policy p=" + p
		}
		it.Publish = suggest
		return it
	}
	if strings.EqualFold(tags["adkim"], "s") && signing != domain {
		it.Status = StatusWrong
		it.Problem = "adkim=s (strict alignment) but the relay signs with d=" + signing + ", a parent of the From domain: DKIM will not align; use adkim=r or a key for " + domain
		return it
	}
	it.Status = StatusPresent
	it.Problem = strings.Join(notes, "; ")
	return it
}
