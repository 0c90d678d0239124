package mx

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// ErrNotFound is wrapped by the errors of LookupTXT and LookupAddrs when the
// name does not exist (NXDOMAIN) or has no records of the asked type
// (NODATA); test it with errors.Is.
var ErrNotFound = errors.New("no such record")

// Defaults for DNSConfig.
const (
	DefaultDNSTimeout  = 5 * time.Second
	DefaultDNSAttempts = 2
	DefaultMaxHosts    = 10
	// defaultUDPSize is the EDNS0 buffer size we advertise (the 2020 DNS
	// flag day value, small enough to avoid IP fragmentation).
	defaultUDPSize = 1232
	// maxCNAME bounds the CNAME chain followed inside one answer.
	maxCNAME = 8
)

// DNSConfig configures a DNS resolver. The zero value reads the servers
// from /etc/resolv.conf and uses the defaults.
type DNSConfig struct {
	// Servers are the recursive resolvers to ask, as host:port (a bare host
	// means port 53), tried in order when one fails. Empty means the
	// nameservers of ResolvConf.
	Servers []string
	// ResolvConf is the resolv.conf file read when Servers is empty;
	// empty means /etc/resolv.conf. Its nameserver lines give the servers
	// and its timeout and attempts options the defaults for Timeout and
	// Attempts. When /etc/resolv.conf is missing or lists no server, the
	// local host (127.0.0.1 and ::1, port 53) is asked, as the C library
	// does; a ResolvConf file given explicitly must exist.
	ResolvConf string
	// Timeout bounds each query to one server; 0 means DefaultDNSTimeout.
	Timeout time.Duration
	// Attempts is how many times the whole server list is tried before a
	// query fails; 0 means DefaultDNSAttempts.
	Attempts int
	// MaxHosts caps how many MX hosts are resolved and returned for one
	// domain (a defence against domains listing hundreds); 0 means
	// DefaultMaxHosts.
	MaxHosts int
	// Network restricts the addresses returned for hosts: "ip4" or "ip6";
	// empty or "ip" returns both, IPv4 first.
	Network string
	// RejectLocal drops host addresses that are not global unicast
	// (loopback, private, link-local, unspecified, multicast), so a
	// domain's DNS cannot point the relay at internal services. Production
	// relays should set it; tests delivering to 127.0.0.1 cannot.
	// Unspecified, multicast and broadcast addresses are dropped whatever
	// the setting.
	RejectLocal bool
	// Logger receives debug and warning records; nil discards them.
	Logger *slog.Logger
}

// DNS is a Resolver that looks up MX and address records with its own DNS
// client (github.com/miekg/dns), so that a temporary failure can be told
// from a name that does not exist. It is safe for concurrent use.
type DNS struct {
	servers     []string
	timeout     time.Duration
	attempts    int
	maxHosts    int
	network     string
	rejectLocal bool
	log         *slog.Logger
	udp         *dns.Client
	tcp         *dns.Client
}

var _ Resolver = (*DNS)(nil)

