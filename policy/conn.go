package policy

import (
	"context"
	"log/slog"
	"net/netip"
	"sync"
)

// ConnLimitConfig configures ConnLimit.
type ConnLimitConfig struct {
	// PerIP caps the open connections from one address; 0 means 20.
	PerIP int
	// IPv6Prefix groups IPv6 clients: 0 means 64, 128 counts each
	// address alone.
	IPv6Prefix int
	// Logger receives refusals; nil discards.
	Logger *slog.Logger
}

// ConnLimit caps concurrent connections per client address. Connect
// counts a connection and refuses one over the limit with 421 4.7.0 "Too
// many connections from your address, try again later" (the server sends
// it and closes); Disconnect, which the server must call when every
// connection ends (see Closer), releases the count. In-process clients
// (no address) are not counted. Memory holds one entry per address with
// open connections. Safe for concurrent use.
type ConnLimit struct {
	Base
	cfg ConnLimitConfig
	log *slog.Logger

	mu   sync.Mutex
	open map[netip.Prefix]int
}

var (
	_ Policy = (*ConnLimit)(nil)
	_ Closer = (*ConnLimit)(nil)
)

// NewConnLimit returns a ConnLimit; cfg may be nil.
func NewConnLimit(cfg *ConnLimitConfig) *ConnLimit {
	var c ConnLimitConfig
	if cfg != nil {
		c = *cfg
	}
	if c.PerIP <= 0 {
		c.PerIP = 20
	}
	if c.IPv6Prefix <= 0 || c.IPv6Prefix > 128 {
		c.IPv6Prefix = 64
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return &ConnLimit{cfg: c, log: c.Logger, open: make(map[netip.Prefix]int)}
}

var errTooManyConns = Reject(421, [3]int{4, 7, 0}, "Too many connections from your address, try again later")

// Connect counts the connection or refuses it.
func (l *ConnLimit) Connect(ctx context.Context, c *Client) error {
	if !c.Addr.IsValid() || c.get(l) != 0 {
		return nil // in-process, or already counted
	}
	k := addrKey(c.Addr, l.cfg.IPv6Prefix)
	l.mu.Lock()
	n := l.open[k]
	if n >= l.cfg.PerIP {
		l.mu.Unlock()
		l.log.Warn("policy: connection limit reached", "addr", c.Addr, "open", n)
		return errTooManyConns
	}
	l.open[k] = n + 1
	l.mu.Unlock()
	c.set(l, 1)
	return nil
}

// Disconnect releases the connection's count, if Connect made one.
func (l *ConnLimit) Disconnect(ctx context.Context, c *Client) {
	if c.get(l) == 0 {
		return
	}
	c.set(l, 0)
	k := addrKey(c.Addr, l.cfg.IPv6Prefix)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[k] <= 1 {
		delete(l.open, k)
	} else {
		l.open[k]--
	}
}

// Open returns the number of connections counted for addr's group.
func (l *ConnLimit) Open(addr netip.Addr) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open[addrKey(addr, l.cfg.IPv6Prefix)]
}
