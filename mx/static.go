package mx

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
)

// StaticRoute sends mail for some domains to a fixed host (a smarthost or a
// per-domain transport) instead of looking up MX records.
type StaticRoute struct {
	// Name identifies the route in Route.Key ("route:" + Name): routes
	// with the same name share connections and per-destination limits,
	// so they must agree on host, port, credentials and TLS. Empty means
	// the host and port, prefixed with "username@" when Auth is set, so
	// domains sent to the same smarthost with the same account share
	// limits without further configuration.
	Name string
	// Domain is the recipient domain the route applies to: "example.com"
	// for that domain only, ".example.com" for its subdomains (not the
	// domain itself), "*" for every domain without a more specific route.
	Domain string
	// Host is the server's name or IP address, optionally with a port
	// ("smtp.example.com:587", "[2001:db8::1]:2525").
	Host string
	// Port is the TCP port when Host has none; 0 means 25.
	Port int
	// Auth, when set, is sent with SMTP AUTH. A route with credentials
	// and TLS mode TLSOpportunistic is raised to TLSRequired, so that a
	// password never crosses the network in clear text; set TLSNone
	// explicitly only for test sinks on loopback.
	Auth *Credentials
	// TLS is the minimum protection for connections on this route.
	TLS TLSMode
}

// StaticConfig configures a Static resolver.
type StaticConfig struct {
	// Routes are the configured routes. At most one route per Domain.
	Routes []StaticRoute
	// Next resolves domains that no route matches, typically a *DNS
	// (wrapped by MTASTS). Nil means such domains fail permanently with
	// 550 5.4.4.
	Next Resolver
	// Lookup finds the addresses of route hosts given as names, e.g. the
	// DNS resolver's LookupAddrs. Nil means the system resolver
	// (net.DefaultResolver, which also reads /etc/hosts). IP literals are
	// never looked up.
	Lookup func(ctx context.Context, host string) ([]netip.Addr, error)
	// Logger receives debug records; nil discards them.
	Logger *slog.Logger
}

// Static is a Resolver for configured routes that falls back to another
// Resolver. It is safe for concurrent use; it caches no addresses, so a
// smarthost's address changes are seen on the next lookup.
type Static struct {
	exact    map[string]*staticEntry
	suffixes map[string]*staticEntry // ".example.com" → route
	wildcard *staticEntry
	next     Resolver
	lookup   func(ctx context.Context, host string) ([]netip.Addr, error)
	log      *slog.Logger
}

var _ Resolver = (*Static)(nil)

type staticEntry struct {
	key  string
	host string
	port int
	addr netip.Addr // set when host is an IP literal
	auth *Credentials
	tls  TLSMode
}