// NewDNS returns a DNS resolver for cfg. It fails on a malformed
// configuration, or when cfg.ResolvConf names a file that cannot be read.
func NewDNS(cfg DNSConfig) (*DNS, error) {
	r := &DNS{
		timeout:     cmp.Or(cfg.Timeout, DefaultDNSTimeout),
		attempts:    cmp.Or(cfg.Attempts, DefaultDNSAttempts),
		maxHosts:    cmp.Or(cfg.MaxHosts, DefaultMaxHosts),
		network:     cfg.Network,
		rejectLocal: cfg.RejectLocal,
		log:         cfg.Logger,
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	switch r.network {
	case "", "ip", "ip4", "ip6":
	default:
		return nil, fmt.Errorf("mx: unknown network %q", r.network)
	}
	if r.attempts < 0 || r.timeout < 0 || r.maxHosts < 0 {
		return nil, errors.New("mx: negative DNS timeout, attempts or host limit")
	}
	servers := cfg.Servers
	if len(servers) == 0 {
		path := cmp.Or(cfg.ResolvConf, "/etc/resolv.conf")
		cc, err := dns.ClientConfigFromFile(path)
		switch {
		case err == nil:
			for _, s := range cc.Servers {
				servers = append(servers, net.JoinHostPort(s, cmp.Or(cc.Port, "53")))
			}
			// resolv.conf's "options timeout:n attempts:n" apply unless
			// the configuration says otherwise.
			if cfg.Timeout == 0 && cc.Timeout > 0 {
				r.timeout = time.Duration(cc.Timeout) * time.Second
			}
			if cfg.Attempts == 0 && cc.Attempts > 0 {
				r.attempts = cc.Attempts
			}
		case cfg.ResolvConf != "":
			return nil, fmt.Errorf("mx: reading %s: %w", path, err)
		}
		if len(servers) == 0 {
			// What the C library does without a nameserver line.
			servers = []string{"127.0.0.1:53", "[::1]:53"}
			r.log.Debug("no nameserver configured, using the local host", "resolv.conf", path)
		}
	}
	for _, s := range servers {
		addr, err := serverAddr(s)
		if err != nil {
			return nil, err
		}
		r.servers = append(r.servers, addr)
	}
	r.udp = &dns.Client{Net: "udp", Timeout: r.timeout, UDPSize: defaultUDPSize}
	r.tcp = &dns.Client{Net: "tcp", Timeout: r.timeout}
	return r, nil
}

// serverAddr turns "host", "host:port", "ipv6" or "[ipv6]:port" into a
// dialable address with port 53 by default.
func serverAddr(s string) (string, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return "", errors.New("mx: empty DNS server address")
	}
	if ip, err := netip.ParseAddr(strings.Trim(s, "[]")); err == nil {
		return net.JoinHostPort(ip.String(), "53"), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return net.JoinHostPort(s, "53"), nil
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return "", fmt.Errorf("mx: bad DNS server port in %q", s)
	}
	return net.JoinHostPort(host, port), nil
}

// Resolve finds the MX hosts of domain and their addresses; see the package
// documentation for the steps. Failures are *Error values.
func (r *DNS) Resolve(ctx context.Context, domain string) (*Route, error) {
	name, err := normalizeDomain(domain)
	if err != nil {
		return nil, &Error{Domain: domain, Code: 550, Enhanced: "5.1.2",
			Reason: "invalid recipient domain", Err: err}
	}
	if ip, ok := addressLiteral(name); ok {
		return r.literalRoute(name, ip)
	}
	fqdn := dns.Fqdn(name)

	res, err := r.query(ctx, fqdn, dns.TypeMX)
	if err != nil {
		return nil, temporaryError(name, "MX lookup failed", err)
	}
	if res.Rcode == dns.RcodeNameError {
		return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2",
			Reason: "domain does not exist", Err: ErrNotFound}
	}
	var mxs []*dns.MX
	owners := chainOwners(res, fqdn)
	for _, rr := range res.Answer {
		if m, ok := rr.(*dns.MX); ok && owners[dns.CanonicalName(m.Hdr.Name)] {
			mxs = append(mxs, m)
		}
	}

	var hosts []Host
	if len(mxs) == 0 {
		// RFC 5321 §5.1: no MX records, so the domain itself is the only
		// host, with preference 0.
		h, err := r.lookupHost(ctx, name)
		if err != nil {
			if errors.Is(err, ErrNotFound) {
				return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2",
					Reason: "domain has no MX or address records", Err: err}
			}
			return nil, temporaryError(name, "address lookup for implicit MX failed", err)
		}
		if len(h.Addrs) == 0 {
			return nil, &Error{Domain: name, Temporary: true, Code: 451, Enhanced: "4.4.4",
				Reason: "domain has no usable address"}
		}
		r.log.DebugContext(ctx, "implicit MX", "domain", name, "addrs", h.Addrs)
		return &Route{Domain: name, Key: "mx:" + name, Hosts: []Host{h}, TLS: TLSOpportunistic}, nil
	}

	targets, nullMX := r.mxTargets(ctx, name, mxs)
	if len(targets) == 0 {
		if nullMX {
			return nil, &Error{Domain: name, Code: 556, Enhanced: "5.1.10",
				Reason: "domain does not accept mail (null MX)"}
		}
		return nil, &Error{Domain: name, Temporary: true, Code: 451, Enhanced: "4.4.4",
			Reason: "no usable MX host"}
	}

	hosts = r.resolveTargets(ctx, name, targets)
	if len(hosts) == 0 {
		if err := ctx.Err(); err != nil {
			return nil, temporaryError(name, "MX host lookup interrupted", err)
		}
		return nil, &Error{Domain: name, Temporary: true, Code: 451, Enhanced: "4.4.4",
			Reason: "no MX host has a usable address"}
	}
	return &Route{Domain: name, Key: "mx:" + name, Hosts: hosts, TLS: TLSOpportunistic}, nil
}

