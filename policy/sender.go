package policy

import (
	"context"
	"io"
	"mime"
	"net/mail"
	"slices"
	"strings"
)

// SendersConfig configures Senders. The zero value checks envelope and
// header senders and refuses the null sender to restricted clients.
type SendersConfig struct {
	// AllowNullSender lets clients with sender restrictions use the null
	// reverse-path (MAIL FROM:<>). Off by default: an application's
	// credentials have no business sending bounces, and a message with a
	// null sender cannot be traced back to anyone who owns a domain.
	AllowNullSender bool
	// SkipHeaderFrom turns off the check of the From header at end of
	// DATA, leaving only the envelope sender checked.
	SkipHeaderFrom bool
}

// Senders restricts authenticated clients to their own senders: the
// envelope sender (MAIL FROM) and every address in the message's From
// header must be one of Client.SenderAddrs or have a domain in
// Client.SenderDomains (an entry with a leading "." or "*." also covers
// subdomains). A client without restrictions (both lists empty) may use
// any sender.
//
// The null sender: unrestricted clients may use it (an internal mail
// server relays its bounces through baton); restricted clients may not,
// unless AllowNullSender. Unauthenticated clients are not checked here:
// whether they may send at all is ClosedRelay's decision.
//
// Replies: 553 5.7.1 "Sender address not allowed for this account" at MAIL,
// 553 5.7.1 "From header address not allowed for this account" and 554
// 5.6.0 "Malformed From header" at DATA. A message without a From header
// passes (it is not this policy's job to repair messages). Safe for
// concurrent use.
type Senders struct {
	Base
	cfg SendersConfig
}

// NewSenders returns a Senders policy; cfg may be nil.
func NewSenders(cfg *SendersConfig) *Senders {
	s := &Senders{}
	if cfg != nil {
		s.cfg = *cfg
	}
	return s
}

var (
	errSenderNotAllowed = Reject(553, [3]int{5, 7, 1}, "Sender address not allowed for this account")
	errFromNotAllowed   = Reject(553, [3]int{5, 7, 1}, "From header address not allowed for this account")
	errFromMalformed    = Reject(554, [3]int{5, 6, 0}, "Malformed From header")
)

func restricted(c *Client) bool {
	return c.Authenticated && (len(c.SenderDomains) > 0 || len(c.SenderAddrs) > 0)
}

// Mail checks the envelope sender.
func (s *Senders) Mail(ctx context.Context, c *Client, from string) error {
	if !restricted(c) {
		return nil
	}
	if from == "" {
		if s.cfg.AllowNullSender {
			return nil
		}
		return errSenderNotAllowed
	}
	if !SenderAllowed(c, from) {
		return errSenderNotAllowed
	}
	return nil
}

// Data checks the From header.
func (s *Senders) Data(ctx context.Context, c *Client, m *Message) error {
	if s.cfg.SkipHeaderFrom || !restricted(c) {
		return nil
	}
	fields := m.Header.Values("From")
	if len(fields) == 0 {
		return nil
	}
	p := mail.AddressParser{WordDecoder: &mime.WordDecoder{CharsetReader: passCharset}}
	for _, f := range fields {
		list, err := p.ParseList(f)
		if err != nil || len(list) == 0 {
			return errFromMalformed
		}
		for _, a := range list {
			if !SenderAllowed(c, a.Address) {
				return errFromNotAllowed
			}
		}
	}
	return nil
}

// passCharset lets display names in any charset through undecoded: only
// the addr-spec matters here.
func passCharset(charset string, r io.Reader) (io.Reader, error) { return r, nil }

// SenderAllowed reports whether c may use addr as a sender: c has no
// sender restrictions, or addr is one of c.SenderAddrs (compared
// case-insensitively), or its domain is in c.SenderDomains.
func SenderAllowed(c *Client, addr string) bool {
	if len(c.SenderDomains) == 0 && len(c.SenderAddrs) == 0 {
		return true
	}
	mb, ok := parseMailbox(addr)
	if !ok {
		return false
	}
	if slices.ContainsFunc(c.SenderAddrs, func(a string) bool {
		amb, ok := parseMailbox(a)
		return ok && amb.domain == mb.domain && strings.EqualFold(amb.local, mb.local)
	}) {
		return true
	}
	// Built per call: sender lists are short, and the Client may change
	// between calls (a reloaded identity).
	return newDomainSet(c.SenderDomains).has(mb.domain)
}

// SendScope refuses, at MAIL, authenticated clients whose API key lacks
// the right to send: a client with Scopes (nil Scopes means no
// restriction) needs "send", or "send:sandbox" when its Sandbox is set.
// Reply: 550 5.7.1 "Not authorized to send mail". Safe for concurrent use.
type SendScope struct{ Base }

var errNoScope = Reject(550, [3]int{5, 7, 1}, "Not authorized to send mail")

// Mail checks the scopes.
func (SendScope) Mail(ctx context.Context, c *Client, from string) error {
	if !c.Authenticated || c.Scopes == nil {
		return nil
	}
	if slices.Contains(c.Scopes, "send") || c.Sandbox && slices.Contains(c.Scopes, "send:sandbox") {
		return nil
	}
	return errNoScope
}
