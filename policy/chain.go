package policy

import (
	"context"
)

// Base allows everything. Embed it in a policy that only cares about some
// stages and override those methods.
type Base struct{}

var _ Policy = Base{}

// Connect allows the connection.
func (Base) Connect(ctx context.Context, c *Client) error { return nil }

// Auth leaves the server's reply alone.
func (Base) Auth(ctx context.Context, c *Client, username string, ok bool) error { return nil }

// Mail allows the sender.
func (Base) Mail(ctx context.Context, c *Client, from string) error { return nil }

// Rcpt allows the recipient.
func (Base) Rcpt(ctx context.Context, c *Client, from, to string) error { return nil }

// Data allows the message.
func (Base) Data(ctx context.Context, c *Client, m *Message) error { return nil }

// Funcs adapts functions to Policy: each hook calls the function of the
// same stage, and a nil function allows.
type Funcs struct {
	// OnConnect, OnAuth, OnMail, OnRcpt and OnData implement the hooks of
	// the same names.
	OnConnect func(ctx context.Context, c *Client) error
	OnAuth    func(ctx context.Context, c *Client, username string, ok bool) error
	OnMail    func(ctx context.Context, c *Client, from string) error
	OnRcpt    func(ctx context.Context, c *Client, from, to string) error
	OnData    func(ctx context.Context, c *Client, m *Message) error
}

var _ Policy = Funcs{}

// Connect calls f.OnConnect.
func (f Funcs) Connect(ctx context.Context, c *Client) error {
	if f.OnConnect == nil {
		return nil
	}
	return f.OnConnect(ctx, c)
}

// Auth calls f.OnAuth.
func (f Funcs) Auth(ctx context.Context, c *Client, username string, ok bool) error {
	if f.OnAuth == nil {
		return nil
	}
	return f.OnAuth(ctx, c, username, ok)
}

// Mail calls f.OnMail.
func (f Funcs) Mail(ctx context.Context, c *Client, from string) error {
	if f.OnMail == nil {
		return nil
	}
	return f.OnMail(ctx, c, from)
}

// Rcpt calls f.OnRcpt.
func (f Funcs) Rcpt(ctx context.Context, c *Client, from, to string) error {
	if f.OnRcpt == nil {
		return nil
	}
	return f.OnRcpt(ctx, c, from, to)
}

// Data calls f.OnData.
func (f Funcs) Data(ctx context.Context, c *Client, m *Message) error {
	if f.OnData == nil {
		return nil
	}
	return f.OnData(ctx, c, m)
}

// Chain runs several policies in order at each stage; the first refusal
// wins and the policies after it are not asked. Put cheap, decisive checks
// (connection limits, closed relay) before the ones that count (rate
// limits), so refused commands do not use up a client's allowance.
//
// Chain passes Disconnect to every member that implements Closer and
// answers MaxMessageSize with the smallest limit of its SizeLimiter
// members. Nil members are skipped. A Chain is safe for concurrent use
// when its members are.
type Chain []Policy

var (
	_ Policy      = Chain(nil)
	_ Closer      = Chain(nil)
	_ SizeLimiter = Chain(nil)
)

// Connect runs each member's Connect.
func (ch Chain) Connect(ctx context.Context, c *Client) error {
	if c.state == nil {
		c.state = make(map[any]int)
	}
	for _, p := range ch {
		if p == nil {
			continue
		}
		if err := p.Connect(ctx, c); err != nil {
			return err
		}
	}
	return nil
}

// Auth runs each member's Auth.
func (ch Chain) Auth(ctx context.Context, c *Client, username string, ok bool) error {
	for _, p := range ch {
		if p == nil {
			continue
		}
		if err := p.Auth(ctx, c, username, ok); err != nil {
			return err
		}
	}
	return nil
}

// Mail runs each member's Mail.
func (ch Chain) Mail(ctx context.Context, c *Client, from string) error {
	for _, p := range ch {
		if p == nil {
			continue
		}
		if err := p.Mail(ctx, c, from); err != nil {
			return err
		}
	}
	return nil
}

// Rcpt runs each member's Rcpt.
func (ch Chain) Rcpt(ctx context.Context, c *Client, from, to string) error {
	for _, p := range ch {
		if p == nil {
			continue
		}
		if err := p.Rcpt(ctx, c, from, to); err != nil {
			return err
		}
	}
	return nil
}

// Data runs each member's Data.
func (ch Chain) Data(ctx context.Context, c *Client, m *Message) error {
	for _, p := range ch {
		if p == nil {
			continue
		}
		if err := p.Data(ctx, c, m); err != nil {
			return err
		}
	}
	return nil
}

// Disconnect calls Disconnect on every member that implements Closer.
func (ch Chain) Disconnect(ctx context.Context, c *Client) {
	for _, p := range ch {
		if cl, ok := p.(Closer); ok && p != nil {
			cl.Disconnect(ctx, c)
		}
	}
}

// MaxMessageSize returns the smallest non-zero limit of the members that
// implement SizeLimiter, or 0.
func (ch Chain) MaxMessageSize(c *Client) int64 {
	var limit int64
	for _, p := range ch {
		if sl, ok := p.(SizeLimiter); ok && p != nil {
			if n := sl.MaxMessageSize(c); n > 0 && (limit == 0 || n < limit) {
				limit = n
			}
		}
	}
	return limit
}