// mxTargets returns the MX targets in the order to try them: by
// preference, equal preferences shuffled, duplicates and unusable targets
// removed, at most maxHosts. nullMX reports a "0 ." record (RFC 7505).
func (r *DNS) mxTargets(ctx context.Context, domain string, mxs []*dns.MX) (targets []Host, nullMX bool) {
	rand.Shuffle(len(mxs), func(i, j int) { mxs[i], mxs[j] = mxs[j], mxs[i] })
	slices.SortStableFunc(mxs, func(a, b *dns.MX) int { return cmp.Compare(a.Preference, b.Preference) })
	seen := make(map[string]bool)
	for _, m := range mxs {
		target := strings.TrimSuffix(strings.ToLower(m.Mx), ".")
		switch {
		case target == "":
			// RFC 7505 §3: the null MX. A domain publishing it with
			// other MX records is misconfigured; use the others.
			nullMX = true
			continue
		case seen[target]:
			continue
		case isIPLiteral(target):
			r.log.WarnContext(ctx, "MX target is an IP address, not a host name; skipped",
				"domain", domain, "target", target)
			continue
		case isLocalhostName(target):
			r.log.WarnContext(ctx, "MX target is localhost; skipped", "domain", domain, "target", target)
			continue
		}
		if _, err := normalizeDomain(target); err != nil {
			r.log.WarnContext(ctx, "MX target is not a valid host name; skipped",
				"domain", domain, "target", target, "err", err)
			continue
		}
		seen[target] = true
		targets = append(targets, Host{Name: target, Port: 25, Preference: m.Preference})
	}
	if len(targets) > 0 && nullMX {
		r.log.WarnContext(ctx, "domain publishes a null MX with other MX records; null MX ignored",
			"domain", domain)
		nullMX = false
	}
	if len(targets) > r.maxHosts {
		targets = targets[:r.maxHosts]
	}
	return targets, nullMX
}

// resolveTargets looks up the addresses of all targets concurrently and
// returns the hosts that have at least one usable address, in order.
func (r *DNS) resolveTargets(ctx context.Context, domain string, targets []Host) []Host {
	var wg sync.WaitGroup
	errs := make([]error, len(targets))
	for i := range targets {
		wg.Go(func() {
			h, err := r.lookupHost(ctx, targets[i].Name)
			targets[i].Addrs = h.Addrs
			errs[i] = err
		})
	}
	wg.Wait()
	hosts := targets[:0]
	for i, h := range targets {
		if errs[i] != nil || len(h.Addrs) == 0 {
			r.log.WarnContext(ctx, "MX host has no usable address; skipped",
				"domain", domain, "host", h.Name, "err", errs[i])
			continue
		}
		hosts = append(hosts, h)
	}
	return hosts
}

