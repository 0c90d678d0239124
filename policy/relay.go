package policy

import (
	"context"
)

// ClosedRelayConfig configures ClosedRelay. The zero value is an outbound
// relay that serves authenticated clients only.
type ClosedRelayConfig struct {
	// LocalDomains may receive mail from anyone, authenticated or not
	// (the relay is their inbound MX or forwards to it). An entry with a
	// leading "." or "*." also covers its subdomains. Empty means an
	// outbound-only relay: unauthenticated clients may not send at all.
	LocalDomains []string
}

// ClosedRelay keeps the relay closed: a client that is not Authenticated
// (by AUTH or an allow-list) may only send to LocalDomains, and with no
// local domains it may not send at all.
//
// Recipients of unauthenticated clients must be plain local@domain
// addresses whose domain is local. Everything that some mail system might
// route elsewhere is refused: the percent hack (user%foreign@local), bang
// paths (foreign!user@local), source routes (@local:user@foreign), quoted
// local parts holding '@' ("user@foreign"@local), address literals
// (user@[192.0.2.1]) and domains that are not host names. Domains compare
// case-insensitively and without a trailing dot.
//
// Replies: 530 5.7.0 "Authentication required" at MAIL (and RCPT) when
// there are no local domains; 554 5.7.1 "Relay access denied" at RCPT for
// a recipient that is not local. ClosedRelay is safe for concurrent use.
type ClosedRelay struct {
	Base
	local domainSet
}

// NewClosedRelay returns a ClosedRelay; cfg may be nil.
func NewClosedRelay(cfg *ClosedRelayConfig) *ClosedRelay {
	var c ClosedRelayConfig
	if cfg != nil {
		c = *cfg
	}
	return &ClosedRelay{local: newDomainSet(c.LocalDomains)}
}

var (
	errAuthRequired = Reject(530, [3]int{5, 7, 0}, "Authentication required")
	errRelayDenied  = Reject(554, [3]int{5, 7, 1}, "Relay access denied")
)

// Mail refuses unauthenticated senders when there are no local domains.
func (r *ClosedRelay) Mail(ctx context.Context, c *Client, from string) error {
	if !c.Authenticated && r.local.empty() {
		return errAuthRequired
	}
	return nil
}

// Rcpt refuses recipients an unauthenticated client may not reach.
func (r *ClosedRelay) Rcpt(ctx context.Context, c *Client, from, to string) error {
	if c.Authenticated {
		return nil
	}
	if r.local.empty() {
		return errAuthRequired
	}
	if !r.IsLocal(to) {
		return errRelayDenied
	}
	return nil
}

// IsLocal reports whether addr is a plain address in one of the local
// domains, that is, one an unauthenticated client may send to.
func (r *ClosedRelay) IsLocal(addr string) bool {
	mb, ok := parseMailbox(addr)
	return ok && mb.plain && r.local.has(mb.domain)
}
