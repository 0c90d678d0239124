package relay

import (
	"context"
	"errors"
	"sync"
	"time"
)

// errPoolClosed is returned by connPool.acquire after close.
var errPoolClosed = errors.New("relay: deliverer closed")

// connPool keeps idle outbound SMTP connections per destination (route
// key) and counts open connections against a global and a per-destination
// cap.
//
// A slot is one open connection, busy or idle. acquire either hands out an
// idle connection that satisfies the caller's requirement (the slot comes
// with it) or reserves a new slot for a connection the caller opens
// itself; in both cases the caller later gives the slot back with put
// (the connection goes idle) or release (the connection was closed).
//
// When the global cap is reached, the oldest idle connection anywhere is
// closed to make room, as Postfix's connection cache does; when a
// destination's cap is reached and only connections unfit for the caller
// are idle there, one of those is closed instead. Waiting for a slot
// honours ctx.
type connPool struct {
	maxConns    int
	maxPerDest  int
	idleTimeout time.Duration
	// discard closes connections removed from the pool (QUIT, then
	// close) and then gives their slot back with release: a connection
	// counts against the caps until it is really closed. It runs outside
	// the lock and must not block for long.
	discard func(key string, c *sdConn)

	mu   sync.Mutex
	open int
	// evicting counts idle connections closed to make room under the
	// global cap whose slots are not free yet; while one is in flight no
	// other is evicted for the global cap.
	evicting int
	dests    map[string]*poolDest
	wake     chan struct{} // closed and replaced whenever a slot or an idle connection appears
	closed   bool
}

// poolDest is one destination's share of the pool.
type poolDest struct {
	open int
	// evicting counts this destination's idle connections closed to make
	// room for a fitting one, whose slots are not free yet.
	evicting int
	// idle holds idle connections, the most recently used last.
	idle []*sdConn
}

func newConnPool(maxConns, maxPerDest int, idleTimeout time.Duration, discard func(key string, c *sdConn)) *connPool {
	return &connPool{
		maxConns:    maxConns,
		maxPerDest:  maxPerDest,
		idleTimeout: idleTimeout,
		discard:     discard,
		dests:       make(map[string]*poolDest),
		wake:        make(chan struct{}),
	}
}

// broadcast wakes every waiter; the caller holds mu.
func (p *connPool) broadcast() {
	close(p.wake)
	p.wake = make(chan struct{})
}

// dest returns the entry for key, creating it; the caller holds mu.
func (p *connPool) dest(key string) *poolDest {
	d := p.dests[key]
	if d == nil {
		d = &poolDest{}
		p.dests[key] = d
	}
	return d
}

// forget drops an empty destination entry; the caller holds mu.
func (p *connPool) forget(key string, d *poolDest) {
	if d.open == 0 && len(d.idle) == 0 && d.evicting == 0 {
		delete(p.dests, key)
	}
}

// takeIdle removes and returns the most recently used idle connection of
// d for which ok reports true and whose expiry timer could still be
// stopped; the caller holds mu.
func takeIdle(d *poolDest, ok func(*sdConn) bool) *sdConn {
	for i := len(d.idle) - 1; i >= 0; i-- {
		c := d.idle[i]
		if !ok(c) {
			continue
		}
		if c.idleTimer != nil && !c.idleTimer.Stop() {
			// Expiring right now: expire removes it.
			continue
		}
		d.idle = append(d.idle[:i], d.idle[i+1:]...)
		return c
	}
	return nil
}

