package auth

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func openTestKeys(t *testing.T, path string, cfg *APIKeysConfig) *APIKeys {
	t.Helper()
	k, err := OpenAPIKeys(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestAPIKeys_CreateAuthenticateRevoke(t *testing.T) {
	path := filepath.Join(t.TempDir(), "apikeys")
	clock := newClock()
	keys := openTestKeys(t, path, &APIKeysConfig{Now: clock.Now})
	ctx := context.Background()
	key, rec, err := keys.Create(ctx, NewAPIKey{Name: "billing", SenderDomains: []string{"billing.test"}, Rate: Rate{Messages: 10, Per: time.Minute}})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(key, "bk_"+rec.ID+"_") || len(key) != 3+16+1+43 {
		t.Fatalf("key %q does not have the documented form", key)
	}
	if !slices.Equal(rec.Scopes, []string{ScopeSend}) || !rec.Created.Equal(clock.Now()) {
		t.Fatalf("record = %+v", rec)
	}
	data, _ := os.ReadFile(path)
	if strings.Contains(string(data), key) || strings.Contains(string(data), key[20:]) {
		t.Fatal("key stored in clear")
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Fatalf("mode = %v", st.Mode().Perm())
	}

	id, err := keys.Authenticate(ctx, "apikey", key)
	if err != nil {
		t.Fatalf("Authenticate: %v", err)
	}
	if id.Name != "apikey:billing" || !slices.Equal(id.Scopes, []string{"send"}) || id.Sandbox ||
		!slices.Equal(id.SenderDomains, []string{"billing.test"}) || id.Rate.Messages != 10 {
		t.Fatalf("identity = %+v", id)
	}
	if _, err := keys.Authenticate(ctx, "APIKEY", key); err != nil {
		t.Fatalf("user name case: %v", err)
	}

	last := byte('A')
	if key[len(key)-1] == 'A' {
		last = 'B'
	}
	tampered := key[:len(key)-1] + string(last)
	for _, c := range []struct{ user, pw string }{
		{"billing", key},             // the key's name is not the user name
		{"apikey", tampered},         // one character off
		{"apikey", key + "x"},        // longer
		{"apikey", key[:len(key)-1]}, // shorter
		{"apikey", ""},
		{"apikey", "bk_0000000000000000_" + strings.Repeat("A", 43)}, // unknown ID
	} {
		if _, err := keys.Authenticate(ctx, c.user, c.pw); !errors.Is(err, ErrInvalidCredentials) {
			t.Errorf("Authenticate(%q, %q) err = %v, want ErrInvalidCredentials", c.user, c.pw, err)
		}
	}

	// Another instance (the server) sees the revocation after reload.
	server := openTestKeys(t, path, &APIKeysConfig{CheckInterval: -1})
	if _, err := server.Authenticate(ctx, "apikey", key); err != nil {
		t.Fatal(err)
	}
	if err := keys.Revoke(ctx, rec.ID); err != nil {
		t.Fatal(err)
	}
	if err := keys.Revoke(ctx, rec.ID); err != nil {
		t.Fatalf("second revoke: %v", err)
	}
	if _, err := keys.Authenticate(ctx, "apikey", key); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("revoked key: err = %v", err)
	}
	if err := server.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Authenticate(ctx, "apikey", key); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("revoked key on server: err = %v", err)
	}
	list := server.Keys()
	if len(list) != 1 || list[0].Revoked == nil {
		t.Fatalf("list = %+v, want the key listed as revoked", list)
	}
	if err := keys.Revoke(ctx, "nosuchid"); !errors.Is(err, ErrNoKey) {
		t.Fatalf("revoke unknown: %v", err)
	}
}