// lookupHost returns a Host named name with its usable A and AAAA
// addresses. The error wraps ErrNotFound when neither type exists.
func (r *DNS) lookupHost(ctx context.Context, name string) (Host, error) {
	addrs, err := r.lookupAddrs(ctx, name)
	h := Host{Name: name, Port: 25}
	for _, a := range addrs {
		if r.usable(a) {
			h.Addrs = append(h.Addrs, a)
		}
	}
	return h, err
}

func (r *DNS) usable(a netip.Addr) bool {
	if !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return false
	}
	if r.rejectLocal && (!a.IsGlobalUnicast() || a.IsPrivate()) {
		return false
	}
	return true
}

// LookupAddrs returns the A and AAAA addresses of host (restricted by
// DNSConfig.Network), IPv4 first. An IP literal is returned as is. The
// error is an *Error: wrapping ErrNotFound when the host has no address
// records, Temporary for DNS trouble.
func (r *DNS) LookupAddrs(ctx context.Context, host string) ([]netip.Addr, error) {
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return []netip.Addr{ip.Unmap()}, nil
	}
	name, err := normalizeDomain(host)
	if err != nil {
		return nil, &Error{Domain: host, Code: 550, Enhanced: "5.1.2", Reason: "invalid host name", Err: err}
	}
	addrs, err := r.lookupAddrs(ctx, name)
	if err != nil {
		if errors.Is(err, ErrNotFound) {
			return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2", Reason: "host has no address", Err: err}
		}
		return nil, temporaryError(name, "address lookup failed", err)
	}
	return addrs, nil
}

// lookupAddrs queries A and AAAA concurrently. The error wraps ErrNotFound
// when every queried type is NXDOMAIN or NODATA; any other failure of a
// type is returned only when no type produced an address.
func (r *DNS) lookupAddrs(ctx context.Context, name string) ([]netip.Addr, error) {
	var qtypes []uint16
	switch r.network {
	case "ip4":
		qtypes = []uint16{dns.TypeA}
	case "ip6":
		qtypes = []uint16{dns.TypeAAAA}
	default:
		qtypes = []uint16{dns.TypeA, dns.TypeAAAA}
	}
	fqdn := dns.Fqdn(name)
	results := make([][]netip.Addr, len(qtypes))
	errs := make([]error, len(qtypes))
	var wg sync.WaitGroup
	for i, qt := range qtypes {
		wg.Go(func() {
			results[i], errs[i] = r.lookupType(ctx, fqdn, qt)
		})
	}
	wg.Wait()
	var addrs []netip.Addr
	for _, res := range results {
		addrs = append(addrs, res...)
	}
	if len(addrs) > 0 {
		return addrs, nil
	}
	for _, err := range errs {
		if err != nil && !errors.Is(err, ErrNotFound) {
			return nil, err
		}
	}
	return nil, fmt.Errorf("%s: %w", name, ErrNotFound)
}

// lookupType returns the addresses of one type (A or AAAA) for fqdn.
func (r *DNS) lookupType(ctx context.Context, fqdn string, qtype uint16) ([]netip.Addr, error) {
	res, err := r.query(ctx, fqdn, qtype)
	if err != nil {
		return nil, err
	}
	if res.Rcode == dns.RcodeNameError {
		return nil, fmt.Errorf("%s %s: %w", fqdn, dns.TypeToString[qtype], ErrNotFound)
	}
	owners := chainOwners(res, fqdn)
	var addrs []netip.Addr
	for _, rr := range res.Answer {
		if !owners[dns.CanonicalName(rr.Header().Name)] {
			continue
		}
		var ip net.IP
		switch rr := rr.(type) {
		case *dns.A:
			ip = rr.A
		case *dns.AAAA:
			ip = rr.AAAA
		default:
			continue
		}
		if rr.Header().Rrtype != qtype {
			continue
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			addrs = append(addrs, a.Unmap())
		}
	}
	if len(addrs) == 0 {
		return nil, fmt.Errorf("%s %s: %w", fqdn, dns.TypeToString[qtype], ErrNotFound)
	}
	return addrs, nil
}

