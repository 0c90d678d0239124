package relay

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

func TestShouldSuppress(t *testing.T) {
	for _, tc := range []struct {
		r    queue.Reply
		want bool
	}{
		{queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user"}, true},
		{queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "whatever"}, true},
		{queue.Reply{Code: 550, Enhanced: "5.1.2", Text: "domain does not exist"}, true},
		{queue.Reply{Code: 556, Enhanced: "5.1.10", Text: "null MX"}, true},
		{queue.Reply{Code: 550, Enhanced: "5.2.1", Text: "account disabled"}, true},
		{queue.Reply{Code: 551, Enhanced: "5.1.6", Text: "moved"}, true},
		{queue.Reply{Code: 550, Text: "5.1.1 <x@y.test>: Recipient address rejected: User unknown in local recipient table"}, true},
		{queue.Reply{Code: 550, Enhanced: "5.0.0", Text: "No such user (x@y.test)"}, true},
		{queue.Reply{Code: 550, Text: "Mailbox not found"}, true},
		{queue.Reply{Code: 550, Text: "Requested action not taken: mailbox unavailable"}, false},
		{queue.Reply{Code: 554, Text: "user unknown"}, false}, // 554 is a transaction failure, not a mailbox one
		{queue.Reply{Code: 550, Enhanced: "5.7.1", Text: "user unknown? no: blocked by policy"}, false},
		{queue.Reply{Code: 552, Enhanced: "5.2.2", Text: "Mailbox full"}, false},
		{queue.Reply{Code: 554, Enhanced: "5.7.1", Text: "Spam"}, false},
		{queue.Reply{Code: 450, Enhanced: "4.1.1", Text: "No such user (yet)"}, false},
		{queue.Reply{Code: 451, Text: "user unknown"}, false},
		{queue.Reply{Code: 250, Text: "OK"}, false},
		{queue.Reply{}, false},
	} {
		if got := ShouldSuppress(tc.r); got != tc.want {
			t.Errorf("ShouldSuppress(%v) = %v, want %v", tc.r, got, tc.want)
		}
	}
}

func TestSuppressedReply(t *testing.T) {
	s := &Suppression{Addr: "x@y.test", Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC),
		Reply: queue.Reply{Code: 550, Enhanced: "5.2.1", Text: "Account\r\ndisabled", Host: "mx.y.test"}}
	r := SuppressedReply(s)
	if r.Code != 550 || r.Enhanced != "5.2.1" || r.Host != "" {
		t.Errorf("reply = %+v", r)
	}
	for _, want := range []string{"suppressed", "2026-01-02", "5.2.1 Account disabled", "mx.y.test"} {
		if !strings.Contains(r.Text, want) {
			t.Errorf("reply text %q lacks %q", r.Text, want)
		}
	}
	if strings.ContainsAny(r.Text, "\r\n") {
		t.Errorf("reply text has a line break: %q", r.Text)
	}
	// An entry added by hand with a 4xx or no code still fails with 5.1.1.
	r = SuppressedReply(&Suppression{Addr: "x@y.test", Reply: queue.Reply{Code: 450, Enhanced: "4.2.0"}})
	if r.Code != 550 || r.Enhanced != "5.1.1" {
		t.Errorf("reply = %+v, want 550 5.1.1", r)
	}
	if ShouldSuppress(SuppressedReply(s)) {
		// Otherwise every suppressed message would renew the entry and
		// the address would never be tried again.
		t.Errorf("the suppressed reply itself would renew the suppression")
	}
}

// suppressClock is a settable clock safe for concurrent use.
type suppressClock struct{ ns atomic.Int64 }

func newSuppressClock(t time.Time) *suppressClock {
	c := &suppressClock{}
	c.ns.Store(t.UnixNano())
	return c
}
func (c *suppressClock) Now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *suppressClock) Add(d time.Duration) { c.ns.Add(int64(d)) }

type suppressionStore interface {
	Suppressions
	Prune(ctx context.Context) (int, error)
}

