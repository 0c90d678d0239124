package policy

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"time"
)

// AuthThrottleConfig configures AuthThrottle; zero fields take the
// defaults given.
type AuthThrottleConfig struct {
	// Delay is the pause after the first failure from an address; it
	// doubles with each further failure up to MaxDelay. Defaults 1s and
	// 8s.
	Delay    time.Duration
	MaxDelay time.Duration
	// MaxPerConn failures on one connection end it with 421; default 3.
	MaxPerConn int
	// BlockAfter failures from one address, each less than Window after
	// the one before, block the address for BlockFor. Defaults 10, 15
	// minutes and 15 minutes.
	BlockAfter int
	Window     time.Duration
	BlockFor   time.Duration
	// IPv6Prefix groups IPv6 clients: 0 means 64.
	IPv6Prefix int
	// MaxEntries bounds the addresses remembered; 0 means 100000.
	MaxEntries int
	// Logger receives every failure, with the client address, at warn
	// level; nil discards.
	Logger *slog.Logger
	// Now and Sleep are the clock; nil means the real one. Sleep must
	// return ctx.Err() early when ctx is done.
	Now   func() time.Time
	Sleep func(ctx context.Context, d time.Duration) error
}

// AuthThrottle slows down and then stops password guessing.
//
// After each failed AUTH it pauses before the server answers: Delay,
// doubling with each failure from the same address, up to MaxDelay. The
// MaxPerConn-th failure on one connection is answered 421 4.7.0 "Too many
// authentication failures" and the server closes the connection. The
// BlockAfter-th failure from an address blocks it for BlockFor: Connect
// refuses it with 421 4.7.0, and any AUTH from it (even a correct one, as
// a block means "stop trying") is answered 421. Failure counts fade when
// an address has had no failure for Window. Every failure is logged with
// the client address and user name.
//
// Memory is bounded by MaxEntries; entries with nothing left to remember
// go first. Safe for concurrent use.
type AuthThrottle struct {
	Base
	cfg AuthThrottleConfig
	log *slog.Logger

	mu  sync.Mutex
	tab *table[netip.Prefix, *throttleEntry]
}

type throttleEntry struct {
	failures     int
	blockedUntil time.Time
}

// NewAuthThrottle returns an AuthThrottle; cfg may be nil.
func NewAuthThrottle(cfg *AuthThrottleConfig) *AuthThrottle {
	var c AuthThrottleConfig
	if cfg != nil {
		c = *cfg
	}
	if c.Delay <= 0 {
		c.Delay = time.Second
	}
	if c.MaxDelay <= 0 {
		c.MaxDelay = 8 * time.Second
	}
	if c.MaxPerConn <= 0 {
		c.MaxPerConn = 3
	}
	if c.BlockAfter <= 0 {
		c.BlockAfter = 10
	}
	if c.Window <= 0 {
		c.Window = 15 * time.Minute
	}
	if c.BlockFor <= 0 {
		c.BlockFor = 15 * time.Minute
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
	if c.Sleep == nil {
		c.Sleep = sleepCtx
	}
	return &AuthThrottle{cfg: c, log: c.Logger, tab: newTable[netip.Prefix, *throttleEntry]()}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

var (
	errAuthBlocked = Reject(421, [3]int{4, 7, 0}, "Too many authentication failures from your address, try again later")
	errAuthTooMany = Reject(421, [3]int{4, 7, 0}, "Too many authentication failures")
)

// connKey names this throttle's per-connection counter in Client state.
type connKey struct{ t *AuthThrottle }

// Connect refuses blocked addresses.
func (t *AuthThrottle) Connect(ctx context.Context, c *Client) error {
	if !c.Addr.IsValid() {
		return nil
	}
	if until, blocked := t.Blocked(c.Addr); blocked {
		t.log.Warn("policy: refused blocked address", "addr", c.Addr, "until", until)
		return errAuthBlocked
	}
	return nil
}

// Auth counts failures, delays, disconnects and blocks.
func (t *AuthThrottle) Auth(ctx context.Context, c *Client, username string, ok bool) error {
	if !c.Addr.IsValid() {
		return nil
	}
	now := t.cfg.Now()
	k := addrKey(c.Addr, t.cfg.IPv6Prefix)
	t.mu.Lock()
	t.sweepLocked(now)
	e := t.tab.lookup(k)
	if e != nil && now.Before(e.val.blockedUntil) {
		t.mu.Unlock()
		t.log.Warn("policy: AUTH from blocked address", "addr", c.Addr, "user", username, "ok", ok)
		return errAuthBlocked
	}
	if ok {
		t.mu.Unlock()
		return nil
	}
	if e != nil && now.Sub(e.last) >= t.cfg.Window {
		e.val.failures = 0
	}
	e = t.tab.touch(k, now, func() *throttleEntry { return &throttleEntry{} })
	e.val.failures++
	n := e.val.failures
	if n >= t.cfg.BlockAfter {
		e.val.blockedUntil = now.Add(t.cfg.BlockFor)
		e.val.failures = 0
	}
	if dropped := t.tab.trim(t.cfg.MaxEntries); dropped > 0 {
		t.log.Warn("policy: AUTH throttle table full, forgetting addresses", "dropped", dropped)
	}
	t.mu.Unlock()

	perConn := c.add(connKey{t}, 1)
	t.log.Warn("policy: AUTH failed", "addr", c.Addr, "user", username, "failures", n, "conn_failures", perConn)
	if n >= t.cfg.BlockAfter {
		t.log.Warn("policy: blocking address after AUTH failures", "addr", c.Addr, "for", t.cfg.BlockFor)
		return errAuthBlocked
	}
	if perConn >= t.cfg.MaxPerConn {
		return errAuthTooMany
	}
	return t.cfg.Sleep(ctx, t.delay(n))
}

// delay is the pause after the n-th failure.
func (t *AuthThrottle) delay(n int) time.Duration {
	d := t.cfg.Delay
	for i := 1; i < n && d < t.cfg.MaxDelay; i++ {
		d *= 2
	}
	return min(d, t.cfg.MaxDelay)
}

// Blocked reports whether addr is blocked, and until when.
func (t *AuthThrottle) Blocked(addr netip.Addr) (time.Time, bool) {
	now := t.cfg.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	e := t.tab.lookup(addrKey(addr, t.cfg.IPv6Prefix))
	if e == nil || !now.Before(e.val.blockedUntil) {
		return time.Time{}, false
	}
	return e.val.blockedUntil, true
}

// Len returns the number of addresses remembered.
func (t *AuthThrottle) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.tab.len()
}

// sweepLocked forgets a few addresses whose failures have faded and whose
// block has ended.
func (t *AuthThrottle) sweepLocked(now time.Time) {
	t.tab.sweep(2, func(e *tentry[netip.Prefix, *throttleEntry]) bool {
		return now.Sub(e.last) >= t.cfg.Window && !now.Before(e.val.blockedUntil)
	})
}
