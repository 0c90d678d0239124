package policy

import (
	"testing"

	"github.com/emersion/go-message/textproto"
)

func TestSenders_EnvelopeSender(t *testing.T) {
	restrictedClient := &Client{Authenticated: true, Identity: "alice", SenderDomains: []string{"a.test", "*.sub.a.test"}, SenderAddrs: []string{"Boss@B.test"}}
	free := authed("root")
	anon := unauth("198.51.100.1")
	strict := NewSenders(nil)
	lenient := NewSenders(&SendersConfig{AllowNullSender: true})
	for _, c := range []struct {
		p      *Senders
		c      *Client
		from   string
		result string
	}{
		{strict, restrictedClient, "alice@a.test", "ok"},
		{strict, restrictedClient, "ALICE@A.TEST.", "ok"},
		{strict, restrictedClient, "x@deep.sub.a.test", "ok"},
		{strict, restrictedClient, "boss@b.test", "ok"},
		{strict, restrictedClient, "other@b.test", "553 5.7.1"},
		{strict, restrictedClient, "x@sub.a.test", "553 5.7.1"}, // "*." covers subdomains only
		{strict, restrictedClient, "x@a.test.evil.test", "553 5.7.1"},
		{strict, restrictedClient, "x@evila.test", "553 5.7.1"},
		{strict, restrictedClient, "x@a.test@evil.test", "553 5.7.1"},
		{strict, restrictedClient, "alice%evil.test@a.test", "ok"}, // the domain is a.test: the address is the client's own
		{strict, restrictedClient, "x@[192.0.2.1]", "553 5.7.1"},
		{strict, restrictedClient, "nodomain", "553 5.7.1"},
		{strict, restrictedClient, "", "553 5.7.1"}, // null sender refused to restricted clients
		{lenient, restrictedClient, "", "ok"},
		{strict, free, "", "ok"}, // unrestricted clients may send bounces
		{strict, free, "anyone@anywhere.test", "ok"},
		{strict, anon, "anyone@anywhere.test", "ok"}, // ClosedRelay's business
	} {
		want(t, c.c.Identity+" MAIL FROM:<"+c.from+">", c.p.Mail(ctx, c.c, c.from), c.result)
	}
}

func TestSenders_HeaderFrom(t *testing.T) {
	c := &Client{Authenticated: true, Identity: "alice", SenderDomains: []string{"a.test"}}
	p := NewSenders(nil)
	msg := func(from ...string) *Message {
		var h textproto.Header
		for _, f := range from {
			h.Add("From", f)
		}
		h.Add("Subject", "hi")
		return &Message{From: "alice@a.test", To: []string{"x@b.test"}, Header: h}
	}
	for _, tc := range []struct {
		from   []string
		result string
	}{
		{[]string{"alice@a.test"}, "ok"},
		{[]string{"Alice <alice@A.test>"}, "ok"},
		{[]string{`"CEO <ceo@bank.test>" <alice@a.test>`}, "ok"}, // display name tricks do not matter
		{[]string{"=?utf-8?q?J=C3=BCrgen?= <j@a.test>"}, "ok"},
		{[]string{"=?x-unknown?q?abc?= <j@a.test>"}, "ok"},
		{[]string{"alice@a.test, bob@a.test"}, "ok"},
		{nil, "ok"}, // no From: not ours to repair
		{[]string{"ceo@bank.test"}, "553 5.7.1"},
		{[]string{"Alice <alice@a.test>, ceo@bank.test"}, "553 5.7.1"},
		{[]string{"alice@a.test", "ceo@bank.test"}, "553 5.7.1"}, // a second From header
		{[]string{"Alice <alice@a.test.bank.test>"}, "553 5.7.1"},
		{[]string{"not an address"}, "554 5.6.0"},
		{[]string{""}, "554 5.6.0"},
	} {
		want(t, "From: "+join(tc.from), p.Data(ctx, c, msg(tc.from...)), tc.result)
	}
	want(t, "SkipHeaderFrom", NewSenders(&SendersConfig{SkipHeaderFrom: true}).Data(ctx, c, msg("ceo@bank.test")), "ok")
	want(t, "unrestricted client", p.Data(ctx, authed("root"), msg("ceo@bank.test")), "ok")
}

func join(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += " | "
		}
		out += x
	}
	return out
}

func TestSendScope(t *testing.T) {
	var p SendScope
	for _, c := range []struct {
		scopes  []string
		sandbox bool
		result  string
	}{
		{nil, false, "ok"}, // password identities have no scopes
		{[]string{"send"}, false, "ok"},
		{[]string{"send:sandbox"}, true, "ok"},
		{[]string{"send:sandbox"}, false, "550 5.7.1"}, // a sandbox key whose mail would be delivered
		{[]string{"stats"}, false, "550 5.7.1"},
		{[]string{}, false, "550 5.7.1"},
	} {
		cl := authed("apikey:x")
		cl.Scopes, cl.Sandbox = c.scopes, c.sandbox
		want(t, "scopes", p.Mail(ctx, cl, "x@a.test"), c.result)
	}
	want(t, "unauthenticated", p.Mail(ctx, unauth("192.0.2.1"), "x@a.test"), "ok")
}