func suppressionBackends(t *testing.T) map[string]func(cfg SuppressionConfig) suppressionStore {
	return map[string]func(cfg SuppressionConfig) suppressionStore{
		"Memory": func(cfg SuppressionConfig) suppressionStore { return NewSuppressionMemory(cfg) },
		"Dir": func(cfg SuppressionConfig) suppressionStore {
			s, err := OpenSuppressionDir(filepath.Join(t.TempDir(), "suppressions"), cfg)
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
	}
}

func suppressListAddrs(t *testing.T, s Suppressions) []string {
	t.Helper()
	var out []string
	if err := s.List(context.Background(), func(e Suppression) error { out = append(out, e.Addr); return nil }); err != nil {
		t.Fatalf("List: %v", err)
	}
	sort.Strings(out)
	return out
}

func TestSuppressions_Contract(t *testing.T) {
	ctx := context.Background()
	for name, open := range suppressionBackends(t) {
		t.Run(name, func(t *testing.T) {
			clock := newSuppressClock(time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC))
			s := open(SuppressionConfig{TTL: 48 * time.Hour, Now: clock.Now})

			if _, ok, err := s.Lookup(ctx, "nobody@x.test"); ok || err != nil {
				t.Fatalf("Lookup of an empty store = %v, %v", ok, err)
			}
			rep := queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user", Host: "mx.x.test"}
			if err := s.Add(ctx, Suppression{Addr: "User@X.test", Reply: rep, ID: "M1"}); err != nil {
				t.Fatal(err)
			}
			got, ok, err := s.Lookup(ctx, "<user@x.TEST>")
			if err != nil || !ok {
				t.Fatalf("Lookup after Add = %v, %v (case-insensitive, brackets ignored)", ok, err)
			}
			if got.Addr != "User@X.test" || got.Reply != rep || got.ID != "M1" || !got.Created.Equal(clock.Now()) || !got.Expires.Equal(clock.Now().Add(48*time.Hour)) {
				t.Errorf("entry = %+v", got)
			}

			// Add replaces.
			rep2 := queue.Reply{Code: 550, Enhanced: "5.2.1", Text: "disabled"}
			if err := s.Add(ctx, Suppression{Addr: "user@x.test", Reply: rep2}); err != nil {
				t.Fatal(err)
			}
			if got, _, _ := s.Lookup(ctx, "user@x.test"); got == nil || got.Reply != rep2 {
				t.Errorf("after second Add: %+v", got)
			}
			if err := s.Add(ctx, Suppression{Addr: "other@x.test", Reply: rep}); err != nil {
				t.Fatal(err)
			}
			if err := s.Add(ctx, Suppression{Addr: "later@x.test", Reply: rep, Expires: clock.Now().Add(96 * time.Hour)}); err != nil {
				t.Fatal(err)
			}
			if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[later@x.test other@x.test user@x.test]" {
				t.Errorf("List = %v", got)
			}

			// Remove, and Remove of an absent address.
			if err := s.Remove(ctx, "OTHER@x.test"); err != nil {
				t.Fatal(err)
			}
			if err := s.Remove(ctx, "OTHER@x.test"); err != nil {
				t.Errorf("second Remove: %v", err)
			}
			if _, ok, _ := s.Lookup(ctx, "other@x.test"); ok {
				t.Error("found after Remove")
			}

			// Expiry: the TTL lapses, an explicit Expires is kept.
			clock.Add(48 * time.Hour)
			if _, ok, _ := s.Lookup(ctx, "user@x.test"); ok {
				t.Error("found after its TTL")
			}
			if _, ok, _ := s.Lookup(ctx, "later@x.test"); !ok {
				t.Error("entry with a later Expires lapsed early")
			}
			if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[later@x.test]" {
				t.Errorf("List after expiry = %v", got)
			}
			n, err := s.Prune(ctx)
			if err != nil || n > 1 {
				// The memory store may already have dropped the entry in Lookup.
				t.Errorf("Prune = %d, %v", n, err)
			}

			// An error from fn stops List.
			stop := errors.New("stop")
			calls := 0
			if err := s.List(ctx, func(Suppression) error { calls++; return stop }); !errors.Is(err, stop) || calls != 1 {
				t.Errorf("List with failing fn = %v after %d calls", err, calls)
			}

			// Malformed addresses and a cancelled context are refused.
			for _, bad := range []string{"", "  ", "a@b.test\r\nX: y", "<>"} {
				if err := s.Add(ctx, Suppression{Addr: bad}); err == nil {
					t.Errorf("Add(%q) succeeded", bad)
				}
			}
			cctx, cancel := context.WithCancel(ctx)
			cancel()
			if err := s.Add(cctx, Suppression{Addr: "z@x.test"}); err == nil {
				t.Error("Add with a cancelled context succeeded")
			}
			if _, _, err := s.Lookup(cctx, "later@x.test"); err == nil {
				t.Error("Lookup with a cancelled context succeeded")
			}
		})
	}
}

