package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

func retryText(err error) string {
	if se, ok := err.(*smtp.SMTPError); ok {
		return se.Message
	}
	return ""
}

func TestRateLimit_PerIPMessagesWithClock(t *testing.T) {
	clk := newClock()
	p := NewRateLimit(&RateLimitConfig{PerIP: Rate{Messages: 2, Per: time.Minute}, Now: clk.Now})
	c := unauth("198.51.100.9")
	want(t, "message 1", p.Mail(ctx, c, "a@x.test"), "ok")
	want(t, "message 2", p.Mail(ctx, c, "a@x.test"), "ok")
	err := p.Mail(ctx, c, "a@x.test")
	want(t, "message 3", err, "450 4.7.1")
	if got := retryText(err); got != "Rate limit exceeded, try again in 30s" {
		t.Errorf("text = %q", got)
	}
	clk.Add(10 * time.Second)
	if got := retryText(p.Mail(ctx, c, "a@x.test")); got != "Rate limit exceeded, try again in 20s" {
		t.Errorf("after 10s: text = %q", got)
	}
	// Refusals used up nothing: 30s after the start one message is due.
	clk.Add(20 * time.Second)
	want(t, "after 30s", p.Mail(ctx, c, "a@x.test"), "ok")
	want(t, "again at once", p.Mail(ctx, c, "a@x.test"), "450 4.7.1")
	// Other addresses have their own allowance; recipients are unlimited.
	want(t, "other address", p.Mail(ctx, unauth("198.51.100.10"), "a@x.test"), "ok")
	want(t, "rcpt unlimited", p.Rcpt(ctx, c, "a@x.test", "b@y.test"), "ok")
	// In-process callers (no address) are not limited per address.
	for range 5 {
		want(t, "in-process", p.Mail(ctx, &Client{}, "a@x.test"), "ok")
	}
}

func TestRateLimit_PerIdentityRecipients(t *testing.T) {
	clk := newClock()
	p := NewRateLimit(&RateLimitConfig{PerIdentity: Rate{Recipients: 3, Per: time.Hour}, Now: clk.Now})
	a1 := authed("alice")
	a2 := authed("alice") // another connection, another address, same identity
	a2.Addr = netip.MustParseAddr("2001:db8::1")
	want(t, "rcpt 1", p.Rcpt(ctx, a1, "", "1@y.test"), "ok")
	want(t, "rcpt 2", p.Rcpt(ctx, a2, "", "2@y.test"), "ok")
	want(t, "rcpt 3", p.Rcpt(ctx, a1, "", "3@y.test"), "ok")
	err := p.Rcpt(ctx, a2, "", "4@y.test")
	want(t, "rcpt 4", err, "450 4.7.1")
	if got := retryText(err); got != "Rate limit exceeded, try again in 20m0s" {
		t.Errorf("text = %q", got)
	}
	want(t, "messages unlimited", p.Mail(ctx, a1, "alice@a.test"), "ok")
	want(t, "bob unaffected", p.Rcpt(ctx, authed("bob"), "", "1@y.test"), "ok")

	// An identity's own rate replaces the default, and a changed rate
	// (reloaded users file) takes effect.
	carol := authed("carol")
	carol.Rate = Rate{Recipients: 1, Per: time.Minute}
	want(t, "carol 1", p.Rcpt(ctx, carol, "", "1@y.test"), "ok")
	want(t, "carol 2", p.Rcpt(ctx, carol, "", "2@y.test"), "450 4.7.1")
	carol.Rate = Rate{Recipients: 5, Per: time.Minute}
	clk.Add(time.Minute)
	for i := range 5 {
		want(t, fmt.Sprintf("carol raised %d", i), p.Rcpt(ctx, carol, "", "x@y.test"), "ok")
	}
	want(t, "carol raised 6", p.Rcpt(ctx, carol, "", "x@y.test"), "450 4.7.1")
	// Unauthenticated clients have no identity limit.
	anon := unauth("198.51.100.1")
	anon.Identity = "alice" // ignored when not authenticated
	want(t, "anon", p.Rcpt(ctx, anon, "", "x@y.test"), "ok")
}

