package auth

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestPasswordFile_LoginCache(t *testing.T) {
	clock := newClock()
	p, err := OpenPasswordFile(filepath.Join(t.TempDir(), "users"), &PasswordFileConfig{Cost: bcrypt.MinCost, MaxConcurrent: 1, CacheTTL: time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := p.SetUser(ctx, User{Name: "alice", SenderDomains: []string{"a.test"}}, "pw1"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authenticate(ctx, "alice", "pw1"); err != nil {
		t.Fatal(err)
	}
	// With every bcrypt slot taken and a cancelled context, only a login
	// that skips bcrypt can succeed.
	p.sem <- struct{}{}
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	id, err := p.Authenticate(cancelled, "alice", "pw1")
	if err != nil || id.Name != "alice" || len(id.SenderDomains) != 1 {
		t.Fatalf("cached login: %+v, %v", id, err)
	}
	if _, err := p.Authenticate(cancelled, "alice", "pw2"); !errors.Is(err, context.Canceled) {
		t.Fatalf("a different password must go to bcrypt: %v", err)
	}
	if _, err := p.Authenticate(cancelled, "bob", "pw1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("another user must go to bcrypt: %v", err)
	}
	// Expired entries miss.
	clock.Add(time.Minute)
	if _, err := p.Authenticate(cancelled, "alice", "pw1"); !errors.Is(err, context.Canceled) {
		t.Fatalf("expired entry was used: %v", err)
	}
	<-p.sem // free the slot again
	if _, err := p.Authenticate(ctx, "alice", "pw1"); err != nil {
		t.Fatal(err)
	}
	// A changed password invalidates the cached one at once.
	if err := p.SetUser(ctx, User{Name: "alice"}, "pw2"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authenticate(ctx, "alice", "pw1"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("old password after change: %v", err)
	}
	if _, err := p.Authenticate(ctx, "alice", "pw2"); err != nil {
		t.Fatal(err)
	}
	// A removed user is gone at once too.
	if err := p.RemoveUser(ctx, "alice"); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authenticate(ctx, "alice", "pw2"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("removed user: %v", err)
	}
}

func TestLoginCache_Bounded(t *testing.T) {
	clock := newClock()
	c := newLoginCache(time.Minute, 10, clock.Now)
	for i := range 100 {
		c.add(string(rune('a'+i%26))+string(rune(i)), "pw", "h")
		if len(c.seen) > 10 {
			t.Fatalf("%d entries, max 10", len(c.seen))
		}
	}
	if newLoginCache(-1, 10, clock.Now) != nil {
		t.Fatal("negative TTL should disable the cache")
	}
	var off *loginCache
	off.add("a", "b", "c")
	if off.hit("a", "b", "c") {
		t.Fatal("nil cache hit")
	}
}
