package mx

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
)

// Resolver finds the destination of mail for a recipient domain.
//
// Resolve returns the hosts to try in order (MX preference, equal
// preferences shuffled, the domain itself as implicit MX when it has no MX
// records) with their addresses resolved, and the TLS requirement that
// applies. A failure is an *Error: Temporary for DNS trouble (the relay
// retries later, never bounces), permanent for a domain that cannot
// receive mail (NXDOMAIN, null MX per RFC 7505). Implementations are safe
// for concurrent use and honour ctx.
type Resolver interface {
	Resolve(ctx context.Context, domain string) (*Route, error)
}

// ResolverFunc adapts a function to Resolver.
type ResolverFunc func(ctx context.Context, domain string) (*Route, error)

// Resolve calls f.
func (f ResolverFunc) Resolve(ctx context.Context, domain string) (*Route, error) {
	return f(ctx, domain)
}

// TLSMode is how strongly a destination must be protected.
type TLSMode int

// TLS modes, from weakest to strongest.
const (
	// TLSOpportunistic uses STARTTLS when offered, with any certificate,
	// and falls back to plaintext when STARTTLS is not offered.
	TLSOpportunistic TLSMode = iota
	// TLSNone never uses STARTTLS (for test sinks and broken peers).
	TLSNone
	// TLSRequired needs STARTTLS but accepts any certificate.
	TLSRequired
	// TLSVerified needs STARTTLS with a certificate valid for the host name.
	TLSVerified
)

// String returns the mode's configuration name: "opportunistic", "none",
// "required" or "verified".
func (m TLSMode) String() string {
	switch m {
	case TLSOpportunistic:
		return "opportunistic"
	case TLSNone:
		return "none"
	case TLSRequired:
		return "required"
	case TLSVerified:
		return "verified"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// Host is one server to try.
type Host struct {
	// Name is the host name (the MX target, or the configured route host);
	// it is the name TLS certificates are verified against.
	Name string
	// Port is the TCP port; 0 means 25.
	Port int
	// Addrs are the host's addresses to dial, in order.
	Addrs []netip.Addr
	// Preference is the MX preference (lower first); 0 for static routes.
	Preference uint16
}

// Credentials are SMTP AUTH credentials for a smarthost.
type Credentials struct {
	Username string
	Password string
}

// Route is where mail for one domain goes.
type Route struct {
	// Domain is the recipient domain that was resolved.
	Domain string
	// Key names the destination for connection pooling and per-destination
	// limits: "mx:" + domain for MX routes, "route:" + name for static
	// routes, so domains sharing a smarthost share its limits.
	Key string
	// Hosts are the servers to try, in order.
	Hosts []Host
	// TLS is the minimum TLS protection for this destination.
	TLS TLSMode
	// Auth, when set, is used with SMTP AUTH after STARTTLS.
	Auth *Credentials
	// MTASTS, when set, is the MTA-STS policy (RFC 8461) that applied to
	// this route, for the deliverer's logs and events. In mode "enforce"
	// Hosts already holds only the hosts the policy allows and TLS is at
	// least TLSVerified; in mode "testing" nothing was changed and
	// failures are only to be reported.
	MTASTS *MTASTSStatus
}

// MTASTSStatus is what an MTA-STS policy did to a route.
type MTASTSStatus struct {
	// Mode is the policy mode: "enforce" or "testing".
	Mode string
	// ID is the policy id from the _mta-sts TXT record.
	ID string
	// Mismatched lists the MX hosts the policy does not allow: removed
	// from the route in enforce mode, kept (and only reported) in testing
	// mode.
	Mismatched []string
}

// Error is a resolution failure.
type Error struct {
	// Domain is the domain (or host, for address lookups) concerned.
	Domain string
	// Temporary failures are retried later; permanent ones bounce.
	Temporary bool
	// Code and Enhanced are the SMTP reply that the failure amounts to,
	// for DSNs and logs (e.g. 556 5.1.10 for a null MX).
	Code     int
	Enhanced string
	// Reason is a short human explanation.
	Reason string
	// Err is the underlying cause, if any.
	Err error
}

// Error returns the domain, the reason and the cause, for logs; it is
// never meant for an SMTP reply (use Code and Enhanced).
func (e *Error) Error() string {
	s := fmt.Sprintf("mx: %s: %s", e.Domain, e.Reason)
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

// Unwrap returns the underlying cause.
func (e *Error) Unwrap() error { return e.Err }

// NotFound reports whether the error means that the name or the asked
// records do not exist (NXDOMAIN or NODATA), as opposed to DNS trouble.
// Callers that cannot import this package (such as dkim.CheckDomain) test
// for it through an interface{ NotFound() bool }.
func (e *Error) NotFound() bool { return errors.Is(e.Err, ErrNotFound) }
