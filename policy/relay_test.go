package policy

import (
	"testing"
)

// openRelayProbes are recipient forms that open relays have been tricked
// with. Each is foreign (or ambiguous) for a relay whose only local
// domains are relay.test and subdomains of sub.relay.test.
var openRelayProbes = []string{
	"user@foreign.test",
	"user@FOREIGN.TEST",
	"user@foreign.test.",
	"user%foreign.test@relay.test", // percent hack
	"user%foreign.test%relay.test@relay.test",
	"foreign.test!user@relay.test", // bang path
	"relay.test!foreign.test!user@relay.test",
	"@relay.test:user@foreign.test", // source route
	"@relay.test,@other.test:user@relay.test",
	"<@relay.test:user@foreign.test>",
	`"user@foreign.test"@relay.test`, // quoted local part with '@'
	`"user%foreign.test"@relay.test`,
	`"foreign.test!user"@relay.test`,
	"user@foreign.test@relay.test", // what go-smtp leaves of the quoted form
	"user@relay.test@foreign.test",
	"user@[192.0.2.1]", // address literals
	"user@[127.0.0.1]",
	"user@[IPv6:::1]",
	"user@[relay.test]",
	"user@relay.test.foreign.test",
	"user@foreign.test.relay.test", // not a configured subdomain
	"user@sub.relay.test",          // ".sub.relay.test" covers subdomains only
	"user@relay.test..",
	"user@relay..test",
	"user@.relay.test",
	"user@relay.test%foreign.test",
	"user@relay.test,user@foreign.test",
	"user@relay.test>foreign.test",
	"user@relay.test:25",
	"user@relay.test foreign.test",
	"user@relay.test\r\nRCPT TO:<x@foreign.test>",
	"user@relay.tes",
	"user@ｒｅｌａｙ.test", // full-width look-alike
	"user@-relay.test",
	"user@",
	"@relay.test",
	"postmaster", // no domain: not ours to route
	"",
	"user",
	`"unterminated@relay.test`,
	`"a"b@relay.test`,
}

func TestClosedRelay_OpenRelayProbes(t *testing.T) {
	p := NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"relay.test", "Local2.TEST.", ".sub.relay.test"}})
	c := unauth("198.51.100.7")
	want(t, "unauthenticated MAIL with local domains", p.Mail(ctx, c, "anyone@foreign.test"), "ok")
	want(t, "unauthenticated null sender with local domains", p.Mail(ctx, c, ""), "ok")
	for _, to := range openRelayProbes {
		want(t, "RCPT "+to, p.Rcpt(ctx, c, "anyone@foreign.test", to), "554 5.7.1")
	}
	for _, to := range []string{
		"user@relay.test",
		"User.Name+tag@RELAY.test",
		"user@relay.test.",
		"user@local2.test",
		"user@x.sub.relay.test",
		"user@a.b.sub.relay.test",
		`"quoted"@relay.test`, // quoted but plain
	} {
		want(t, "local RCPT "+to, p.Rcpt(ctx, c, "anyone@foreign.test", to), "ok")
	}
	// Authenticated (or allow-listed) clients may relay anywhere.
	a := authed("alice")
	for _, to := range append([]string{"user@foreign.test"}, openRelayProbes[:5]...) {
		want(t, "authenticated RCPT "+to, p.Rcpt(ctx, a, "alice@relay.test", to), "ok")
	}
}

func TestClosedRelay_OutboundOnly(t *testing.T) {
	for _, p := range []*ClosedRelay{NewClosedRelay(nil), NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"[1.2.3.4]", ""}})} {
		c := unauth("198.51.100.7")
		want(t, "unauthenticated MAIL", p.Mail(ctx, c, "x@foreign.test"), "530 5.7.0")
		want(t, "unauthenticated null MAIL", p.Mail(ctx, c, ""), "530 5.7.0")
		want(t, "unauthenticated RCPT", p.Rcpt(ctx, c, "x@foreign.test", "user@foreign.test"), "530 5.7.0")
		want(t, "unauthenticated RCPT to the relay itself", p.Rcpt(ctx, c, "", "postmaster@relay.test"), "530 5.7.0")
		a := authed("alice")
		want(t, "authenticated MAIL", p.Mail(ctx, a, "alice@a.test"), "ok")
		want(t, "authenticated RCPT", p.Rcpt(ctx, a, "alice@a.test", "user@foreign.test"), "ok")
	}
}

func TestClosedRelay_InProcessCallerIsNotTrusted(t *testing.T) {
	// A zero Client (no address, not authenticated) gets no free pass.
	p := NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"relay.test"}})
	want(t, "zero client foreign RCPT", p.Rcpt(ctx, &Client{}, "", "user@foreign.test"), "554 5.7.1")
}

func TestParseMailbox(t *testing.T) {
	for _, c := range []struct {
		in            string
		local, domain string
		plain, ok     bool
	}{
		{"a@b.test", "a", "b.test", true, true},
		{"A.B@B.Test.", "A.B", "b.test", true, true},
		{`"a b"@b.test`, "a b", "b.test", false, true},
		{`"a\"b"@b.test`, `a"b`, "b.test", false, true},
		{"a@b@c.test", "a@b", "c.test", false, true},
		{"a%b@c.test", "a%b", "c.test", false, true},
		{"a@[1.2.3.4]", "", "", false, false},
		{"@a:b@c.test", "", "", false, false},
		{"a@", "", "", false, false},
		{`"a"x@b.test`, "", "", false, false},
		{`"a@b.test"@c.test@d.test`, "", "", false, false},
	} {
		mb, ok := parseMailbox(c.in)
		if ok != c.ok || ok && (mb.local != c.local || mb.domain != c.domain || mb.plain != c.plain) {
			t.Errorf("parseMailbox(%q) = %+v, %v; want %q %q plain=%v ok=%v", c.in, mb, ok, c.local, c.domain, c.plain, c.ok)
		}
	}
}
