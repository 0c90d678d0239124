package mx

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// MTA-STS limits and defaults.
const (
	// DefaultMTASTSFetchTimeout bounds one policy fetch.
	DefaultMTASTSFetchTimeout = 20 * time.Second
	// DefaultMTASTSFailureBackoff is how long a failed fetch is not
	// retried for the same domain and policy id.
	DefaultMTASTSFailureBackoff = 5 * time.Minute
	// DefaultMTASTSCacheSize caps how many domains' policies are cached.
	DefaultMTASTSCacheSize = 10000
	// MaxMTASTSPolicySize is the largest policy body accepted (RFC 8461
	// §3.3 suggests 64 KiB).
	MaxMTASTSPolicySize = 64 << 10
	// MaxMTASTSMaxAge is the largest max_age a policy may have (RFC 8461
	// §3.2: 31557600 seconds, about a year).
	MaxMTASTSMaxAge = 31557600 * time.Second
)

// MTASTSMode is the mode of an MTA-STS policy.
type MTASTSMode string

// MTA-STS modes (RFC 8461 §5).
const (
	MTASTSEnforce MTASTSMode = "enforce"
	MTASTSTesting MTASTSMode = "testing"
	MTASTSNone    MTASTSMode = "none"
)

// MTASTSPolicy is a parsed MTA-STS policy file (RFC 8461 §3.2).
type MTASTSPolicy struct {
	// Mode is enforce, testing or none.
	Mode MTASTSMode
	// MX holds the allowed MX host patterns: host names, or "*.domain"
	// matching one leftmost label, in lower case without a trailing dot.
	MX []string
	// MaxAge is how long the policy may be cached.
	MaxAge time.Duration
}

// ParseMTASTSPolicy parses the body of an MTA-STS policy file. Lines are
// "key: value" separated by LF or CRLF; version must be STSv1, mode and
// max_age are required, mx is required unless the mode is none, and
// unknown keys are ignored.
func ParseMTASTSPolicy(data []byte) (*MTASTSPolicy, error) {
	p := &MTASTSPolicy{}
	var version string
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), MaxMTASTSPolicySize)
	for sc.Scan() {
		line := strings.TrimSuffix(sc.Text(), "\r")
		if strings.TrimSpace(line) == "" {
			continue
		}
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			return nil, fmt.Errorf("mta-sts: policy line without a colon: %q", truncate(line, 40))
		}
		key = strings.TrimSpace(key)
		value = strings.TrimSpace(value)
		if key != "mx" && seen[key] {
			return nil, fmt.Errorf("mta-sts: policy repeats %q", key)
		}
		seen[key] = true
		switch key {
		case "version":
			version = value
		case "mode":
			p.Mode = MTASTSMode(value)
		case "max_age":
			if value == "" || len(value) > 10 || strings.Trim(value, "0123456789") != "" {
				return nil, fmt.Errorf("mta-sts: bad max_age %q", truncate(value, 20))
			}
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil || time.Duration(n)*time.Second > MaxMTASTSMaxAge {
				return nil, fmt.Errorf("mta-sts: bad max_age %q", value)
			}
			p.MaxAge = time.Duration(n) * time.Second
		case "mx":
			pat := strings.TrimSuffix(strings.ToLower(value), ".")
			if !validMXPattern(pat) {
				return nil, fmt.Errorf("mta-sts: bad mx pattern %q", truncate(value, 80))
			}
			p.MX = append(p.MX, pat)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("mta-sts: %w", err)
	}
	switch {
	case version != "STSv1":
		return nil, fmt.Errorf("mta-sts: version %q, want STSv1", truncate(version, 20))
	case !seen["max_age"]:
		return nil, errors.New("mta-sts: policy has no max_age")
	}
	switch p.Mode {
	case MTASTSEnforce, MTASTSTesting:
		if len(p.MX) == 0 {
			return nil, errors.New("mta-sts: policy has no mx")
		}
	case MTASTSNone:
	default:
		return nil, fmt.Errorf("mta-sts: unknown mode %q", truncate(string(p.Mode), 20))
	}
	return p, nil
}

