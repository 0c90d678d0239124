package auth

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// AllowEntry is one named group of trusted networks and the identity that
// clients from them carry.
type AllowEntry struct {
	// Identity is what a matching client is; Identity.Name should be set
	// (it appears in logs and as the queue's submitter name).
	Identity Identity
	// Networks are CIDR prefixes ("10.0.0.0/8", "2001:db8::/32") or single
	// addresses ("192.0.2.7", "::1"). IPv4-mapped IPv6 forms
	// ("::ffff:192.0.2.0/120") are taken as the IPv4 prefix they map.
	Networks []string
}

// AllowList is an AddrAuthenticator for trusted hosts and devices that
// cannot authenticate (printers, internal application servers). The most
// specific matching prefix wins; among equally specific ones, the entry
// listed first. Client addresses in IPv4-mapped IPv6 form (::ffff:a.b.c.d,
// as a dual-stack listener reports IPv4 clients) match IPv4 prefixes, and
// IPv6 zones are ignored.
//
// An AllowList is immutable and safe for concurrent use; build a new one to
// change it.
type AllowList struct {
	rules []allowRule // sorted by prefix length, longest first (stable)
}

type allowRule struct {
	prefix netip.Prefix
	id     *Identity
}

var _ AddrAuthenticator = (*AllowList)(nil)

// NewAllowList checks and compiles entries. An invalid network is an error
// naming the entry.
func NewAllowList(entries []AllowEntry) (*AllowList, error) {
	l := &AllowList{}
	for i := range entries {
		e := &entries[i]
		id := e.Identity
		id.SenderDomains = slices.Clone(id.SenderDomains)
		id.SenderAddrs = slices.Clone(id.SenderAddrs)
		id.Scopes = slices.Clone(id.Scopes)
		if err := ValidStream(id.Stream); err != nil {
			return nil, fmt.Errorf("auth: allow-list entry %q: %w", id.Name, err)
		}
		for _, n := range e.Networks {
			p, err := ParsePrefix(n)
			if err != nil {
				return nil, fmt.Errorf("auth: allow-list entry %q: %w", id.Name, err)
			}
			l.rules = append(l.rules, allowRule{prefix: p, id: &id})
		}
	}
	slices.SortStableFunc(l.rules, func(a, b allowRule) int { return b.prefix.Bits() - a.prefix.Bits() })
	return l, nil
}

// ParsePrefix parses a CIDR prefix or a single address (which becomes a
// full-length prefix), turning IPv4-mapped IPv6 into plain IPv4 and
// masking host bits ("10.1.2.3/8" is 10.0.0.0/8). Zones are refused.
func ParsePrefix(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		p, err = netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		if a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("address %q has a zone", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	a := p.Addr()
	if a.Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, fmt.Errorf("IPv4-mapped prefix %q is shorter than /96", s)
		}
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	return p.Masked(), nil
}

// AuthenticateAddr returns a copy of the identity of the most specific
// entry containing addr, or ErrNotAllowed.
func (l *AllowList) AuthenticateAddr(ctx context.Context, addr netip.Addr) (*Identity, error) {
	if id := l.Match(addr); id != nil {
		return id, nil
	}
	return nil, ErrNotAllowed
}

// Match returns a copy of the identity for addr, or nil when no entry
// contains it.
func (l *AllowList) Match(addr netip.Addr) *Identity {
	if l == nil || !addr.IsValid() {
		return nil
	}
	addr = addr.Unmap().WithZone("")
	for _, r := range l.rules {
		if r.prefix.Contains(addr) {
			id := *r.id
			id.SenderDomains = slices.Clone(id.SenderDomains)
			id.SenderAddrs = slices.Clone(id.SenderAddrs)
			id.Scopes = slices.Clone(id.Scopes)
			return &id
		}
	}
	return nil
}

// Len returns the number of prefixes in the list.
func (l *AllowList) Len() int {
	if l == nil {
		return 0
	}
	return len(l.rules)
}
