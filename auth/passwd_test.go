package auth

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// fakeClock is a settable clock for reload checks.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func openTestUsers(t *testing.T, path string, clock *fakeClock) *PasswordFile {
	t.Helper()
	cfg := &PasswordFileConfig{Cost: bcrypt.MinCost}
	if clock != nil {
		cfg.Now = clock.Now
	}
	p, err := OpenPasswordFile(path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPasswordFile_MissingFileHasNoUsers(t *testing.T) {
	p := openTestUsers(t, filepath.Join(t.TempDir(), "users"), nil)
	if n := len(p.Users()); n != 0 {
		t.Fatalf("users = %d, want 0", n)
	}
	_, err := p.Authenticate(context.Background(), "alice", "pw")
	if !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("err = %v, want ErrInvalidCredentials", err)
	}
}

func TestPasswordFile_AddAuthenticateAttributes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "users")
	p := openTestUsers(t, path, nil)
	ctx := context.Background()
	u := User{
		Name:          "alice@example.test",
		SenderDomains: []string{"example.test", ".sub.example.test"},
		SenderAddrs:   []string{"ceo@other.test"},
		MaxSize:       1 << 20,
		Rate:          Rate{Messages: 100, Recipients: 1000, Per: time.Hour},
		Sandbox:       true,
	}
	if err := p.SetUser(ctx, u, "correct horse"); err != nil {
		t.Fatal(err)
	}
	id, err := p.Authenticate(ctx, "alice@example.test", "correct horse")
	if err != nil {
		t.Fatalf("Authenticate: %v", err)
	}
	want := Identity{Name: u.Name, SenderDomains: u.SenderDomains, SenderAddrs: u.SenderAddrs, MaxSize: u.MaxSize, Rate: u.Rate, Sandbox: true}
	if fmt.Sprint(*id) != fmt.Sprint(want) {
		t.Fatalf("identity = %+v, want %+v", *id, want)
	}
	for _, c := range []struct{ user, pw string }{
		{"alice@example.test", "wrong"},
		{"alice@example.test", ""},
		{"Alice@example.test", "correct horse"}, // names are exact
		{"bob", "correct horse"},
		{"", ""},
	} {
		if _, err := p.Authenticate(ctx, c.user, c.pw); !errors.Is(err, ErrInvalidCredentials) {
			t.Errorf("Authenticate(%q, %q) err = %v, want ErrInvalidCredentials", c.user, c.pw, err)
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode = %v, want 0600", st.Mode().Perm())
	}
	data, _ := os.ReadFile(path)
	if strings.Contains(string(data), "correct horse") {
		t.Error("password stored in clear")
	}
	// A second reader sees the same user with the same attributes.
	p2 := openTestUsers(t, path, nil)
	got, ok := p2.User(u.Name)
	if !ok || fmt.Sprint(got.Identity()) != fmt.Sprint(id) {
		t.Fatalf("reopened user = %+v, %v", got, ok)
	}
}

func TestPasswordFile_HtpasswdHashes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	h, _ := bcrypt.GenerateFromPassword([]byte("s3cret"), bcrypt.MinCost)
	y := strings.Replace(string(h), "$2a$", "$2y$", 1) // as htpasswd -B writes
	content := "# written by htpasswd\n\nbob:" + y + "\r\ncarol:" + string(h) + ":domains=c.test sandbox\n"
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	p := openTestUsers(t, path, nil)
	ctx := context.Background()
	if _, err := p.Authenticate(ctx, "bob", "s3cret"); err != nil {
		t.Fatalf("bob: %v", err)
	}
	id, err := p.Authenticate(ctx, "carol", "s3cret")
	if err != nil || !id.Sandbox || len(id.SenderDomains) != 1 || id.SenderDomains[0] != "c.test" {
		t.Fatalf("carol: %+v, %v", id, err)
	}
	// Editing keeps the comment and the other users.
	if err := p.RemoveUser(ctx, "bob"); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	if !strings.HasPrefix(string(data), "# written by htpasswd\n") || !strings.Contains(string(data), "carol:") || strings.Contains(string(data), "bob:") {
		t.Fatalf("file after remove:\n%s", data)
	}
}

func TestPasswordFile_MalformedFiles(t *testing.T) {
	h, _ := bcrypt.GenerateFromPassword([]byte("x"), bcrypt.MinCost)
	for name, content := range map[string]string{
		"no hash":         "alice\n",
		"not bcrypt":      "alice:{SHA}abc\n",
		"unknown attr":    "alice:" + string(h) + ":domain=typo.test\n",
		"duplicate":       "alice:" + string(h) + "\nalice:" + string(h) + "\n",
		"bad size":        "alice:" + string(h) + ":max_size=big\n",
		"rate no period":  "alice:" + string(h) + ":messages=5\n",
		"space in name":   "al ice:" + string(h) + "\n",
		"negative limits": "alice:" + string(h) + ":max_size=-1\n",
	} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "users")
			os.WriteFile(path, []byte(content), 0o600)
			if _, err := OpenPasswordFile(path, nil); err == nil {
				t.Fatal("OpenPasswordFile accepted a malformed file")
			}
		})
	}
}

