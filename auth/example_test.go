package auth_test

import (
	"context"
	"fmt"
	"net/netip"

	"github.com/batonmail/baton/auth"
)

// Trusted networks relay without AUTH; the most specific entry wins, and
// IPv4 clients seen through a dual-stack socket match IPv4 prefixes.
func ExampleAllowList() {
	l, err := auth.NewAllowList([]auth.AllowEntry{
		{Identity: auth.Identity{Name: "office"}, Networks: []string{"10.0.0.0/8", "2001:db8::/48"}},
		{Identity: auth.Identity{Name: "printer", SenderAddrs: []string{"scanner@example.test"}}, Networks: []string{"10.0.5.9"}},
	})
	if err != nil {
		panic(err)
	}
	for _, a := range []string{"10.1.2.3", "::ffff:10.0.5.9", "2001:db8::25", "192.0.2.1"} {
		id, err := l.AuthenticateAddr(context.Background(), netip.MustParseAddr(a))
		if err != nil {
			fmt.Println(a, err)
			continue
		}
		fmt.Println(a, id.Name)
	}
	// Output:
	// 10.1.2.3 office
	// ::ffff:10.0.5.9 printer
	// 2001:db8::25 office
	// 192.0.2.1 auth: address not allowed
}