// NewStatic checks the routes and returns a Static resolver.
func NewStatic(cfg StaticConfig) (*Static, error) {
	s := &Static{
		exact:    make(map[string]*staticEntry),
		suffixes: make(map[string]*staticEntry),
		next:     cfg.Next,
		lookup:   cfg.Lookup,
		log:      cfg.Logger,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.lookup == nil {
		s.lookup = func(ctx context.Context, host string) ([]netip.Addr, error) {
			return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
		}
	}
	byName := make(map[string]*staticEntry)
	for i, rt := range cfg.Routes {
		e, err := newStaticEntry(rt)
		if err != nil {
			return nil, fmt.Errorf("mx: route %d (%s): %w", i+1, rt.Domain, err)
		}
		if prev, ok := byName[e.key]; ok && !sameDestination(prev, e) {
			return nil, fmt.Errorf("mx: routes named %q differ in host, port, credentials or TLS", strings.TrimPrefix(e.key, "route:"))
		}
		byName[e.key] = e

		domain := strings.TrimSpace(rt.Domain)
		switch {
		case domain == "*":
			if s.wildcard != nil {
				return nil, errors.New("mx: more than one route for \"*\"")
			}
			s.wildcard = e
		case strings.HasPrefix(domain, "."):
			d, err := normalizeDomain(domain[1:])
			if err != nil {
				return nil, fmt.Errorf("mx: route %d: domain %q: %w", i+1, rt.Domain, err)
			}
			if _, dup := s.suffixes[d]; dup {
				return nil, fmt.Errorf("mx: more than one route for %q", rt.Domain)
			}
			s.suffixes[d] = e
		default:
			d, err := normalizeDomain(domain)
			if err != nil {
				return nil, fmt.Errorf("mx: route %d: domain %q: %w", i+1, rt.Domain, err)
			}
			if _, dup := s.exact[d]; dup {
				return nil, fmt.Errorf("mx: more than one route for %q", rt.Domain)
			}
			s.exact[d] = e
		}
	}
	return s, nil
}

func newStaticEntry(rt StaticRoute) (*staticEntry, error) {
	host, port := strings.TrimSpace(rt.Host), rt.Port
	if h, p, err := net.SplitHostPort(host); err == nil {
		n, err := strconv.Atoi(p)
		if err != nil {
			return nil, fmt.Errorf("bad port in host %q", rt.Host)
		}
		host, port = h, n
	}
	host = strings.Trim(host, "[]")
	if port == 0 {
		port = 25
	}
	if port < 0 || port > 65535 {
		return nil, fmt.Errorf("bad port %d", port)
	}
	if host == "" {
		return nil, errors.New("no host")
	}
	e := &staticEntry{port: port, tls: rt.TLS}
	if ip, err := netip.ParseAddr(host); err == nil {
		e.addr = ip.Unmap()
		e.host = e.addr.String()
	} else {
		h, err := normalizeDomain(host)
		if err != nil {
			return nil, fmt.Errorf("host %q: %w", rt.Host, err)
		}
		e.host = h
	}
	if rt.Auth != nil {
		a := *rt.Auth
		e.auth = &a
		if e.tls == TLSOpportunistic {
			e.tls = TLSRequired
		}
	}
	switch e.tls {
	case TLSOpportunistic, TLSNone, TLSRequired, TLSVerified:
	default:
		return nil, fmt.Errorf("unknown TLS mode %v", e.tls)
	}
	name := strings.TrimSpace(rt.Name)
	if name == "" {
		name = net.JoinHostPort(e.host, strconv.Itoa(e.port))
		if e.auth != nil {
			name = e.auth.Username + "@" + name
		}
	}
	e.key = "route:" + name
	return e, nil
}

func sameDestination(a, b *staticEntry) bool {
	if a.host != b.host || a.port != b.port || a.tls != b.tls || (a.auth == nil) != (b.auth == nil) {
		return false
	}
	return a.auth == nil || *a.auth == *b.auth
}

// Resolve returns the configured route for domain: an exact route, else
// the route for the nearest parent domain given as ".parent", else the
// "*" route, else what Next resolves. A route host's name that cannot be
// resolved is a temporary failure (451 4.4.3): a configuration or DNS
// problem must not bounce mail.
func (s *Static) Resolve(ctx context.Context, domain string) (*Route, error) {
	name, err := normalizeDomain(domain)
	if err != nil {
		return nil, &Error{Domain: domain, Code: 550, Enhanced: "5.1.2",
			Reason: "invalid recipient domain", Err: err}
	}
	e := s.match(name)
	if e == nil {
		if s.next == nil {
			return nil, &Error{Domain: name, Code: 550, Enhanced: "5.4.4", Reason: "no route for domain"}
		}
		return s.next.Resolve(ctx, name)
	}
	h := Host{Name: e.host, Port: e.port}
	if e.addr.IsValid() {
		h.Addrs = []netip.Addr{e.addr}
	} else {
		addrs, err := s.lookup(ctx, e.host)
		if err != nil {
			return nil, temporaryError(name, "route host lookup failed", err)
		}
		for _, a := range addrs {
			h.Addrs = append(h.Addrs, a.Unmap())
		}
		if len(h.Addrs) == 0 {
			return nil, &Error{Domain: name, Temporary: true, Code: 451, Enhanced: "4.4.3",
				Reason: "route host has no address"}
		}
	}
	s.log.DebugContext(ctx, "static route", "domain", name, "key", e.key, "host", e.host)
	rt := &Route{Domain: name, Key: e.key, Hosts: []Host{h}, TLS: e.tls}
	if e.auth != nil {
		a := *e.auth
		rt.Auth = &a
	}
	return rt, nil
}

func (s *Static) match(domain string) *staticEntry {
	if e, ok := s.exact[domain]; ok {
		return e
	}
	for d := domain; ; {
		i := strings.IndexByte(d, '.')
		if i < 0 {
			break
		}
		d = d[i+1:]
		if e, ok := s.suffixes[d]; ok {
			return e
		}
	}
	return s.wildcard
}