func TestPasswordFile_ReloadsWhenChanged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	clock := newClock()
	server := openTestUsers(t, path, clock)
	editor := openTestUsers(t, path, nil) // as "relayd user add" in another process
	ctx := context.Background()
	if err := editor.SetUser(ctx, User{Name: "dave"}, "pw1"); err != nil {
		t.Fatal(err)
	}
	// Within the check interval the server has not looked yet.
	if _, err := server.Authenticate(ctx, "dave", "pw1"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("before interval: err = %v, want ErrInvalidCredentials", err)
	}
	clock.Add(3 * time.Second)
	if _, err := server.Authenticate(ctx, "dave", "pw1"); err != nil {
		t.Fatalf("after interval: %v", err)
	}
	// A broken file is logged and ignored: dave keeps working.
	if err := os.WriteFile(path, []byte("garbage without colon\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	clock.Add(3 * time.Second)
	if _, err := server.Authenticate(ctx, "dave", "pw1"); err != nil {
		t.Fatalf("after broken file: %v", err)
	}
	if err := server.Reload(ctx); err == nil {
		t.Fatal("Reload of a broken file returned nil")
	}
	// Removing the user, then an explicit reload (SIGHUP) applies at once.
	os.Remove(path)
	editor2 := openTestUsers(t, path, nil)
	if err := editor2.SetUser(ctx, User{Name: "erin"}, "pw2"); err != nil {
		t.Fatal(err)
	}
	if err := server.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Authenticate(ctx, "dave", "pw1"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("removed user: err = %v", err)
	}
	if _, err := server.Authenticate(ctx, "erin", "pw2"); err != nil {
		t.Fatalf("erin: %v", err)
	}
}

func TestPasswordFile_ConcurrentEditorsLoseNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "users")
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := OpenPasswordFile(path, &PasswordFileConfig{Cost: bcrypt.MinCost})
			if err != nil {
				errs <- err
				return
			}
			errs <- p.SetUser(ctx, User{Name: fmt.Sprintf("user%d", i)}, "pw")
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	p := openTestUsers(t, path, nil)
	if n := len(p.Users()); n != 8 {
		t.Fatalf("users = %d, want 8 (an edit was lost)", n)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

func TestPasswordFile_EditErrors(t *testing.T) {
	p := openTestUsers(t, filepath.Join(t.TempDir(), "users"), nil)
	ctx := context.Background()
	if err := p.RemoveUser(ctx, "nobody"); !errors.Is(err, ErrNoUser) {
		t.Errorf("RemoveUser(nobody) = %v, want ErrNoUser", err)
	}
	for _, name := range []string{"", "a:b", "a b", "a\nb", "#x"} {
		if err := p.SetUser(ctx, User{Name: name}, "pw"); err == nil {
			t.Errorf("SetUser(%q) accepted a bad name", name)
		}
	}
	if err := p.SetUser(ctx, User{Name: "x"}, strings.Repeat("a", 73)); err == nil {
		t.Error("SetUser accepted a password longer than bcrypt's 72 bytes")
	}
	if err := p.SetUser(ctx, User{Name: "x"}, ""); err == nil {
		t.Error("SetUser accepted a new user without password or hash")
	}
	if err := p.SetUser(ctx, User{Name: "x", SenderDomains: []string{"a.test,b.test"}}, "pw"); err == nil {
		t.Error("SetUser accepted a domain with a comma")
	}
	// Changing attributes with an empty password keeps the password.
	if err := p.SetUser(ctx, User{Name: "y"}, "pw"); err != nil {
		t.Fatal(err)
	}
	if err := p.SetUser(ctx, User{Name: "y", Sandbox: true}, ""); err != nil {
		t.Fatal(err)
	}
	id, err := p.Authenticate(ctx, "y", "pw")
	if err != nil || !id.Sandbox {
		t.Fatalf("after attribute change: %+v, %v", id, err)
	}
}

func TestPasswordFile_LongPasswordPrefixRefused(t *testing.T) {
	p := openTestUsers(t, filepath.Join(t.TempDir(), "users"), nil)
	ctx := context.Background()
	pw := strings.Repeat("p", 72)
	if err := p.SetUser(ctx, User{Name: "z"}, pw); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authenticate(ctx, "z", pw); err != nil {
		t.Fatalf("72-byte password: %v", err)
	}
	if _, err := p.Authenticate(ctx, "z", pw+"extra"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatalf("password with the right 72-byte prefix: err = %v, want refusal", err)
	}
}

func TestPasswordFile_UnknownUserComparesDummyHash(t *testing.T) {
	p, err := OpenPasswordFile(filepath.Join(t.TempDir(), "users"), &PasswordFileConfig{Cost: 6})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Authenticate(context.Background(), "ghost", "pw"); !errors.Is(err, ErrInvalidCredentials) {
		t.Fatal(err)
	}
	if p.dummy == nil {
		t.Fatal("unknown user did not go through bcrypt")
	}
	if cost, err := bcrypt.Cost(p.dummy); err != nil || cost != 6 {
		t.Fatalf("dummy hash cost = %d, %v; want the configured 6", cost, err)
	}
}

func TestPasswordFile_ContextCancelledWhileWaiting(t *testing.T) {
	p, err := OpenPasswordFile(filepath.Join(t.TempDir(), "users"), &PasswordFileConfig{Cost: bcrypt.MinCost, MaxConcurrent: 1})
	if err != nil {
		t.Fatal(err)
	}
	p.sem <- struct{}{} // every slot busy
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.Authenticate(ctx, "a", "b"); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	<-p.sem
}

func TestGeneratePassword(t *testing.T) {
	seen := map[string]bool{}
	for range 100 {
		pw := GeneratePassword()
		if len(pw) != 24 || strings.ContainsAny(pw, "0O1lI") || seen[pw] {
			t.Fatalf("bad or repeated password %q", pw)
		}
		seen[pw] = true
	}
}
