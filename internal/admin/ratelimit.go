package admin

import (
	"container/list"
	"math"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// authLimiter throttles failed authentication per client, so the token
// cannot be guessed at the speed of the network. Each client (an IPv4
// address, or an IPv6 /64, which one host usually holds whole) has a token
// bucket of burst failures that refills one every every; while it is
// empty, the client's requests that present credentials are refused
// before they are checked, so a right guess is not told apart from a wrong
// one. Successes take nothing from the bucket and give nothing back, and
// touch no other client's.
//
// It remembers at most max clients, dropping the least recently seen: a
// client dropped while throttled starts afresh, which an attacker needs
// max other addresses to bring about.
type authLimiter struct {
	every time.Duration
	burst int
	max   int
	now   func() time.Time

	mu  sync.Mutex
	m   map[netip.Prefix]*list.Element
	lru *list.List // of *authClient, most recently seen first
}

type authClient struct {
	key netip.Prefix
	lim *rate.Limiter
	// inflight counts attempts admitted and not yet released: they may
	// all fail, so they count against the bucket already, and concurrent
	// requests cannot get past it together.
	inflight int
}

func newAuthLimiter(burst int, every time.Duration, max int, now func() time.Time) *authLimiter {
	return &authLimiter{every: every, burst: burst, max: max, now: now, m: map[netip.Prefix]*list.Element{}, lru: list.New()}
}

// clientKey is the bucket of the client at remoteAddr (host:port, as in
// http.Request.RemoteAddr). Unparsable addresses share one bucket.
func clientKey(remoteAddr string) netip.Prefix {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return netip.Prefix{}
	}
	ip = ip.Unmap()
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, _ := ip.WithZone("").Prefix(bits)
	return p
}

// acquire admits one authentication attempt from the client at remoteAddr
// and returns its record, which release must be given when the attempt's
// outcome is known; or, when the client has used up its failures, nil and
// how long it has to wait.
func (l *authLimiter) acquire(remoteAddr string) (*authClient, time.Duration) {
	key := clientKey(remoteAddr)
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	var c *authClient
	if e, ok := l.m[key]; ok {
		l.lru.MoveToFront(e)
		c = e.Value.(*authClient)
	} else {
		for l.lru.Len() >= l.max {
			old := l.lru.Remove(l.lru.Back()).(*authClient)
			delete(l.m, old.key)
		}
		c = &authClient{key: key, lim: rate.NewLimiter(rate.Every(l.every), l.burst)}
		l.m[key] = l.lru.PushFront(c)
	}
	left := c.lim.TokensAt(now) - float64(c.inflight)
	if left < 1 {
		wait := time.Duration((1 - left) * float64(l.every))
		return nil, wait
	}
	c.inflight++
	return c, 0
}

// release ends an attempt admitted by acquire; a failed one takes one
// failure from the client's bucket. A client back to a full bucket with
// nothing in flight is forgotten, so the clients that sign in right do
// not fill the table.
func (l *authLimiter) release(c *authClient, failed bool) {
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	c.inflight--
	if failed {
		c.lim.AllowN(now, 1)
	}
	if c.inflight == 0 && c.lim.TokensAt(now) >= float64(l.burst) {
		if e, ok := l.m[c.key]; ok && e.Value == c {
			l.lru.Remove(e)
			delete(l.m, c.key)
		}
	}
}

// len reports how many clients the limiter remembers.
func (l *authLimiter) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lru.Len()
}

// retryAfter is the Retry-After value for a wait: whole seconds, at least 1.
func retryAfter(wait time.Duration) int {
	return max(1, int(math.Ceil(wait.Seconds())))
}