// LookupTXT returns the TXT records of name, each record's strings joined
// into one string (as for DKIM keys, SPF, DMARC and MTA-STS records). The
// error is an *Error: wrapping ErrNotFound when the name does not exist or
// has no TXT records, Temporary for DNS trouble.
func (r *DNS) LookupTXT(ctx context.Context, name string) ([]string, error) {
	n, err := normalizeName(name)
	if err != nil {
		return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2", Reason: "invalid name", Err: err}
	}
	fqdn := dns.Fqdn(n)
	res, err := r.query(ctx, fqdn, dns.TypeTXT)
	if err != nil {
		return nil, temporaryError(n, "TXT lookup failed", err)
	}
	var txts []string
	if res.Rcode == dns.RcodeSuccess {
		owners := chainOwners(res, fqdn)
		for _, rr := range res.Answer {
			if t, ok := rr.(*dns.TXT); ok && owners[dns.CanonicalName(t.Hdr.Name)] {
				txts = append(txts, strings.Join(t.Txt, ""))
			}
		}
	}
	if len(txts) == 0 {
		return nil, &Error{Domain: n, Code: 550, Enhanced: "5.1.2", Reason: "no TXT record",
			Err: fmt.Errorf("%s TXT: %w", n, ErrNotFound)}
	}
	return txts, nil
}

// dnsFailure is a query that got no usable answer from any server.
type dnsFailure struct {
	name  string
	qtype uint16
	// rcode is the last server's response code, or -1 when none answered.
	rcode int
	err   error
}

func (e *dnsFailure) Error() string {
	q := strings.TrimSuffix(e.name, ".") + " " + dns.TypeToString[e.qtype]
	if e.rcode >= 0 {
		return q + ": " + dns.RcodeToString[e.rcode]
	}
	return q + ": " + e.err.Error()
}

func (e *dnsFailure) Unwrap() error { return e.err }

// query asks the servers in order, Attempts times over, and returns the
// first answer that is NOERROR or NXDOMAIN. A truncated UDP answer is
// asked again over TCP of the same server (RFC 1035 §4.2.1, RFC 7766); a
// FORMERR answer is asked again without EDNS0 (RFC 6891 §7).
// Other response codes, timeouts and network errors move on to the next
// server; the error is a *dnsFailure.
func (r *DNS) query(ctx context.Context, fqdn string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(fqdn, qtype)
	m.RecursionDesired = true
	m.SetEdns0(defaultUDPSize, false)

	fail := &dnsFailure{name: fqdn, qtype: qtype, rcode: -1}
	for range r.attempts {
		for _, server := range r.servers {
			if err := ctx.Err(); err != nil {
				return nil, &dnsFailure{name: fqdn, qtype: qtype, rcode: -1, err: err}
			}
			res, err := r.exchangeUDPThenTCP(ctx, m, server)
			if err == nil && res.Rcode == dns.RcodeFormatError {
				// RFC 6891 §7: a server that does not know EDNS answers
				// FORMERR; ask it again without the OPT record.
				r.log.DebugContext(ctx, "DNS server rejected EDNS0, retrying without",
					"name", fqdn, "type", dns.TypeToString[qtype], "server", server)
				plain := m.Copy()
				plain.Id = dns.Id()
				plain.Extra = nil
				res, err = r.exchangeUDPThenTCP(ctx, plain, server)
			}
			if err != nil {
				r.log.DebugContext(ctx, "DNS query failed", "name", fqdn,
					"type", dns.TypeToString[qtype], "server", server, "err", err)
				fail.rcode, fail.err = -1, err
				continue
			}
			switch res.Rcode {
			case dns.RcodeSuccess, dns.RcodeNameError:
				return res, nil
			}
			r.log.DebugContext(ctx, "DNS server error", "name", fqdn,
				"type", dns.TypeToString[qtype], "server", server, "rcode", dns.RcodeToString[res.Rcode])
			fail.rcode, fail.err = res.Rcode, nil
		}
	}
	return nil, fail
}

