package jetstream_test

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
)

var clusterTests = flag.Bool("cluster", false, "run the tests on a three-node NATS cluster")

// startCluster runs three clustered NATS servers with JetStream on
// 127.0.0.1 and returns them with their client URLs.
func startCluster(t *testing.T) ([]*server.Server, []string) {
	t.Helper()
	// Pick the cluster ports first, so that every server's route list
	// names all three, as a configuration file would.
	var routes []*url.URL
	var ports []int
	for range 3 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		routes = append(routes, &url.URL{Scheme: "nats-route", Host: l.Addr().String()})
		l.Close()
	}
	var servers []*server.Server
	for i := range 3 {
		o := &server.Options{
			ServerName:             fmt.Sprintf("n%d", i+1),
			Host:                   "127.0.0.1",
			Port:                   server.RANDOM_PORT,
			JetStream:              true,
			StoreDir:               t.TempDir(),
			NoLog:                  true,
			NoSigs:                 true,
			DisableJetStreamBanner: true,
			Cluster:                server.ClusterOpts{Name: "baton-test", Host: "127.0.0.1", Port: ports[i]},
			Routes:                 routes,
		}
		s, err := server.NewServer(o)
		if err != nil {
			t.Fatal(err)
		}
		go s.Start()
		t.Cleanup(func() {
			s.Shutdown()
			s.WaitForShutdown()
		})
		servers = append(servers, s)
	}
	var urls []string
	for _, s := range servers {
		if !s.ReadyForConnections(20 * time.Second) {
			t.Fatal("nats cluster did not start")
		}
		urls = append(urls, s.ClientURL())
	}
	return servers, urls
}

// openWhenReady opens a queue, retrying while the cluster elects its
// JetStream leaders.
func openWhenReady(t *testing.T, cfg jetstream.Config) *jetstream.Queue {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		q, err := jetstream.Open(ctx, cfg)
		cancel()
		if err == nil {
			t.Cleanup(func() { q.Close() })
			return q
		}
		if time.Now().After(deadline) {
			t.Fatalf("Open on the cluster: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestCluster_ThreeReplicas_SurvivesServerLoss runs two queue processes
// connected to different servers of a three-node cluster with three
// replicas, checks that leases stay exclusive across servers, then shuts
// down a server and checks that nothing acknowledged was lost.
func TestCluster_ThreeReplicas_SurvivesServerLoss(t *testing.T) {
	if !*clusterTests {
		t.Skip("takes about 10 s of leader elections; run with -cluster")
	}
	servers, urls := startCluster(t)
	clock := newClock()
	prefix := uniquePrefix()
	a := openWhenReady(t, jetstream.Config{URL: urls[0], Prefix: prefix, Replicas: 3, Node: "a", Now: clock.Now, Schedule: testSchedule})
	b := openWhenReady(t, jetstream.Config{URL: urls[1] + "," + urls[2], Prefix: prefix, Replicas: 3, Node: "b", Now: clock.Now, Schedule: testSchedule})
	ctx := context.Background()

	const n = 20
	ids := map[queue.ID]bool{}
	for i := range n {
		q := a
		if i%2 == 1 {
			q = b
		}
		ids[enqueue(t, q, env(fmt.Sprintf("r%d@example.test", i)), fmt.Sprintf("body %d", i))] = true
	}
	// Both processes lease at once until every message is leased; each
	// message goes to exactly one. The deadline only bounds a hang.
	var mu sync.Mutex
	got := map[queue.ID]int{}
	lctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	var wg sync.WaitGroup
	for _, q := range []*jetstream.Queue{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for lctx.Err() == nil {
				ls, err := q.Lease(lctx, 4, time.Minute)
				if err != nil && lctx.Err() == nil {
					t.Logf("Lease: %v", err)
				}
				mu.Lock()
				for _, l := range ls {
					got[l.Message.ID]++
				}
				if len(got) == n {
					cancel()
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if errors.Is(lctx.Err(), context.DeadlineExceeded) {
		t.Fatalf("leased %d of %d messages", len(got), n)
	}
	cancel()
	for id, c := range got {
		if !ids[id] || c != 1 {
			t.Errorf("message %s leased %d times", id, c)
		}
	}

	// Lose the server a is connected to: a reconnects to the others it
	// learned from the cluster, and the replicas keep every message.
	servers[0].Shutdown()
	servers[0].WaitForShutdown()
	clock.Advance(2 * time.Minute) // every lease has expired
	eventually(t, 60*time.Second, func() error {
		listed := 0
		err := a.List(ctx, queue.Filter{}, func(m *queue.Message) error {
			listed++
			if m.State != queue.StateQueued {
				return fmt.Errorf("message %s is %v", m.ID, m.State)
			}
			return nil
		})
		if err == nil && listed != n {
			err = fmt.Errorf("listed %d of %d messages", listed, n)
		}
		return err
	})
	for id := range ids {
		eventually(t, 30*time.Second, func() error {
			rc, err := a.Open(ctx, id)
			if err != nil {
				return err
			}
			defer rc.Close()
			body, err := io.ReadAll(rc)
			if err == nil && !strings.HasPrefix(string(body), "body ") {
				t.Fatalf("body of %s is %q", id, body)
			}
			return err
		})
	}
	settled := 0
	eventually(t, 60*time.Second, func() error {
		lctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		ls, err := a.Lease(lctx, n, time.Minute)
		for _, l := range ls {
			if _, err := a.Settle(ctx, l, []queue.Outcome{{Rcpt: l.Message.Envelope.To[0].Addr, Result: queue.Delivered}}); err != nil {
				t.Logf("Settle: %v", err)
				continue
			}
			settled++
		}
		if err == nil && settled < n {
			err = fmt.Errorf("settled %d of %d", settled, n)
		}
		return err
	})
}

// eventually retries fn until it returns nil, failing the test with its
// last error after limit.
func eventually(t *testing.T, limit time.Duration, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