func validMXPattern(p string) bool {
	if rest, ok := strings.CutPrefix(p, "*."); ok {
		return strings.Contains(rest, ".") && validName(rest, false)
	}
	return validName(p, false)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// Match reports whether host (an MX host name) is allowed by one of the
// policy's mx patterns: an exact name, or "*.domain" for any name with
// exactly one more label than domain (RFC 8461 §4.1). Case and a trailing
// dot are ignored.
func (p *MTASTSPolicy) Match(host string) bool {
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	for _, pat := range p.MX {
		if rest, ok := strings.CutPrefix(pat, "*."); ok {
			label, parent, found := strings.Cut(host, ".")
			if found && label != "" && parent == rest {
				return true
			}
			continue
		}
		if host == pat {
			return true
		}
	}
	return false
}

// MTASTSConfig configures an MTASTS resolver.
type MTASTSConfig struct {
	// Next finds the MX hosts the policy is applied to, normally a *DNS.
	// Required.
	Next Resolver
	// LookupTXT looks up the _mta-sts TXT record. Nil means Next's
	// LookupTXT when Next is a *DNS, else the system resolver.
	LookupTXT func(ctx context.Context, name string) ([]string, error)
	// HTTPClient fetches policies. Nil means a client with the system's
	// root certificates that, when Next is a *DNS, finds the policy
	// host's addresses with it (so its servers and RejectLocal apply to
	// policy fetches too). Redirects are never followed whatever the
	// client's CheckRedirect says (RFC 8461 §3.3).
	HTTPClient *http.Client
	// FetchTimeout bounds one policy fetch; 0 means
	// DefaultMTASTSFetchTimeout.
	FetchTimeout time.Duration
	// FailureBackoff is how long a failed fetch is not retried for the
	// same domain and policy id; 0 means DefaultMTASTSFailureBackoff.
	FailureBackoff time.Duration
	// CacheSize caps the number of cached policies; 0 means
	// DefaultMTASTSCacheSize.
	CacheSize int
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// Logger receives policy decisions and fetch failures; nil discards.
	Logger *slog.Logger
}

// MTASTS is a Resolver that applies MTA-STS policies (RFC 8461) to the
// routes of another Resolver. It is safe for concurrent use. Policies are
// cached in memory per domain for their max_age; a cache survives only as
// long as the MTASTS value.
type MTASTS struct {
	next      Resolver
	lookupTXT func(ctx context.Context, name string) ([]string, error)
	client    *http.Client
	timeout   time.Duration
	backoff   time.Duration
	cacheSize int
	now       func() time.Time
	log       *slog.Logger

	mu       sync.Mutex
	cache    map[string]*stsEntry
	inflight map[string]*stsFetch
}

var _ Resolver = (*MTASTS)(nil)

// stsEntry is the cached state of one domain.
type stsEntry struct {
	policy  *MTASTSPolicy // nil when no policy was ever fetched
	id      string        // id of policy
	expires time.Time     // when policy stops being usable
	// failedID and retryAt remember the last failed fetch.
	failedID string
	retryAt  time.Time
}

// stsFetch is a fetch in progress, shared by concurrent Resolve calls.
type stsFetch struct {
	done chan struct{}
}

// NewMTASTS returns an MTASTS resolver.
func NewMTASTS(cfg MTASTSConfig) (*MTASTS, error) {
	if cfg.Next == nil {
		return nil, errors.New("mx: MTASTSConfig.Next is required")
	}
	m := &MTASTS{
		next:      cfg.Next,
		lookupTXT: cfg.LookupTXT,
		timeout:   cmp.Or(cfg.FetchTimeout, DefaultMTASTSFetchTimeout),
		backoff:   cmp.Or(cfg.FailureBackoff, DefaultMTASTSFailureBackoff),
		cacheSize: cmp.Or(cfg.CacheSize, DefaultMTASTSCacheSize),
		now:       cfg.Now,
		log:       cfg.Logger,
		cache:     make(map[string]*stsEntry),
		inflight:  make(map[string]*stsFetch),
	}
	if m.log == nil {
		m.log = slog.New(slog.DiscardHandler)
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.lookupTXT == nil {
		if d, ok := cfg.Next.(*DNS); ok {
			m.lookupTXT = d.LookupTXT
		} else {
			m.lookupTXT = net.DefaultResolver.LookupTXT
		}
	}
	var c http.Client
	if cfg.HTTPClient != nil {
		c = *cfg.HTTPClient
	} else {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		if d, ok := cfg.Next.(*DNS); ok {
			t.DialContext = policyDialer(d, "")
		}
		c.Transport = t
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	m.client = &c
	return m, nil
}

// Resolve resolves domain with Next and applies the domain's MTA-STS
// policy:
//   - enforce: only the MX hosts matching the policy are kept and TLS is
//     raised to TLSVerified; when none matches, the failure is temporary
//     (451 4.4.4), never a bounce;
//   - testing: the route is unchanged but Route.MTASTS reports the policy
//     and the hosts that do not match;
//   - none, or no policy: the route is unchanged.
//
// Routes of address literals and routes that are not MX routes (Key not
// starting with "mx:") are returned unchanged. The policy is looked up
// while Next resolves, and abandoned when Next fails.
func (m *MTASTS) Resolve(ctx context.Context, domain string) (*Route, error) {
	// Look the policy up while Next resolves: both start with DNS
	// round trips. The policy lookup is abandoned if it turns out not to
	// be needed.
	type found struct {
		policy *MTASTSPolicy
		id     string
	}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch := make(chan found, 1)
	if !strings.HasPrefix(strings.TrimSpace(domain), "[") {
		go func() {
			p, id := m.Policy(pctx, domain)
			ch <- found{p, id}
		}()
	} else {
		ch <- found{}
	}
	route, err := m.next.Resolve(ctx, domain)
	if err != nil || route == nil || !strings.HasPrefix(route.Key, "mx:") || strings.HasPrefix(route.Domain, "[") {
		cancel()
		<-ch
		return route, err
	}
	f := <-ch
	policy, id := f.policy, f.id
	if policy == nil || policy.Mode == MTASTSNone {
		return route, nil
	}
	out := *route
	out.Hosts = nil
	status := &MTASTSStatus{Mode: string(policy.Mode), ID: id}
	for _, h := range route.Hosts {
		if policy.Match(h.Name) {
			out.Hosts = append(out.Hosts, h)
		} else {
			status.Mismatched = append(status.Mismatched, h.Name)
		}
	}
	out.MTASTS = status
	if len(status.Mismatched) > 0 {
		m.log.WarnContext(ctx, "MX hosts not allowed by MTA-STS policy", "domain", route.Domain,
			"mode", policy.Mode, "id", id, "hosts", status.Mismatched)
	}
	if policy.Mode == MTASTSTesting {
		out.Hosts = route.Hosts
		return &out, nil
	}
	if len(out.Hosts) == 0 {
		return nil, &Error{Domain: route.Domain, Temporary: true, Code: 451, Enhanced: "4.4.4",
			Reason: "no MX host allowed by the MTA-STS policy"}
	}
	if out.TLS < TLSVerified {
		out.TLS = TLSVerified
	}
	return &out, nil
}

// Policy returns the MTA-STS policy in force for domain and its id, or nil
// when the domain has none (or it cannot be had and none is cached). It
// follows RFC 8461 §3 and §5.1: the _mta-sts TXT record is looked up each
// time; a cached, unexpired policy with the same id is used as is; a new
// id (or an expired or missing cache) fetches the policy over HTTPS; when
// the TXT record is gone or the fetch fails, an unexpired cached policy
// stays in force.
func (m *MTASTS) Policy(ctx context.Context, domain string) (*MTASTSPolicy, string) {
	domain, err := normalizeDomain(domain)
	if err != nil {
		return nil, ""
	}
	id, txtErr := m.discover(ctx, domain)
	for {
		now := m.now()
		m.mu.Lock()
		e := m.cache[domain]
		var cached *MTASTSPolicy
		var cachedID string
		if e != nil && e.policy != nil && now.Before(e.expires) {
			cached, cachedID = e.policy, e.id
		}
		switch {
		case id == "":
			m.mu.Unlock()
			if txtErr != nil && !errors.Is(txtErr, ErrNotFound) {
				m.log.DebugContext(ctx, "MTA-STS TXT lookup failed", "domain", domain, "err", txtErr)
			}
			return cached, cachedID
		case cached != nil && cachedID == id:
			m.mu.Unlock()
			return cached, cachedID
		case e != nil && e.failedID == id && now.Before(e.retryAt):
			m.mu.Unlock()
			return cached, cachedID
		}
		if f, ok := m.inflight[domain]; ok {
			m.mu.Unlock()
			select {
			case <-f.done:
				continue
			case <-ctx.Done():
				return cached, cachedID
			}
		}
		f := &stsFetch{done: make(chan struct{})}
		m.inflight[domain] = f
		m.mu.Unlock()

		p, err := m.fetch(ctx, domain)

		m.mu.Lock()
		delete(m.inflight, domain)
		close(f.done)
		e = m.entry(domain)
		now = m.now()
		if err != nil {
			// A fetch cut short by the caller's ctx says nothing about
			// the domain: let the next caller try again at once.
			cancelled := ctx.Err() != nil
			if !cancelled {
				e.failedID, e.retryAt = id, now.Add(m.backoff)
			}
			m.mu.Unlock()
			level := slog.LevelWarn
			if cancelled {
				level = slog.LevelDebug
			}
			m.log.Log(ctx, level, "MTA-STS policy fetch failed", "domain", domain, "id", id,
				"cached_id", cachedID, "err", err)
			return cached, cachedID
		}
		e.policy, e.id, e.expires = p, id, now.Add(p.MaxAge)
		e.failedID, e.retryAt = "", time.Time{}
		m.mu.Unlock()
		m.log.InfoContext(ctx, "MTA-STS policy fetched", "domain", domain, "id", id,
			"mode", p.Mode, "mx", p.MX, "max_age", p.MaxAge)
		return p, id
	}
}

// entry returns domain's cache entry, creating it and evicting others if
// the cache is full. m.mu must be held.
func (m *MTASTS) entry(domain string) *stsEntry {
	if e, ok := m.cache[domain]; ok {
		return e
	}
	if len(m.cache) >= m.cacheSize {
		now := m.now()
		for d, e := range m.cache {
			if !now.Before(e.expires) && !now.Before(e.retryAt) {
				delete(m.cache, d)
			}
		}
		// Still full: drop arbitrary entries (map order is random).
		for d := range m.cache {
			if len(m.cache) < m.cacheSize {
				break
			}
			delete(m.cache, d)
		}
	}
	e := &stsEntry{}
	m.cache[domain] = e
	return e
}

// discover looks up _mta-sts.<domain> and returns the policy id, or ""
// when there is no valid STSv1 record (RFC 8461 §3.1: exactly one record
// starting with "v=STSv1" is required).
func (m *MTASTS) discover(ctx context.Context, domain string) (string, error) {
	txts, err := m.lookupTXT(ctx, "_mta-sts."+domain)
	if err != nil {
		return "", err
	}
	var records []string
	for _, t := range txts {
		if strings.HasPrefix(t, "v=STSv1") {
			records = append(records, t)
		}
	}
	if len(records) != 1 {
		return "", fmt.Errorf("%d STSv1 records", len(records))
	}
	return parseSTSRecord(records[0])
}

// parseSTSRecord parses "v=STSv1; id=20160831085700Z;" and returns the id.
func parseSTSRecord(rec string) (string, error) {
	fields := strings.Split(rec, ";")
	if strings.TrimSpace(fields[0]) != "v=STSv1" {
		return "", errors.New("record does not start with v=STSv1")
	}
	id := ""
	for _, f := range fields[1:] {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		k, v, ok := strings.Cut(f, "=")
		if !ok {
			return "", errors.New("malformed field in STS record")
		}
		if k == "id" {
			if id != "" {
				return "", errors.New("repeated id in STS record")
			}
			id = v
		}
	}
	if id == "" || len(id) > 32 || strings.Trim(id, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") != "" {
		return "", fmt.Errorf("bad id %q in STS record", truncate(id, 40))
	}
	return id, nil
}

// fetch gets https://mta-sts.<domain>/.well-known/mta-sts.txt and parses
// it. The certificate must be valid for mta-sts.<domain> (the client's
// TLS verification), redirects are refused, the status must be 200, the
// media type text/plain, and the body at most MaxMTASTSPolicySize.
func (m *MTASTS) fetch(ctx context.Context, domain string) (*MTASTSPolicy, error) {
	ctx, cancel := context.WithTimeout(ctx, m.timeout)
	defer cancel()
	url := "https://mta-sts." + domain + "/.well-known/mta-sts.txt"
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	if resp.TLS == nil {
		return nil, errors.New("policy not fetched over TLS")
	}
	mt, _, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mt != "text/plain" {
		return nil, fmt.Errorf("media type %q, want text/plain", resp.Header.Get("Content-Type"))
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, MaxMTASTSPolicySize+1))
	if err != nil {
		return nil, err
	}
	if len(body) > MaxMTASTSPolicySize {
		return nil, fmt.Errorf("policy larger than %d bytes", MaxMTASTSPolicySize)
	}
	return ParseMTASTSPolicy(body)
}

// CachedDomains returns the domains with a cached policy that has not
// expired, sorted, for status pages and tests.
func (m *MTASTS) CachedDomains() []string {
	now := m.now()
	m.mu.Lock()
	defer m.mu.Unlock()
	var ds []string
	for d, e := range m.cache {
		if e.policy != nil && now.Before(e.expires) {
			ds = append(ds, d)
		}
	}
	slices.Sort(ds)
	return ds
}

// policyDialer returns a DialContext that resolves policy hosts
// ("mta-sts.*") with d and dials their usable addresses in turn; other
// hosts (such as a proxy) are dialled as usual. A non-empty port replaces
// the one asked for (for tests: policies are served on 443).
func policyDialer(d *DNS, port string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	var dialer net.Dialer
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, p, err := net.SplitHostPort(addr)
		if err != nil || !strings.HasPrefix(strings.ToLower(host), "mta-sts.") {
			return dialer.DialContext(ctx, network, addr)
		}
		if port != "" {
			p = port
		}
		addrs, err := d.lookupAddrs(ctx, host)
		if err != nil {
			return nil, err
		}
		errs := []error{}
		for _, a := range addrs {
			if !d.usable(a) {
				errs = append(errs, fmt.Errorf("%s: address %s not allowed", host, a))
				continue
			}
			conn, err := dialer.DialContext(ctx, network, net.JoinHostPort(a.String(), p))
			if err == nil {
				return conn, nil
			}
			errs = append(errs, err)
		}
		return nil, errors.Join(errs...)
	}
}
