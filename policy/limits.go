package policy

import (
	"context"
)

// LimitsConfig configures Limits; zero fields are unlimited.
type LimitsConfig struct {
	// MaxRecipients caps the recipients of one message.
	MaxRecipients int
	// MaxSize caps the size of one message in bytes. A client's own
	// Client.MaxSize applies when it is smaller.
	MaxSize int64
}

// Limits caps recipients per message and message size.
//
// Rcpt counts the recipients of the current transaction (Mail starts a
// new one) and answers 452 4.5.3 "Too many recipients" past the limit, as
// RFC 5321 section 4.5.3.1.10 asks: the client sends the rest in another
// transaction. Data answers 552 5.3.4 "Message size exceeds fixed maximum
// message size" for a Message.Size (the size known in advance, such as the
// SIZE the client declared) over the smaller of MaxSize and the client's
// MaxSize; the server enforces the same limit on the bytes it actually
// reads, through MaxMessageSize.
// A recipient refused by a policy after Limits in a Chain has been counted
// already, so list Limits after the checks that refuse recipients outright
// (ClosedRelay) and before RateLimit, whose refusals are temporary anyway.
// Limits is safe for concurrent use.
type Limits struct {
	Base
	cfg LimitsConfig
}

var (
	_ Policy      = (*Limits)(nil)
	_ SizeLimiter = (*Limits)(nil)
)

// NewLimits returns a Limits policy; cfg may be nil (no limits except
// each client's MaxSize).
func NewLimits(cfg *LimitsConfig) *Limits {
	l := &Limits{}
	if cfg != nil {
		l.cfg = *cfg
	}
	return l
}

var (
	errTooManyRcpts = Reject(452, [3]int{4, 5, 3}, "Too many recipients")
	errTooBig       = Reject(552, [3]int{5, 3, 4}, "Message size exceeds fixed maximum message size")
)

// Mail starts counting recipients afresh.
func (l *Limits) Mail(ctx context.Context, c *Client, from string) error {
	c.set(l, 0)
	return nil
}

// Rcpt counts the recipient and refuses it past MaxRecipients.
func (l *Limits) Rcpt(ctx context.Context, c *Client, from, to string) error {
	if l.cfg.MaxRecipients <= 0 {
		return nil
	}
	if c.get(l) >= l.cfg.MaxRecipients {
		return errTooManyRcpts
	}
	c.add(l, 1)
	return nil
}

// Data checks the size, and the recipient count for callers that did not
// go through Rcpt.
func (l *Limits) Data(ctx context.Context, c *Client, m *Message) error {
	if max := l.MaxMessageSize(c); max > 0 && m.Size > max {
		return errTooBig
	}
	if l.cfg.MaxRecipients > 0 && len(m.To) > l.cfg.MaxRecipients {
		return errTooManyRcpts
	}
	return nil
}

// MaxMessageSize returns the size limit that applies to c, 0 for none.
func (l *Limits) MaxMessageSize(c *Client) int64 {
	max := l.cfg.MaxSize
	if c != nil && c.MaxSize > 0 && (max <= 0 || c.MaxSize < max) {
		max = c.MaxSize
	}
	if max < 0 {
		return 0
	}
	return max
}