// acquire returns an idle connection to key that satisfies match, or nil
// after reserving a slot for a new connection. It waits while the caps
// leave no room, until ctx is done. To make room it closes an idle
// connection (one unfit for the caller at a full destination, or else the
// oldest idle one anywhere when the global cap is reached) unless such an
// eviction is already under way.
func (p *connPool) acquire(ctx context.Context, key string, match func(*sdConn) bool) (*sdConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errPoolClosed
		}
		d := p.dest(key)
		if c := takeIdle(d, match); c != nil {
			p.mu.Unlock()
			return c, nil
		}
		if d.open < p.maxPerDest && p.open < p.maxConns {
			d.open++
			p.open++
			p.mu.Unlock()
			return nil, nil
		}
		var victim *sdConn
		var victimKey string
		switch {
		case d.open >= p.maxPerDest && d.evicting == 0:
			victim, victimKey = takeIdle(d, func(*sdConn) bool { return true }), key
			if victim != nil {
				victim.evicted = evictDest
				d.evicting++
			}
		case d.open < p.maxPerDest && p.evicting == 0:
			victim, victimKey = p.oldestIdle()
			if victim != nil {
				victim.evicted = evictGlobal
				p.evicting++
			}
		}
		wake := p.wake
		p.forget(key, d)
		p.mu.Unlock()
		if victim != nil {
			// Its slot frees (and wakes us) once it is closed.
			p.discard(victimKey, victim)
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// oldestIdle removes and returns the idle connection that has been idle
// longest, with its key; the caller holds mu.
func (p *connPool) oldestIdle() (*sdConn, string) {
	var best *sdConn
	var bestKey string
	for k, d := range p.dests {
		for _, c := range d.idle {
			if best == nil || c.idleSince.Before(best.idleSince) {
				best, bestKey = c, k
			}
			break // idle[0] is the oldest of each destination
		}
	}
	if best == nil {
		return nil, ""
	}
	d := p.dests[bestKey]
	if best.idleTimer != nil && !best.idleTimer.Stop() {
		return nil, "" // expiring anyway; its slot frees shortly
	}
	for i, c := range d.idle {
		if c == best {
			d.idle = append(d.idle[:i], d.idle[i+1:]...)
			break
		}
	}
	return best, bestKey
}

// Eviction kinds recorded in sdConn.evicted.
const (
	evictDest   = 1
	evictGlobal = 2
)

// release gives back the slot of a connection that was closed (or never
// opened); c, when not nil, is that connection.
func (p *connPool) release(key string, c *sdConn) {
	p.mu.Lock()
	d := p.dest(key)
	if c != nil {
		switch c.evicted {
		case evictDest:
			d.evicting--
		case evictGlobal:
			p.evicting--
		}
		c.evicted = 0
	}
	d.open--
	p.open--
	p.forget(key, d)
	p.broadcast()
	p.mu.Unlock()
}

// put returns a healthy connection to the pool as idle. After close, or
// with reuse disabled, the connection is discarded instead.
func (p *connPool) put(key string, c *sdConn) {
	p.mu.Lock()
	if p.closed || p.idleTimeout <= 0 {
		p.mu.Unlock()
		p.discard(key, c)
		return
	}
	d := p.dest(key)
	c.idleSince = time.Now()
	d.idle = append(d.idle, c)
	c.idleTimer = time.AfterFunc(p.idleTimeout, func() { p.expire(key, c) })
	p.broadcast()
	p.mu.Unlock()
}

// expire closes an idle connection whose idle time ran out.
func (p *connPool) expire(key string, c *sdConn) {
	p.mu.Lock()
	found := false
	if d := p.dests[key]; d != nil {
		for i, x := range d.idle {
			if x == c {
				d.idle = append(d.idle[:i], d.idle[i+1:]...)
				found = true
				break
			}
		}
	}
	p.mu.Unlock()
	if found {
		p.discard(key, c)
	}
}

// poolItem is an idle connection with its key.
type poolItem struct {
	key string
	c   *sdConn
}

// close makes acquire fail from now on and returns every idle
// connection, removed from the pool but still counted: the caller closes
// each and releases its slot. Connections in use are discarded when they
// are put back.
func (p *connPool) close() []poolItem {
	p.mu.Lock()
	p.closed = true
	var all []poolItem
	for k, d := range p.dests {
		var expiring []*sdConn
		for _, c := range d.idle {
			if c.idleTimer != nil && !c.idleTimer.Stop() {
				// expire owns it and is waiting for the lock: leave it
				// where expire looks, so that it is closed and released.
				expiring = append(expiring, c)
				continue
			}
			all = append(all, poolItem{k, c})
		}
		d.idle = expiring
	}
	p.broadcast()
	p.mu.Unlock()
	return all
}

// totals reports open connections and idle ones, in all.
func (p *connPool) totals() (open, idle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, d := range p.dests {
		idle += len(d.idle)
	}
	return p.open, idle
}

// counts reports open connections in all and for key, and how many of
// key's are idle (for tests and metrics).
func (p *connPool) counts(key string) (open, destOpen, destIdle int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.dests[key]; d != nil {
		destOpen, destIdle = d.open, len(d.idle)
	}
	return p.open, destOpen, destIdle
}
