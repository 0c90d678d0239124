package policy

import (
	"context"
	"log/slog"
	"math"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// RateLimitConfig configures RateLimit. Zero fields of a Rate are
// unlimited.
type RateLimitConfig struct {
	// PerIP limits every client address (authenticated or not; in-process
	// submissions without an address are exempt).
	PerIP Rate
	// PerIdentity limits each authenticated identity whose own
	// Client.Rate is zero; a non-zero Client.Rate replaces it.
	PerIdentity Rate
	// IPv6Prefix groups IPv6 clients for PerIP: 0 means 64 (one
	// customer's subnet), 128 limits each address alone.
	IPv6Prefix int
	// MaxEntries bounds the identities and addresses remembered; 0 means
	// 100000. Entries idle for a full window are forgotten first (they
	// hold a full allowance again, so nothing is lost); past the bound the
	// least recently used are dropped even if not idle.
	MaxEntries int
	// Logger receives refusals at debug level; nil discards.
	Logger *slog.Logger
	// Now returns the current time; nil means time.Now. Tests inject a
	// clock.
	Now func() time.Time
}

// RateLimit limits messages (counted at MAIL) and recipients (counted at
// RCPT) over a window, per client address and per identity, with token
// buckets from golang.org/x/time/rate: a limit of N per window allows a
// burst of N and then refills steadily at N per window.
//
// A refused command is not counted. The reply is 450 4.7.1 "Rate limit
// exceeded, try again in 30s" with the time until the allowance suffices.
// RateLimit is safe for concurrent use and its memory is bounded by
// MaxEntries.
type RateLimit struct {
	Base
	cfg RateLimitConfig
	log *slog.Logger

	mu  sync.Mutex
	tab *table[rateKey, *rateEntry]
}

type rateKey struct {
	identity string
	addr     netip.Prefix
}

type rateEntry struct {
	r     Rate
	msgs  *rate.Limiter // nil when unlimited
	rcpts *rate.Limiter
}

// NewRateLimit returns a RateLimit; cfg may be nil (no limits except each
// client's own Client.Rate).
func NewRateLimit(cfg *RateLimitConfig) *RateLimit {
	var c RateLimitConfig
	if cfg != nil {
		c = *cfg
	}
	if c.IPv6Prefix <= 0 || c.IPv6Prefix > 128 {
		c.IPv6Prefix = 64
	}
	if c.MaxEntries <= 0 {
		c.MaxEntries = 100000
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return &RateLimit{cfg: c, log: c.Logger, tab: newTable[rateKey, *rateEntry]()}
}

// Mail counts one message.
func (l *RateLimit) Mail(ctx context.Context, c *Client, from string) error {
	return l.take(c, false)
}

// Rcpt counts one recipient.
func (l *RateLimit) Rcpt(ctx context.Context, c *Client, from, to string) error {
	return l.take(c, true)
}

// Len returns the number of identities and addresses remembered.
func (l *RateLimit) Len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.tab.len()
}

func (l *RateLimit) take(c *Client, rcpt bool) error {
	type use struct {
		key rateKey
		r   Rate
	}
	var uses [2]use
	n := 0
	if c.Addr.IsValid() && active(l.cfg.PerIP, rcpt) {
		uses[n] = use{rateKey{addr: addrKey(c.Addr, l.cfg.IPv6Prefix)}, l.cfg.PerIP}
		n++
	}
	if c.Authenticated && c.Identity != "" {
		r := c.Rate
		if r == (Rate{}) {
			r = l.cfg.PerIdentity
		}
		if active(r, rcpt) {
			uses[n] = use{rateKey{identity: c.Identity}, r}
			n++
		}
	}
	if n == 0 {
		return nil
	}
	now := l.cfg.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.tab.sweep(2, func(e *tentry[rateKey, *rateEntry]) bool { return now.Sub(e.last) >= e.val.r.Per })
	var lims [2]*rate.Limiter
	var wait time.Duration
	for i := range n {
		e := l.tab.touch(uses[i].key, now, func() *rateEntry { return &rateEntry{} })
		e.val.update(uses[i].r, now)
		lim := e.val.msgs
		if rcpt {
			lim = e.val.rcpts
		}
		lims[i] = lim
		if tok := lim.TokensAt(now); tok < 1 {
			// Whole milliseconds, so float noise cannot turn 20s into 21s.
			ms := math.Ceil(math.Round((1-tok)/float64(lim.Limit())*1e6) / 1e3)
			wait = max(wait, time.Duration(ms)*time.Millisecond)
		}
	}
	if dropped := l.tab.trim(l.cfg.MaxEntries); dropped > 0 {
		l.log.Warn("policy: rate limit table full, forgetting active entries", "dropped", dropped, "max", l.cfg.MaxEntries)
	}
	if wait > 0 {
		what := "messages"
		if rcpt {
			what = "recipients"
		}
		l.log.Debug("policy: rate limited", "addr", c.Addr, "identity", c.Identity, "what", what, "retry", wait)
		return rateRefusal(wait)
	}
	for i := range n {
		lims[i].AllowN(now, 1)
	}
	return nil
}

func active(r Rate, rcpt bool) bool {
	if r.Per <= 0 {
		return false
	}
	if rcpt {
		return r.Recipients > 0
	}
	return r.Messages > 0
}

// update makes e's limiters follow r (new entries, or an identity whose
// limit changed since it was last seen).
func (e *rateEntry) update(r Rate, now time.Time) {
	if e.r == r && (e.msgs != nil || e.rcpts != nil) {
		return
	}
	e.msgs = retune(e.msgs, r.Messages, r.Per, now)
	e.rcpts = retune(e.rcpts, r.Recipients, r.Per, now)
	e.r = r
}

// retune returns a limiter for n per per. A changed limit starts with the
// same fraction of its burst as the old limiter had left, so raising a
// limit helps at once and lowering it grants no fresh burst.
func retune(lim *rate.Limiter, n int, per time.Duration, now time.Time) *rate.Limiter {
	if n <= 0 || per <= 0 {
		return nil // unused: callers only reach for active limits
	}
	nl := rate.NewLimiter(rate.Limit(float64(n)/per.Seconds()), n)
	if lim != nil && lim.Burst() > 0 {
		frac := min(max(lim.TokensAt(now)/float64(lim.Burst()), 0), 1)
		if used := n - int(math.Floor(frac*float64(n))); used > 0 {
			nl.AllowN(now, used)
		}
	}
	return nl
}

// rateRefusal builds the 450 4.7.1 reply with a retry hint rounded up to
// whole seconds.
func rateRefusal(wait time.Duration) error {
	wait = (wait + time.Second - 1).Truncate(time.Second)
	return Reject(450, [3]int{4, 7, 1}, "Rate limit exceeded, try again in "+wait.String())
}
