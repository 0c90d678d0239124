package auth

import (
	"context"
	"path/filepath"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// BenchmarkPasswordFile measures one login at bcrypt's default cost (the
// cost relayd uses) without the login cache, for a valid password, a wrong
// one and an unknown user (the three should cost about the same), and a
// repeated valid login with the cache.
func BenchmarkPasswordFile(b *testing.B) {
	ctx := context.Background()
	path := filepath.Join(b.TempDir(), "users")
	p, err := OpenPasswordFile(path, &PasswordFileConfig{Cost: bcrypt.DefaultCost, CacheTTL: -1})
	if err != nil {
		b.Fatal(err)
	}
	if err := p.SetUser(ctx, User{Name: "alice"}, "correct horse"); err != nil {
		b.Fatal(err)
	}
	p.dummyHash()
	b.Run("valid", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Authenticate(ctx, "alice", "correct horse"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("wrong-password", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Authenticate(ctx, "alice", "wrong"); err == nil {
				b.Fatal("accepted")
			}
		}
	})
	b.Run("unknown-user", func(b *testing.B) {
		for b.Loop() {
			if _, err := p.Authenticate(ctx, "mallory", "wrong"); err == nil {
				b.Fatal("accepted")
			}
		}
	})
	cached, err := OpenPasswordFile(path, nil) // default: login cache on
	if err != nil {
		b.Fatal(err)
	}
	b.Run("valid-cached", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := cached.Authenticate(ctx, "alice", "correct horse"); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkAPIKeys measures one API key login, alone and through Multi in
// front of a password file (relayd's order).
func BenchmarkAPIKeys(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	keys, err := OpenAPIKeys(filepath.Join(dir, "apikeys"), nil)
	if err != nil {
		b.Fatal(err)
	}
	for range 1000 {
		if _, _, err := keys.Create(ctx, NewAPIKey{Name: "filler"}); err != nil {
			b.Fatal(err)
		}
	}
	key, _, err := keys.Create(ctx, NewAPIKey{Name: "app"})
	if err != nil {
		b.Fatal(err)
	}
	users, err := OpenPasswordFile(filepath.Join(dir, "users"), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.Run("valid", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := keys.Authenticate(ctx, "apikey", key); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("wrong", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := keys.Authenticate(ctx, "apikey", key[:len(key)-2]+"xx"); err == nil {
				b.Fatal("accepted")
			}
		}
	})
	b.Run("multi-valid", func(b *testing.B) {
		m := Multi(keys, users)
		for b.Loop() {
			if _, err := m.Authenticate(ctx, "apikey", key); err != nil {
				b.Fatal(err)
			}
		}
	})
}
