package policy

import (
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"
)

func newTestThrottle(clk *clock, logs *logRecorder, cfg AuthThrottleConfig) *AuthThrottle {
	cfg.Now, cfg.Sleep = clk.Now, clk.Sleep
	cfg.Logger = slog.New(logs)
	return NewAuthThrottle(&cfg)
}

func TestAuthThrottle_DelayDisconnectBlock(t *testing.T) {
	clk, logs := newClock(), &logRecorder{}
	p := newTestThrottle(clk, logs, AuthThrottleConfig{Delay: time.Second, MaxDelay: 4 * time.Second, MaxPerConn: 3, BlockAfter: 5, Window: 10 * time.Minute, BlockFor: 15 * time.Minute})
	const ip = "203.0.113.9"

	// Connection 1: two failures are delayed, the third ends the connection.
	c1 := unauth(ip)
	want(t, "connect 1", p.Connect(ctx, c1), "ok")
	want(t, "fail 1", p.Auth(ctx, c1, "alice", false), "ok")
	want(t, "fail 2", p.Auth(ctx, c1, "alice", false), "ok")
	want(t, "fail 3", p.Auth(ctx, c1, "bob", false), "421 4.7.0")
	if got := clk.takeSleeps(); !slices.Equal(got, []time.Duration{time.Second, 2 * time.Second}) {
		t.Fatalf("delays = %v, want [1s 2s]", got)
	}

	// Connection 2: the address's count goes on (delays keep growing,
	// capped), and the fifth failure blocks the address.
	c2 := unauth(ip)
	want(t, "connect 2", p.Connect(ctx, c2), "ok")
	want(t, "success does not reset", p.Auth(ctx, c2, "carol", true), "ok")
	want(t, "fail 4", p.Auth(ctx, c2, "alice", false), "ok")
	if got := clk.takeSleeps(); !slices.Equal(got, []time.Duration{4 * time.Second}) {
		t.Fatalf("delays = %v, want [4s] (capped at MaxDelay)", got)
	}
	want(t, "fail 5 blocks", p.Auth(ctx, c2, "alice", false), "421 4.7.0")
	if until, blocked := p.Blocked(c2.Addr); !blocked || !until.Equal(clk.Now().Add(15*time.Minute)) {
		t.Fatalf("Blocked = %v, %v", until, blocked)
	}

	// While blocked: refused at Connect, and even a correct AUTH on a
	// connection that was already open is refused.
	want(t, "connect while blocked", p.Connect(ctx, unauth(ip)), "421 4.7.0")
	want(t, "connect while blocked (mapped)", p.Connect(ctx, unauth("::ffff:"+ip)), "421 4.7.0")
	want(t, "correct AUTH while blocked", p.Auth(ctx, c2, "alice", true), "421 4.7.0")
	want(t, "other address", p.Connect(ctx, unauth("203.0.113.10")), "ok")

	clk.Add(15 * time.Minute)
	want(t, "connect after block", p.Connect(ctx, unauth(ip)), "ok")
	c3 := unauth(ip)
	want(t, "success after block", p.Auth(ctx, c3, "alice", true), "ok")
	want(t, "fail after block starts over", p.Auth(ctx, c3, "alice", false), "ok")
	if got := clk.takeSleeps(); !slices.Equal(got, []time.Duration{time.Second}) {
		t.Fatalf("delays after block = %v, want [1s]", got)
	}

	// Every failure was logged with the client address.
	if n := logs.count("policy: AUTH failed", "addr", ip); n != 6 {
		t.Fatalf("logged %d failures with addr=%s, want 6", n, ip)
	}
}

func TestAuthThrottle_FailuresFadeAfterWindow(t *testing.T) {
	clk, logs := newClock(), &logRecorder{}
	p := newTestThrottle(clk, logs, AuthThrottleConfig{MaxPerConn: 100, BlockAfter: 3, Window: time.Minute})
	for i := range 10 {
		c := unauth("198.51.100.3")
		want(t, fmt.Sprintf("slow failure %d", i), p.Auth(ctx, c, "x", false), "ok")
		want(t, fmt.Sprintf("slow failure %d twice", i), p.Auth(ctx, c, "x", false), "ok")
		clk.Add(time.Minute)
	}
	if _, blocked := p.Blocked(unauth("198.51.100.3").Addr); blocked {
		t.Fatal("blocked although failures were a window apart")
	}
}

func TestAuthThrottle_ContextCancelledDuringDelay(t *testing.T) {
	p := NewAuthThrottle(&AuthThrottleConfig{Delay: time.Hour})
	cctx, cancel := contextWithCancel()
	cancel()
	if err := p.Auth(cctx, unauth("198.51.100.4"), "x", false); err == nil {
		t.Fatal("an hour's delay ignored a cancelled context")
	}
}

func TestAuthThrottle_MemoryBounded(t *testing.T) {
	clk, logs := newClock(), &logRecorder{}
	p := newTestThrottle(clk, logs, AuthThrottleConfig{MaxEntries: 20, Window: time.Minute, BlockFor: time.Minute})
	for i := range 500 {
		p.Auth(ctx, unauth(fmt.Sprintf("10.1.%d.%d", i/256, i%256)), "x", false)
		if n := p.Len(); n > 20 {
			t.Fatalf("%d entries, max 20", n)
		}
	}
	clk.Add(2 * time.Minute)
	for range 20 {
		p.Auth(ctx, unauth("192.0.2.99"), "x", true)
	}
	if n := p.Len(); n > 0 {
		t.Fatalf("%d entries remain after all faded", n)
	}
	// In-process callers are never throttled.
	for range 10 {
		want(t, "in-process", p.Auth(ctx, &Client{}, "x", false), "ok")
	}
}