func TestSuppressions_ConcurrentUse(t *testing.T) {
	ctx := context.Background()
	for name, open := range suppressionBackends(t) {
		t.Run(name, func(t *testing.T) {
			s := open(SuppressionConfig{})
			var wg sync.WaitGroup
			for g := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 25 {
						a := fmt.Sprintf("u%d-%d@x.test", g, i)
						if err := s.Add(ctx, Suppression{Addr: a}); err != nil {
							t.Error(err)
							return
						}
						if _, ok, err := s.Lookup(ctx, a); !ok || err != nil {
							t.Errorf("Lookup(%s) = %v, %v", a, ok, err)
						}
						if i%5 == 0 {
							if err := s.Remove(ctx, a); err != nil {
								t.Error(err)
							}
						}
					}
				}()
			}
			wg.Wait()
			if got := len(suppressListAddrs(t, s)); got != 4*20 {
				t.Errorf("%d entries, want 80", got)
			}
		})
	}
}

func TestSuppressionDir_DurableAcrossReopen(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "s")
	a, err := OpenSuppressionDir(dir, SuppressionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Add(ctx, Suppression{Addr: "gone@x.test", Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "unknown"}}); err != nil {
		t.Fatal(err)
	}
	// A second handle (as the relayd subcommand would open) sees it, and
	// its Remove is seen by the first.
	b, err := OpenSuppressionDir(dir, SuppressionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if got, ok, err := b.Lookup(ctx, "gone@x.test"); !ok || err != nil || got.Reply.Text != "unknown" {
		t.Fatalf("Lookup via second handle = %+v, %v, %v", got, ok, err)
	}
	if err := b.Remove(ctx, "gone@x.test"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := a.Lookup(ctx, "gone@x.test"); ok {
		t.Error("first handle still sees a removed entry")
	}
	// No temporary files are left behind.
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(fi.Name(), ".tmp-") {
			t.Errorf("leftover temporary file %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestSuppressionDir_CorruptEntry(t *testing.T) {
	ctx := context.Background()
	s, err := OpenSuppressionDir(t.TempDir(), SuppressionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range []string{"bad@x.test", "good@x.test"} {
		if err := s.Add(ctx, Suppression{Addr: a}); err != nil {
			t.Fatal(err)
		}
	}
	_, file := s.path("bad@x.test")
	if err := os.WriteFile(file, []byte("{not json"), 0o640); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := s.Lookup(ctx, "bad@x.test"); err == nil || ok {
		t.Errorf("Lookup of a corrupt entry = %v, %v; want an error (the relay then fails open)", ok, err)
	}
	if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[good@x.test]" {
		t.Errorf("List = %v; a corrupt entry must not hide the others", got)
	}
}

func TestSuppressionDir_PruneDeletesExpiredFiles(t *testing.T) {
	ctx := context.Background()
	clock := newSuppressClock(time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC))
	dir := t.TempDir()
	s, err := OpenSuppressionDir(dir, SuppressionConfig{TTL: time.Hour, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	s.Add(ctx, Suppression{Addr: "old@x.test"})
	s.Add(ctx, Suppression{Addr: "new@x.test", Expires: clock.Now().Add(3 * time.Hour)})
	clock.Add(2 * time.Hour)
	n, err := s.Prune(ctx)
	if err != nil || n != 1 {
		t.Fatalf("Prune = %d, %v; want 1", n, err)
	}
	_, file := s.path("old@x.test")
	if _, err := os.Stat(file); !os.IsNotExist(err) {
		t.Errorf("expired file still present: %v", err)
	}
	if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[new@x.test]" {
		t.Errorf("List = %v", got)
	}
}

// TestSuppressionDir_OtherProcess adds an entry from a separate process
// (this test binary, re-executed) and checks that it is seen here.
func TestSuppressionDir_OtherProcess(t *testing.T) {
	if dir := os.Getenv("BATON_SUPPRESS_HELPER_DIR"); dir != "" {
		s, err := OpenSuppressionDir(dir, SuppressionConfig{})
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Add(context.Background(), Suppression{Addr: "from-child@x.test"}); err != nil {
			t.Fatal(err)
		}
		return
	}
	dir := t.TempDir()
	s, err := OpenSuppressionDir(dir, SuppressionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSuppressionDir_OtherProcess$")
	cmd.Env = append(os.Environ(), "BATON_SUPPRESS_HELPER_DIR="+dir)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("helper process: %v\n%s", err, out)
	}
	if _, ok, err := s.Lookup(context.Background(), "from-child@x.test"); !ok || err != nil {
		t.Errorf("entry added by another process not found: %v, %v", ok, err)
	}
}

func TestDSNOneLine(t *testing.T) {
	for _, tc := range []struct {
		in   string
		max  int
		want string
	}{
		{"a\r\nb\tc  d", 0, "a b c d"},
		{"  lead and trail \n", 0, "lead and trail"},
		{"abcdefghij", 8, "abcde..."},
		{"ääääää", 8, "ää..."},
	} {
		if got := dsnOneLine(tc.in, tc.max); got != tc.want {
			t.Errorf("dsnOneLine(%q, %d) = %q, want %q", tc.in, tc.max, got, tc.want)
		}
	}
}

func BenchmarkSuppressionDir_Lookup(b *testing.B) {
	ctx := context.Background()
	s, err := OpenSuppressionDir(b.TempDir(), SuppressionConfig{})
	if err != nil {
		b.Fatal(err)
	}
	for i := range 1000 {
		if err := s.Add(ctx, Suppression{Addr: fmt.Sprintf("u%d@x.test", i), Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}}); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("hit", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if _, ok, err := s.Lookup(ctx, fmt.Sprintf("u%d@x.test", i%1000)); !ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("miss", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if _, ok, err := s.Lookup(ctx, fmt.Sprintf("n%d@x.test", i)); ok || err != nil {
				b.Fatal(ok, err)
			}
		}
	})
	b.Run("add", func(b *testing.B) {
		for i := 0; b.Loop(); i++ {
			if err := s.Add(ctx, Suppression{Addr: fmt.Sprintf("a%d@x.test", i%100)}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func TestSuppressionMemory_Bounded(t *testing.T) {
	ctx := context.Background()
	clock := newSuppressClock(time.Date(2026, 11, 23, 0, 0, 0, 0, time.UTC))
	s := NewSuppressionMemory(SuppressionConfig{MaxEntries: 3, TTL: time.Hour, Now: clock.Now})
	for i, a := range []string{"a@x.test", "b@x.test", "c@x.test"} {
		s.Add(ctx, Suppression{Addr: a, Expires: clock.Now().Add(time.Duration(3-i) * time.Hour)})
	}
	// Full: the entry expiring soonest (c) makes room.
	s.Add(ctx, Suppression{Addr: "d@x.test"})
	if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[a@x.test b@x.test d@x.test]" {
		t.Errorf("after eviction: %v", got)
	}
	// Replacing an existing entry evicts nothing.
	s.Add(ctx, Suppression{Addr: "a@x.test"})
	if got := suppressListAddrs(t, s); len(got) != 3 {
		t.Errorf("after replace: %v", got)
	}
	// Expired entries go first, all of them.
	clock.Add(90 * time.Minute) // d and the new a (1h TTL) have expired
	s.Add(ctx, Suppression{Addr: "e@x.test"})
	if got := suppressListAddrs(t, s); fmt.Sprint(got) != "[b@x.test e@x.test]" {
		t.Errorf("after expiry eviction: %v", got)
	}
}