func TestAPIKeys_Scopes(t *testing.T) {
	keys := openTestKeys(t, filepath.Join(t.TempDir(), "apikeys"), nil)
	ctx := context.Background()
	for _, c := range []struct {
		scopes      []string
		sandboxFlag bool
		wantSandbox bool
	}{
		{[]string{"send"}, false, false},
		{[]string{"send:sandbox"}, false, true}, // sandbox-only key
		{[]string{"send", "send:sandbox"}, false, false},
		{[]string{"send"}, true, true},
		{[]string{"stats"}, false, false},
	} {
		key, _, err := keys.Create(ctx, NewAPIKey{Name: "k", Scopes: c.scopes, Sandbox: c.sandboxFlag})
		if err != nil {
			t.Fatal(err)
		}
		id, err := keys.Authenticate(ctx, "apikey", key)
		if err != nil {
			t.Fatal(err)
		}
		if id.Sandbox != c.wantSandbox || !slices.Equal(id.Scopes, c.scopes) {
			t.Errorf("scopes %v sandbox %v: identity %+v", c.scopes, c.sandboxFlag, id)
		}
	}
	// A key with no scopes carries an empty, non-nil list, so policies
	// can tell it from an identity without scopes.
	key, _, err := keys.Create(ctx, NewAPIKey{Name: "none", Scopes: []string{}})
	if err != nil {
		t.Fatal(err)
	}
	id, err := keys.Authenticate(ctx, "apikey", key)
	if err != nil || id.Scopes == nil || len(id.Scopes) != 0 {
		t.Fatalf("no-scope key: %+v, %v", id, err)
	}
	if _, _, err := keys.Create(ctx, NewAPIKey{Name: "bad", Scopes: []string{"send stats"}}); err == nil {
		t.Error("Create accepted a scope with a space")
	}
}

func TestAPIKeys_CustomUserAndUniqueKeys(t *testing.T) {
	keys := openTestKeys(t, filepath.Join(t.TempDir(), "apikeys"), &APIKeysConfig{User: "token"})
	ctx := context.Background()
	seen := map[string]bool{}
	var last string
	for range 20 {
		key, _, err := keys.Create(ctx, NewAPIKey{Name: "svc"})
		if err != nil {
			t.Fatal(err)
		}
		if seen[key] {
			t.Fatal("duplicate key")
		}
		seen[key] = true
		last = key
	}
	if _, err := keys.Authenticate(ctx, "token", last); err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Authenticate(ctx, "apikey", last); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("default user name accepted with a custom one configured: %v", err)
	}
	if n := len(keys.Keys()); n != 20 {
		t.Fatalf("keys = %d", n)
	}
}

func TestAPIKeys_MalformedFile(t *testing.T) {
	for name, content := range map[string]string{
		"not json": "keys:",
		"bad hash": `{"keys":[{"id":"a","hash":"zz"}]}`,
		"no id":    `{"keys":[{"hash":"` + strings.Repeat("0", 64) + `"}]}`,
		"dup":      `{"keys":[{"id":"a","hash":"` + strings.Repeat("0", 64) + `"},{"id":"a","hash":"` + strings.Repeat("0", 64) + `"}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "apikeys")
			os.WriteFile(path, []byte(content), 0o600)
			if _, err := OpenAPIKeys(path, nil); err == nil {
				t.Fatal("accepted a malformed file")
			}
		})
	}
}

func TestIdentity_MaySend(t *testing.T) {
	for _, c := range []struct {
		id   Identity
		want bool
	}{
		{Identity{}, true},
		{Identity{Scopes: []string{"send"}}, true},
		{Identity{Scopes: []string{"send:sandbox"}, Sandbox: true}, true},
		{Identity{Scopes: []string{"send:sandbox"}}, false},
		{Identity{Scopes: []string{"stats"}}, false},
		{Identity{Scopes: []string{}}, false},
	} {
		if got := c.id.MaySend(); got != c.want {
			t.Errorf("%+v: MaySend = %v, want %v", c.id, got, c.want)
		}
	}
	// What Create and Authenticate produce for a sandbox-only key sends.
	k := &APIKey{Scopes: []string{ScopeSendSandbox}}
	if !k.Identity().MaySend() {
		t.Error("sandbox-only key may not send")
	}
}
