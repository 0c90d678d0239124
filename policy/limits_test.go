package policy

import (
	"testing"
)

func TestLimits_RecipientsPerMessage(t *testing.T) {
	p := NewLimits(&LimitsConfig{MaxRecipients: 2})
	c := authed("alice")
	for round := range 2 { // a new MAIL starts counting again
		want(t, "MAIL", p.Mail(ctx, c, "alice@a.test"), "ok")
		want(t, "RCPT 1", p.Rcpt(ctx, c, "alice@a.test", "1@b.test"), "ok")
		want(t, "RCPT 2", p.Rcpt(ctx, c, "alice@a.test", "2@b.test"), "ok")
		want(t, "RCPT 3", p.Rcpt(ctx, c, "alice@a.test", "3@b.test"), "452 4.5.3")
		want(t, "RCPT 4", p.Rcpt(ctx, c, "alice@a.test", "4@b.test"), "452 4.5.3")
		_ = round
	}
	// Counting is per connection.
	other := authed("bob")
	want(t, "other MAIL", p.Mail(ctx, other, "bob@a.test"), "ok")
	want(t, "other RCPT", p.Rcpt(ctx, other, "bob@a.test", "1@b.test"), "ok")
	// Two Limits policies on one client count separately.
	q := NewLimits(&LimitsConfig{MaxRecipients: 1})
	want(t, "q MAIL", q.Mail(ctx, other, "bob@a.test"), "ok")
	want(t, "q RCPT 1", q.Rcpt(ctx, other, "bob@a.test", "1@b.test"), "ok")
	want(t, "p RCPT 2", p.Rcpt(ctx, other, "bob@a.test", "2@b.test"), "ok")
	want(t, "q RCPT 2", q.Rcpt(ctx, other, "bob@a.test", "2@b.test"), "452 4.5.3")
	// Data catches callers that skipped Rcpt.
	want(t, "Data with 3 recipients", p.Data(ctx, c, &Message{To: []string{"a@b.test", "c@b.test", "d@b.test"}}), "452 4.5.3")
	want(t, "unlimited", NewLimits(nil).Rcpt(ctx, c, "", "x@b.test"), "ok")
}

func TestLimits_Size(t *testing.T) {
	p := NewLimits(&LimitsConfig{MaxSize: 1000})
	c := authed("alice")
	small := authed("small")
	small.MaxSize = 500
	big := authed("big")
	big.MaxSize = 5000 // cannot raise the server limit
	for _, tc := range []struct {
		c      *Client
		size   int64
		result string
		limit  int64
	}{
		{c, 1000, "ok", 1000},
		{c, 1001, "552 5.3.4", 1000},
		{small, 500, "ok", 500},
		{small, 501, "552 5.3.4", 500},
		{big, 1001, "552 5.3.4", 1000},
	} {
		want(t, "size", p.Data(ctx, tc.c, &Message{Size: tc.size, To: []string{"x@b.test"}}), tc.result)
		if got := p.MaxMessageSize(tc.c); got != tc.limit {
			t.Errorf("MaxMessageSize(%s) = %d, want %d", tc.c.Identity, got, tc.limit)
		}
	}
	unl := NewLimits(nil)
	want(t, "no server limit, client limit", unl.Data(ctx, small, &Message{Size: 501}), "552 5.3.4")
	if got := unl.MaxMessageSize(c); got != 0 {
		t.Errorf("unlimited MaxMessageSize = %d", got)
	}
}
