package policy

import (
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"
)

func benchChain() Chain {
	return Chain{
		NewAuthThrottle(nil),
		NewConnLimit(nil),
		NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"relay.test", ".sub.relay.test"}}),
		SendScope{},
		NewSenders(nil),
		NewLimits(&LimitsConfig{MaxRecipients: 1 << 30, MaxSize: 10 << 20}),
		NewRateLimit(&RateLimitConfig{
			PerIP:       Rate{Messages: 1 << 30, Recipients: 1 << 30, Per: time.Second},
			PerIdentity: Rate{Messages: 1 << 30, Recipients: 1 << 30, Per: time.Second},
		}),
	}
}

// BenchmarkChainRcpt measures the per-RCPT cost of the usual chain for an
// authenticated, restricted client (every built-in does its work).
func BenchmarkChainRcpt(b *testing.B) {
	ch := benchChain()
	c := authed("apikey:app")
	c.SenderDomains, c.Scopes = []string{"app.test"}, []string{"send"}
	ch.Connect(ctx, c)
	ch.Mail(ctx, c, "news@app.test")
	b.ReportAllocs()
	for b.Loop() {
		if err := ch.Rcpt(ctx, c, "news@app.test", "user@foreign.test"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkChainRcptUnauthenticated measures the closed-relay path for an
// unauthenticated client sending to a local domain.
func BenchmarkChainRcptUnauthenticated(b *testing.B) {
	ch := benchChain()
	c := unauth("198.51.100.1")
	ch.Connect(ctx, c)
	ch.Mail(ctx, c, "x@elsewhere.test")
	b.ReportAllocs()
	for b.Loop() {
		if err := ch.Rcpt(ctx, c, "x@elsewhere.test", "User@Relay.Test"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkChainRcptParallel runs the per-RCPT chain from many clients
// (one address and identity each) at once, to show lock contention.
func BenchmarkChainRcptParallel(b *testing.B) {
	ch := benchChain()
	b.ReportAllocs()
	var next atomic.Int64
	b.RunParallel(func(pb *testing.PB) {
		n := next.Add(1)
		c := authed(fmt.Sprintf("user%d", n))
		c.Addr = netip.AddrFrom4([4]byte{10, 0, byte(n >> 8), byte(n)})
		ch.Connect(ctx, c)
		ch.Mail(ctx, c, "x@a.test")
		for pb.Next() {
			if err := ch.Rcpt(ctx, c, "x@a.test", "user@foreign.test"); err != nil {
				b.Fatal(err)
			}
		}
	})
}
