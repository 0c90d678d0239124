package mx_test

import (
	"context"
	"errors"
	"fmt"

	"github.com/batonmail/baton/mx"
)

// A smarthost for everything, except one partner domain that has its own
// server; domains without a route would go to Next (here there is none).
func ExampleNewStatic() {
	r, err := mx.NewStatic(mx.StaticConfig{
		Routes: []mx.StaticRoute{
			{Domain: "*", Host: "192.0.2.1:587", Auth: &mx.Credentials{Username: "relay", Password: "secret"}},
			{Domain: "partner.example", Host: "[2001:db8::25]", TLS: mx.TLSVerified},
		},
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, domain := range []string{"example.com", "Partner.Example."} {
		rt, err := r.Resolve(context.Background(), domain)
		if err != nil {
			fmt.Println(err)
			continue
		}
		h := rt.Hosts[0]
		fmt.Println(rt.Domain, rt.Key, h.Addrs, h.Port, rt.TLS, rt.Auth != nil)
	}
	// Output:
	// example.com route:relay@192.0.2.1:587 [192.0.2.1] 587 required true
	// partner.example route:[2001:db8::25]:25 [2001:db8::25] 25 verified false
}

// Resolution errors say whether to retry or to bounce, and with which
// SMTP codes.
func ExampleError() {
	var r mx.Resolver = mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
		return nil, &mx.Error{Domain: domain, Code: 556, Enhanced: "5.1.10", Reason: "domain does not accept mail (null MX)"}
	})
	_, err := r.Resolve(context.Background(), "example.com")
	var e *mx.Error
	if errors.As(err, &e) {
		fmt.Println(e.Temporary, e.Code, e.Enhanced)
	}
	// Output: false 556 5.1.10
}