// exchangeUDPThenTCP asks server over UDP, and again over TCP when the
// answer is truncated.
func (r *DNS) exchangeUDPThenTCP(ctx context.Context, m *dns.Msg, server string) (*dns.Msg, error) {
	res, err := r.exchange(ctx, r.udp, m, server)
	if err == nil && res.Truncated {
		r.log.DebugContext(ctx, "DNS answer truncated, retrying over TCP", "name", m.Question[0].Name,
			"type", dns.TypeToString[m.Question[0].Qtype], "server", server)
		res, err = r.exchange(ctx, r.tcp, m, server)
	}
	return res, err
}

// exchange sends m to server with c, aborting when ctx is done, and checks
// that the answer is for the question asked.
func (r *DNS) exchange(ctx context.Context, c *dns.Client, m *dns.Msg, server string) (*dns.Msg, error) {
	conn, err := c.DialContext(ctx, server)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// miekg/dns obeys ctx deadlines but not cancellation: unblock the read.
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	res, _, err := c.ExchangeWithConnContext(ctx, m, conn)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	if !res.Response || len(res.Question) != 1 ||
		!strings.EqualFold(res.Question[0].Name, m.Question[0].Name) ||
		res.Question[0].Qtype != m.Question[0].Qtype {
		return nil, errors.New("answer does not match the question")
	}
	return res, nil
}

// chainOwners returns the names whose records answer a question for fqdn:
// fqdn itself and the targets of the CNAME chain that starts there.
func chainOwners(res *dns.Msg, fqdn string) map[string]bool {
	owners := map[string]bool{dns.CanonicalName(fqdn): true}
	name := dns.CanonicalName(fqdn)
	for range maxCNAME {
		next := ""
		for _, rr := range res.Answer {
			if c, ok := rr.(*dns.CNAME); ok && dns.CanonicalName(c.Hdr.Name) == name {
				next = dns.CanonicalName(c.Target)
				break
			}
		}
		if next == "" || owners[next] {
			break
		}
		owners[next] = true
		name = next
	}
	return owners
}

func temporaryError(domain, reason string, err error) *Error {
	return &Error{Domain: domain, Temporary: true, Code: 451, Enhanced: "4.4.3", Reason: reason, Err: err}
}

// literalRoute is the route to an address literal such as "[192.0.2.1]"
// (RFC 5321 §4.1.3): the address itself, no DNS.
func (r *DNS) literalRoute(name string, ip netip.Addr) (*Route, error) {
	if !r.usable(ip) {
		return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2",
			Reason: "address literal is not a usable destination"}
	}
	return &Route{
		Domain: name,
		Key:    "mx:" + name,
		Hosts:  []Host{{Name: ip.String(), Port: 25, Addrs: []netip.Addr{ip}}},
		TLS:    TLSOpportunistic,
	}, nil
}

// addressLiteral parses "[192.0.2.1]" and "[IPv6:2001:db8::1]".
func addressLiteral(domain string) (netip.Addr, bool) {
	if len(domain) < 3 || domain[0] != '[' || domain[len(domain)-1] != ']' {
		return netip.Addr{}, false
	}
	inner := domain[1 : len(domain)-1]
	if len(inner) > 5 && strings.EqualFold(inner[:5], "ipv6:") {
		ip, err := netip.ParseAddr(inner[5:])
		if err != nil || !ip.Is6() || ip.Is4In6() {
			return netip.Addr{}, false
		}
		return ip, true
	}
	ip, err := netip.ParseAddr(inner)
	if err != nil || !ip.Is4() {
		return netip.Addr{}, false
	}
	return ip, true
}

func isIPLiteral(name string) bool {
	_, err := netip.ParseAddr(strings.Trim(name, "[]"))
	return err == nil
}

func isLocalhostName(name string) bool {
	return name == "localhost" || strings.HasSuffix(name, ".localhost")
}