func TestRateLimit_BothLimitsMustAllow(t *testing.T) {
	clk := newClock()
	p := NewRateLimit(&RateLimitConfig{PerIP: Rate{Messages: 1, Per: time.Minute}, PerIdentity: Rate{Messages: 10, Per: time.Minute}, Now: clk.Now})
	a := authed("alice")
	want(t, "first", p.Mail(ctx, a, ""), "ok")
	want(t, "IP exhausted", p.Mail(ctx, a, ""), "450 4.7.1")
	// The identity's allowance was not spent by the refusal: 9 more from
	// other addresses.
	for i := range 9 {
		b := authed("alice")
		b.Addr = netip.AddrFrom4([4]byte{203, 0, 113, byte(i + 1)})
		want(t, fmt.Sprintf("other address %d", i), p.Mail(ctx, b, ""), "ok")
	}
	b := authed("alice")
	b.Addr = netip.MustParseAddr("203.0.113.200")
	want(t, "identity exhausted", p.Mail(ctx, b, ""), "450 4.7.1")
}

func TestRateLimit_IPv6GroupedByPrefix(t *testing.T) {
	p := NewRateLimit(&RateLimitConfig{PerIP: Rate{Messages: 1, Per: time.Hour}, Now: newClock().Now})
	want(t, "first in /64", p.Mail(ctx, unauth("2001:db8:1:2::1"), ""), "ok")
	want(t, "second in same /64", p.Mail(ctx, unauth("2001:db8:1:2:ffff::9"), ""), "450 4.7.1")
	want(t, "other /64", p.Mail(ctx, unauth("2001:db8:1:3::1"), ""), "ok")
	want(t, "IPv4-mapped equals IPv4", p.Mail(ctx, unauth("192.0.2.1"), ""), "ok")
	want(t, "IPv4-mapped equals IPv4 (2)", p.Mail(ctx, unauth("::ffff:192.0.2.1"), ""), "450 4.7.1")
	q := NewRateLimit(&RateLimitConfig{PerIP: Rate{Messages: 1, Per: time.Hour}, IPv6Prefix: 128, Now: newClock().Now})
	want(t, "per address /128", q.Mail(ctx, unauth("2001:db8:1:2::1"), ""), "ok")
	want(t, "per address /128 (2)", q.Mail(ctx, unauth("2001:db8:1:2::2"), ""), "ok")
}

func TestRateLimit_MemoryBounded(t *testing.T) {
	clk := newClock()
	p := NewRateLimit(&RateLimitConfig{PerIP: Rate{Messages: 5, Per: time.Minute}, MaxEntries: 50, Now: clk.Now})
	for i := range 1000 {
		c := unauth(fmt.Sprintf("10.0.%d.%d", i/256, i%256))
		want(t, "spray", p.Mail(ctx, c, ""), "ok")
		if n := p.Len(); n > 50 {
			t.Fatalf("after %d clients, %d entries (max 50)", i+1, n)
		}
	}
	// Idle entries are swept as traffic goes on, long before the cap.
	clk.Add(2 * time.Minute)
	for range 30 {
		p.Mail(ctx, unauth("192.0.2.1"), "")
		clk.Add(time.Second)
	}
	if n := p.Len(); n > 1 {
		t.Fatalf("%d entries left after everyone else was idle for a window", n)
	}
}

func TestRateLimit_RetryHintRoundsUp(t *testing.T) {
	for _, c := range []struct {
		d    time.Duration
		want string
	}{
		{time.Millisecond, "1s"},
		{time.Second, "1s"},
		{1500 * time.Millisecond, "2s"},
		{90 * time.Second, "1m30s"},
	} {
		if got := retryText(rateRefusal(c.d)); !strings.HasSuffix(got, "try again in "+c.want) {
			t.Errorf("%v: %q", c.d, got)
		}
	}
}
