package auth

import (
	"context"
	"errors"
	"net/netip"
	"testing"
)

func TestMulti(t *testing.T) {
	ctx := context.Background()
	errDown := errors.New("backend down")
	calls := 0
	fixed := func(user, pw string, id *Identity, fail error) Authenticator {
		return AuthenticatorFunc(func(ctx context.Context, u, p string) (*Identity, error) {
			calls++
			if fail != nil {
				return nil, fail
			}
			if u == user && p == pw {
				return id, nil
			}
			return nil, ErrInvalidCredentials
		})
	}
	a := fixed("a", "1", &Identity{Name: "a"}, nil)
	b := fixed("b", "2", &Identity{Name: "b"}, nil)
	down := fixed("", "", nil, errDown)

	m := Multi(a, nil, b)
	if id, err := m.Authenticate(ctx, "b", "2"); err != nil || id.Name != "b" {
		t.Fatalf("second member: %v, %v", id, err)
	}
	calls = 0
	if id, err := m.Authenticate(ctx, "a", "1"); err != nil || id.Name != "a" || calls != 1 {
		t.Fatalf("first member: %v, %v, calls %d (want 1: stop at the first success)", id, err, calls)
	}
	if _, err := m.Authenticate(ctx, "a", "2"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("wrong: %v", err)
	}
	// A failing member does not hide a later success...
	if id, err := Multi(down, b).Authenticate(ctx, "b", "2"); err != nil || id.Name != "b" {
		t.Fatalf("after failing member: %v, %v", id, err)
	}
	// ...but when nobody accepts, the failure is reported, not "wrong password".
	if _, err := Multi(a, down).Authenticate(ctx, "x", "y"); !errors.Is(err, errDown) {
		t.Fatalf("all refused with one down: %v, want errDown", err)
	}
	if _, err := Multi().Authenticate(ctx, "x", "y"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("empty Multi: %v", err)
	}
}

func TestMultiAddr(t *testing.T) {
	ctx := context.Background()
	l1, _ := NewAllowList([]AllowEntry{{Identity: Identity{Name: "one"}, Networks: []string{"10.0.0.0/8"}}})
	l2, _ := NewAllowList([]AllowEntry{{Identity: Identity{Name: "two"}, Networks: []string{"192.0.2.0/24"}}})
	m := MultiAddr(l1, nil, l2)
	if id, err := m.AuthenticateAddr(ctx, netip.MustParseAddr("192.0.2.1")); err != nil || id.Name != "two" {
		t.Fatalf("%v %v", id, err)
	}
	if _, err := m.AuthenticateAddr(ctx, netip.MustParseAddr("198.51.100.1")); !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("%v", err)
	}
}

func TestMulti_APIKeysThenPasswords(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	keys := openTestKeys(t, dir+"/apikeys", nil)
	users := openTestUsers(t, dir+"/users", nil)
	key, _, err := keys.Create(ctx, NewAPIKey{Name: "app"})
	if err != nil {
		t.Fatal(err)
	}
	if err := users.SetUser(ctx, User{Name: "alice"}, "pw"); err != nil {
		t.Fatal(err)
	}
	m := Multi(keys, users)
	if id, err := m.Authenticate(ctx, "apikey", key); err != nil || id.Name != "apikey:app" {
		t.Fatalf("key: %v %v", id, err)
	}
	if id, err := m.Authenticate(ctx, "alice", "pw"); err != nil || id.Name != "alice" {
		t.Fatalf("password: %v %v", id, err)
	}
	if _, err := m.Authenticate(ctx, "alice", key); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("key under a user name: %v", err)
	}
}