// normalizeDomain returns domain in the form used for lookups and keys:
// A-labels (see toASCII), lower case, no trailing dot. Address
// literals are returned in canonical form. Names that cannot be a mail
// domain are an error.
func normalizeDomain(domain string) (string, error) {
	d := strings.TrimSpace(domain)
	if ip, ok := addressLiteral(d); ok {
		if ip.Is6() {
			return "[IPv6:" + ip.String() + "]", nil
		}
		return "[" + ip.String() + "]", nil
	}
	d = strings.TrimSuffix(d, ".")
	if d == "" {
		return "", errors.New("empty domain")
	}
	ascii, err := toASCII(d)
	if err != nil {
		return "", err
	}
	if len(ascii) > 253 {
		return "", errors.New("domain name too long")
	}
	if !validName(ascii, false) {
		return "", errors.New("not a host name")
	}
	return ascii, nil
}

// normalizeName is normalizeDomain for DNS owner names, which may contain
// labels such as "_mta-sts" or "_domainkey" that IDNA lookup rules reject.
func normalizeName(name string) (string, error) {
	n := strings.TrimSuffix(strings.TrimSpace(name), ".")
	if n == "" {
		return "", errors.New("empty name")
	}
	labels := strings.Split(n, ".")
	for i, l := range labels {
		if strings.HasPrefix(l, "_") {
			labels[i] = strings.ToLower(l)
			continue
		}
		a, err := toASCII(l)
		if err != nil {
			return "", err
		}
		labels[i] = a
	}
	n = strings.Join(labels, ".")
	if !validName(n, true) || len(n) > 253 {
		return "", errors.New("not a domain name")
	}
	return n, nil
}

// validName reports whether name (lower case, A-labels, no trailing dot)
// is made of letter-digit-hyphen labels of 1 to 63 characters that neither
// start nor end with a hyphen (RFC 1123 §2.1, RFC 5321 §4.1.2), with
// underscores allowed when underscore is set (service labels such as
// "_mta-sts").
func validName(name string, underscore bool) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for _, label := range strings.Split(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			switch {
			case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			case c == '_' && underscore:
			default:
				return false
			}
		}
	}
	return true
}

// LookupMX returns the MX host names of domain in preference order (equal
// preferences shuffled), without resolving them and without the implicit
// MX: a domain without MX records gives an error wrapping ErrNotFound, and
// a null MX gives an empty list and no error. It suits checks such as the
// SPF "mx" mechanism; use Resolve to find where to deliver.
func (r *DNS) LookupMX(ctx context.Context, domain string) ([]string, error) {
	name, err := normalizeDomain(domain)
	if err != nil {
		return nil, &Error{Domain: domain, Code: 550, Enhanced: "5.1.2", Reason: "invalid domain", Err: err}
	}
	fqdn := dns.Fqdn(name)
	res, err := r.query(ctx, fqdn, dns.TypeMX)
	if err != nil {
		return nil, temporaryError(name, "MX lookup failed", err)
	}
	var mxs []*dns.MX
	if res.Rcode == dns.RcodeSuccess {
		owners := chainOwners(res, fqdn)
		for _, rr := range res.Answer {
			if m, ok := rr.(*dns.MX); ok && owners[dns.CanonicalName(m.Hdr.Name)] {
				mxs = append(mxs, m)
			}
		}
	}
	if len(mxs) == 0 {
		return nil, &Error{Domain: name, Code: 550, Enhanced: "5.1.2", Reason: "no MX records",
			Err: fmt.Errorf("%s MX: %w", name, ErrNotFound)}
	}
	rand.Shuffle(len(mxs), func(i, j int) { mxs[i], mxs[j] = mxs[j], mxs[i] })
	slices.SortStableFunc(mxs, func(a, b *dns.MX) int { return cmp.Compare(a.Preference, b.Preference) })
	hosts := []string{}
	for _, m := range mxs {
		if h := strings.TrimSuffix(strings.ToLower(m.Mx), "."); h != "" && !slices.Contains(hosts, h) {
			hosts = append(hosts, h)
		}
	}
	return hosts, nil
}
