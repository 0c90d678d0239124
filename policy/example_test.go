package policy_test

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/batonmail/baton/policy"
)

// A submission relay that also receives mail for one local domain: the
// usual chain, and what it answers an unauthenticated client.
func ExampleChain() {
	p := policy.Chain{
		policy.NewAuthThrottle(nil),
		policy.NewConnLimit(&policy.ConnLimitConfig{PerIP: 20}),
		policy.NewClosedRelay(&policy.ClosedRelayConfig{LocalDomains: []string{"example.test"}}),
		policy.SendScope{},
		policy.NewSenders(nil),
		policy.NewLimits(&policy.LimitsConfig{MaxRecipients: 100, MaxSize: 25 << 20}),
		policy.NewRateLimit(&policy.RateLimitConfig{PerIP: policy.Rate{Messages: 100, Per: time.Hour}}),
	}
	ctx := context.Background()
	c := &policy.Client{Addr: netip.MustParseAddr("198.51.100.7")}
	defer p.Disconnect(ctx, c)
	fmt.Println(p.Connect(ctx, c))
	fmt.Println(p.Mail(ctx, c, "someone@elsewhere.test"))
	fmt.Println(p.Rcpt(ctx, c, "someone@elsewhere.test", "info@example.test"))
	fmt.Println(p.Rcpt(ctx, c, "someone@elsewhere.test", "victim%other.test@example.test"))
	// Output:
	// <nil>
	// <nil>
	// <nil>
	// SMTP error 554: Relay access denied
}
