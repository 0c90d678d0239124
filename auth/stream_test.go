package auth

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// A user's stream attribute is read, written back and carried by the
// identity; a malformed one makes the file invalid.
func TestPasswordFile_Stream(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	h, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	if err := os.WriteFile(path, []byte("news:"+string(h)+":stream=bulk\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p := openTestUsers(t, path, nil)
	ctx := context.Background()
	id, err := p.Authenticate(ctx, "news", "s3cret")
	if err != nil || id.Stream != "bulk" {
		t.Fatalf("news: %+v, %v", id, err)
	}
	if err := p.SetUser(ctx, User{Name: "alerts", Stream: "transactional"}, "pw"); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	if !strings.Contains(string(data), ":stream=bulk\n") || !strings.Contains(string(data), ":stream=transactional\n") {
		t.Fatalf("file after SetUser:\n%s", data)
	}
	if err := p.SetUser(ctx, User{Name: "bad", Stream: "Bulk Mail"}, "pw"); err == nil {
		t.Error("SetUser accepted a malformed stream")
	}
	if err := os.WriteFile(path, []byte("x:"+string(h)+":stream=a:b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenPasswordFile(path, nil); err == nil {
		t.Error("OpenPasswordFile accepted a malformed stream")
	}
}

func TestAPIKeys_Stream(t *testing.T) {
	keys := openTestKeys(t, filepath.Join(t.TempDir(), "apikeys"), nil)
	ctx := context.Background()
	key, rec, err := keys.Create(ctx, NewAPIKey{Name: "campaigns", Stream: "bulk"})
	if err != nil || rec.Stream != "bulk" {
		t.Fatalf("Create: %+v, %v", rec, err)
	}
	id, err := keys.Authenticate(ctx, "apikey", key)
	if err != nil || id.Stream != "bulk" {
		t.Fatalf("identity: %+v, %v", id, err)
	}
	if _, _, err := keys.Create(ctx, NewAPIKey{Name: "bad", Stream: "x y"}); err == nil {
		t.Error("Create accepted a malformed stream")
	}
}

func TestAllowList_Stream(t *testing.T) {
	if _, err := NewAllowList([]AllowEntry{{Identity: Identity{Name: "a", Stream: "BULK"}, Networks: []string{"127.0.0.1"}}}); err == nil {
		t.Error("NewAllowList accepted a malformed stream")
	}
}
