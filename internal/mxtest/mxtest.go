// Package mxtest gives tests a resolver that sends every domain's mail to
// one SMTP server on the loopback interface, so that a relay delivers over
// real sockets without DNS.
package mxtest

import (
	"context"
	"net/netip"

	"github.com/batonmail/baton/mx"
)

// Loopback returns a Resolver that routes every domain to 127.0.0.1:port
// as if that were the domain's only MX: the route's key is "mx:"+domain
// (the Dest of the relay's events), its host is named "mx."+domain, and
// TLS is not required (mx.TLSNone), so that one plaintext go-smtp server
// stands for every destination.
func Loopback(port int) mx.Resolver {
	return mx.ResolverFunc(func(_ context.Context, domain string) (*mx.Route, error) {
		return &mx.Route{Domain: domain, Key: "mx:" + domain, TLS: mx.TLSNone,
			Hosts: []mx.Host{{Name: "mx." + domain, Port: port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}}, nil
	})
}
