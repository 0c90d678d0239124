package policy

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/emersion/go-message/textproto"
)

func TestReject_ClassFollowsCode(t *testing.T) {
	for _, c := range []struct {
		code int
		enh  [3]int
		want string
	}{
		{450, [3]int{5, 7, 1}, "450 4.7.1"},
		{554, [3]int{4, 7, 1}, "554 5.7.1"},
		{421, [3]int{4, 7, 0}, "421 4.7.0"},
	} {
		want(t, fmt.Sprint(c), Reject(c.code, c.enh, "x"), c.want)
	}
}

func TestChain_FirstRefusalWins(t *testing.T) {
	var calls []string
	rec := func(name string, refuse bool) Policy {
		hook := func(stage string) error {
			calls = append(calls, name+"."+stage)
			if refuse {
				return Reject(550, [3]int{5, 7, 1}, name)
			}
			return nil
		}
		return Funcs{
			OnConnect: func(context.Context, *Client) error { return hook("connect") },
			OnAuth:    func(context.Context, *Client, string, bool) error { return hook("auth") },
			OnMail:    func(context.Context, *Client, string) error { return hook("mail") },
			OnRcpt:    func(context.Context, *Client, string, string) error { return hook("rcpt") },
			OnData:    func(context.Context, *Client, *Message) error { return hook("data") },
		}
	}
	ch := Chain{rec("a", false), nil, rec("b", true), rec("c", false)}
	c := authed("x")
	for stage, err := range map[string]error{
		"connect": ch.Connect(ctx, c),
		"auth":    ch.Auth(ctx, c, "x", true),
		"mail":    ch.Mail(ctx, c, ""),
		"rcpt":    ch.Rcpt(ctx, c, "", "y@z.test"),
		"data":    ch.Data(ctx, c, &Message{}),
	} {
		want(t, stage, err, "550 5.7.1")
	}
	for _, call := range calls {
		if call[0] == 'c' {
			t.Fatalf("policy after the refusal was called: %v", calls)
		}
	}
	if len(calls) != 10 {
		t.Fatalf("calls = %v", calls)
	}
	// Base and empty Funcs allow everything.
	for _, p := range []Policy{Base{}, Funcs{}, Chain{}} {
		want(t, fmt.Sprintf("%T connect", p), p.Connect(ctx, c), "ok")
		want(t, fmt.Sprintf("%T auth", p), p.Auth(ctx, c, "", false), "ok")
		want(t, fmt.Sprintf("%T mail", p), p.Mail(ctx, c, ""), "ok")
		want(t, fmt.Sprintf("%T rcpt", p), p.Rcpt(ctx, c, "", ""), "ok")
		want(t, fmt.Sprintf("%T data", p), p.Data(ctx, c, &Message{}), "ok")
	}
	// A non-SMTP error passes through as it is (the server answers 451).
	boom := errors.New("boom")
	if err := (Chain{Funcs{OnMail: func(context.Context, *Client, string) error { return boom }}}).Mail(ctx, c, ""); err != boom {
		t.Fatalf("err = %v", err)
	}
}

func TestChain_MaxMessageSize(t *testing.T) {
	c := authed("x")
	ch := Chain{NewLimits(&LimitsConfig{MaxSize: 5000}), Base{}, NewLimits(&LimitsConfig{MaxSize: 3000}), NewLimits(nil)}
	if got := ch.MaxMessageSize(c); got != 3000 {
		t.Fatalf("MaxMessageSize = %d, want 3000", got)
	}
	if got := (Chain{Base{}}).MaxMessageSize(c); got != 0 {
		t.Fatalf("no limiters: %d", got)
	}
}

// TestChain_Session walks the usual chain through two sessions as the
// server would call it.
func TestChain_Session(t *testing.T) {
	clk := newClock()
	ch := Chain{
		NewAuthThrottle(&AuthThrottleConfig{Now: clk.Now, Sleep: clk.Sleep}),
		NewConnLimit(&ConnLimitConfig{PerIP: 10}),
		NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"relay.test"}}),
		SendScope{},
		NewSenders(nil),
		NewLimits(&LimitsConfig{MaxRecipients: 3, MaxSize: 10 << 20}),
		NewRateLimit(&RateLimitConfig{PerIdentity: Rate{Messages: 100, Recipients: 4, Per: time.Hour}, Now: clk.Now}),
	}
	// An unauthenticated client: local mail only.
	c := unauth("198.51.100.20")
	want(t, "connect", ch.Connect(ctx, c), "ok")
	want(t, "mail", ch.Mail(ctx, c, "someone@elsewhere.test"), "ok")
	want(t, "local rcpt", ch.Rcpt(ctx, c, "someone@elsewhere.test", "postmaster@relay.test"), "ok")
	want(t, "foreign rcpt", ch.Rcpt(ctx, c, "someone@elsewhere.test", "victim@foreign.test"), "554 5.7.1")
	ch.Disconnect(ctx, c)

	// An authenticated, restricted API key.
	a := unauth("198.51.100.21")
	want(t, "connect", ch.Connect(ctx, a), "ok")
	want(t, "auth fail", ch.Auth(ctx, a, "apikey", false), "ok")
	a.Authenticated, a.Identity, a.SenderDomains, a.Scopes = true, "apikey:app", []string{"app.test"}, []string{"send"}
	want(t, "auth ok", ch.Auth(ctx, a, "apikey", true), "ok")
	want(t, "foreign sender", ch.Mail(ctx, a, "x@bank.test"), "553 5.7.1")
	want(t, "mail", ch.Mail(ctx, a, "news@app.test"), "ok")
	want(t, "rcpt 1", ch.Rcpt(ctx, a, "news@app.test", "1@foreign.test"), "ok")
	want(t, "rcpt 2", ch.Rcpt(ctx, a, "news@app.test", "2@foreign.test"), "ok")
	want(t, "rcpt 3", ch.Rcpt(ctx, a, "news@app.test", "3@foreign.test"), "ok")
	want(t, "rcpt 4", ch.Rcpt(ctx, a, "news@app.test", "4@foreign.test"), "452 4.5.3")
	var h textproto.Header
	h.Add("From", "News <news@app.test>")
	want(t, "data", ch.Data(ctx, a, &Message{From: "news@app.test", To: []string{"1@foreign.test", "2@foreign.test", "3@foreign.test"}, Size: 1000, Header: h}), "ok")
	want(t, "mail 2", ch.Mail(ctx, a, "news@app.test"), "ok")
	want(t, "rcpt 5 (rate)", ch.Rcpt(ctx, a, "news@app.test", "5@foreign.test"), "ok")
	want(t, "rcpt 6 (rate)", ch.Rcpt(ctx, a, "news@app.test", "6@foreign.test"), "450 4.7.1")
	ch.Disconnect(ctx, a)
}
