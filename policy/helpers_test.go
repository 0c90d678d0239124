package policy

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// reply formats a hook's result as "code enhanced", "ok" for nil, or
// "not an *smtp.SMTPError" for anything go-smtp would not send as is.
func reply(err error) string {
	if err == nil {
		return "ok"
	}
	se, isSMTP := err.(*smtp.SMTPError) // deliberately no errors.As: go-smtp does not unwrap
	if !isSMTP {
		return fmt.Sprintf("not an *smtp.SMTPError: %v", err)
	}
	e := se.EnhancedCode
	return fmt.Sprintf("%d %d.%d.%d", se.Code, e[0], e[1], e[2])
}

func want(t *testing.T, what string, err error, code string) {
	t.Helper()
	if got := reply(err); got != code {
		t.Errorf("%s: got %s, want %s", what, got, code)
	}
}

var ctx = context.Background()

func unauth(addr string) *Client {
	return &Client{Addr: netip.MustParseAddr(addr), HELO: "client.test"}
}

func authed(name string) *Client {
	return &Client{Addr: netip.MustParseAddr("192.0.2.50"), Authenticated: true, Identity: name, TLS: true}
}

// clock is a settable clock; Sleep records the delays asked for and
// returns at once.
type clock struct {
	mu     sync.Mutex
	t      time.Time
	sleeps []time.Duration
}

func newClock() *clock { return &clock{t: time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func (c *clock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	c.sleeps = append(c.sleeps, d)
	c.mu.Unlock()
	return ctx.Err()
}

func (c *clock) takeSleeps() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sleeps
	c.sleeps = nil
	return s
}

// logRecorder is a slog handler that keeps records for assertions.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	h.records = append(h.records, r.Clone())
	h.mu.Unlock()
	return nil
}
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecorder) WithGroup(string) slog.Handler      { return h }

// count returns how many records have message msg and an attribute key
// whose value prints as val.
func (h *logRecorder) count(msg, key, val string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.records {
		if r.Message != msg {
			continue
		}
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == key && a.Value.String() == val {
				n++
				return false
			}
			return true
		})
	}
	return n
}

func contextWithCancel() (context.Context, context.CancelFunc) {
	return context.WithCancel(context.Background())
}
