package jetstream_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
)

// natsOpts changes the options of a test server before it starts.
type natsOpts func(o *server.Options)

// startNATS runs an in-process NATS server with JetStream on 127.0.0.1 and
// a random port, storing in a temporary directory, and returns its URL. The
// server shuts down when the test ends.
func startNATS(t testing.TB, mods ...natsOpts) string {
	t.Helper()
	o := &server.Options{
		Host:                   "127.0.0.1",
		Port:                   server.RANDOM_PORT,
		JetStream:              true,
		StoreDir:               t.TempDir(),
		NoLog:                  true,
		NoSigs:                 true,
		DisableJetStreamBanner: true,
	}
	for _, m := range mods {
		m(o)
	}
	s, err := server.NewServer(o)
	if err != nil {
		t.Fatalf("nats server: %v", err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return s.ClientURL()
}

var prefixes atomic.Int64

// uniquePrefix returns a bucket prefix no other test in the process uses.
func uniquePrefix() string {
	return fmt.Sprintf("t%d", prefixes.Add(1))
}

// testClock is a settable clock.
type testClock struct {
	ns atomic.Int64
}

func newClock() *testClock {
	c := &testClock{}
	c.ns.Store(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *testClock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *testClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// testSchedule has no jitter, so retry times are exact.
var testSchedule = queue.Schedule{Min: time.Minute, Max: 8 * time.Minute, Factor: 2, Jitter: -1, MaxAge: time.Hour}

// openQueue opens a queue (with its own connection) on url with cfg's
// settings and closes it when the test ends.
func openQueue(t testing.TB, url string, cfg jetstream.Config) *jetstream.Queue {
	t.Helper()
	cfg.URL = url
	if cfg.Prefix == "" {
		t.Fatal("openQueue: set a prefix")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := jetstream.Open(ctx, cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}
