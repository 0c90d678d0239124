package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"sync"
	"time"
)

// loginCache remembers recent successful password logins by a keyed hash
// of (name, password, stored hash), so repeated logins skip bcrypt. The key
// is random per process: the cache's contents are useless outside it, and
// an entry can only match the exact password that succeeded against the
// exact hash still in the file. A nil *loginCache caches nothing.
type loginCache struct {
	key  [32]byte
	ttl  time.Duration
	max  int
	now  func() time.Time
	mu   sync.Mutex
	seen map[[sha256.Size]byte]time.Time // expiry
}

func newLoginCache(ttl time.Duration, max int, now func() time.Time) *loginCache {
	if ttl <= 0 {
		return nil
	}
	c := &loginCache{ttl: ttl, max: max, now: now, seen: make(map[[sha256.Size]byte]time.Time)}
	rand.Read(c.key[:])
	return c
}

func (c *loginCache) sum(name, password, hash string) [sha256.Size]byte {
	m := hmac.New(sha256.New, c.key[:])
	for _, s := range []string{name, password, hash} {
		var n [4]byte
		n[0], n[1], n[2], n[3] = byte(len(s)>>24), byte(len(s)>>16), byte(len(s)>>8), byte(len(s))
		m.Write(n[:]) // length-prefixed: no ambiguity between fields
		m.Write([]byte(s))
	}
	var out [sha256.Size]byte
	m.Sum(out[:0])
	return out
}

func (c *loginCache) hit(name, password, hash string) bool {
	if c == nil {
		return false
	}
	k := c.sum(name, password, hash)
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	exp, ok := c.seen[k]
	if ok && now.Before(exp) {
		return true
	}
	if ok {
		delete(c.seen, k)
	}
	return false
}

func (c *loginCache) add(name, password, hash string) {
	if c == nil {
		return
	}
	k := c.sum(name, password, hash)
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.seen) >= c.max {
		for k, exp := range c.seen {
			if !now.Before(exp) {
				delete(c.seen, k)
			}
		}
		if len(c.seen) >= c.max {
			clear(c.seen) // all fresh: start over rather than grow
		}
	}
	c.seen[k] = now.Add(c.ttl)
}
