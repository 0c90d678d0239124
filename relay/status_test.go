package relay

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// Destinations counts a delivery in progress against its destination and
// reports the destination's limit.
func TestRelay_Destinations_ReportsInFlight(t *testing.T) {
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Hosts: []mx.Host{{Name: "mx." + d}}}, nil
	})
	del, started, release := heldDeliverer()
	r, err := New(Config{Resolver: res, Deliverer: del, Limits: Limits{MaxConcurrent: 3}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())
	if got := r.Destinations(); len(got) != 0 {
		t.Fatalf("Destinations before any delivery = %+v", got)
	}
	if _, err := r.Submit(context.Background(), &queue.Envelope{From: "a@sender.test", To: []queue.Recipient{{Addr: "x@dest.test"}}}, strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	<-started
	got := r.Destinations()
	close(release)
	want := []DestinationStatus{{Stream: queue.DefaultStream, Key: "mx:dest.test", InFlight: 1, Max: 3}}
	if len(got) != 1 || got[0] != want[0] {
		t.Fatalf("Destinations during delivery = %+v, want %+v", got, want)
	}
}

// A domain with a TLS requirement of its own gets a group of its own
// ("route:smart|domain:tls.test"), but its limits are still the route's:
// the relay's route entry, and a stream's route entry before it.
func TestRelay_OwnTLSDomainKeepsRouteLimits(t *testing.T) {
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Key: "route:smart", Hosts: []mx.Host{{Name: "smart.test"}}}, nil
	})
	del, started, release := heldDeliverer()
	r, err := New(Config{Resolver: res, Deliverer: del, Limits: Limits{MaxConcurrent: 7},
		DomainTLS:    map[string]mx.TLSMode{"tls.test": mx.TLSRequired},
		Destinations: map[string]Limits{"route:smart": {MaxConcurrent: 2}},
		Streams:      map[string]StreamConfig{StreamBulk: {Destinations: map[string]Limits{"route:smart": {MaxConcurrent: 1}}}}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())
	for _, tc := range []struct {
		stream string
		max    int
	}{{"", 2}, {StreamBulk, 1}} {
		env := &queue.Envelope{From: "a@sender.test", To: []queue.Recipient{{Addr: "x@tls.test"}}, Stream: tc.stream}
		if _, err := r.Submit(context.Background(), env, strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
			t.Fatal(err)
		}
		<-started
		got := r.Destinations()
		release <- struct{}{}
		found := false
		for _, d := range got {
			if d.Stream == env.StreamName() {
				found = true
				if d.Key != "route:smart|domain:tls.test" || d.Max != tc.max {
					t.Errorf("stream %s: %+v, want key route:smart|domain:tls.test with max %d", env.StreamName(), d, tc.max)
				}
			}
		}
		if !found {
			t.Errorf("stream %s: no destination in %+v", env.StreamName(), got)
		}
	}
}

// heldDeliverer returns a Deliverer that reports each delivery on started
// and accepts its recipients once release is sent to (or closed).
func heldDeliverer() (del Deliverer, started, release chan struct{}) {
	started, release = make(chan struct{}), make(chan struct{})
	del = DelivererFunc(func(ctx context.Context, d *Delivery) *DeliveryResult {
		started <- struct{}{}
		<-release
		r := &DeliveryResult{}
		for range d.Rcpts {
			r.Replies = append(r.Replies, queue.Reply{Code: 250})
		}
		return r
	})
	return del, started, release
}

// Batches that hold a destination slot while they wait for a worker of
// their stream are not in flight: with bulk's single worker busy, the
// destination reports one delivery in flight although three batches hold
// its slots.
func TestRelay_Destinations_WaitingForWorkerIsNotInFlight(t *testing.T) {
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Hosts: []mx.Host{{Name: "mx." + d}}}, nil
	})
	del, started, release := heldDeliverer()
	r, err := New(Config{Resolver: res, Deliverer: del, Limits: Limits{MaxConcurrent: 5},
		Streams: map[string]StreamConfig{StreamBulk: {Workers: 1}}})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		// The waiting batches report their start once a worker is free.
		done := make(chan struct{})
		go func() {
			defer close(done)
			for range started {
			}
		}()
		close(release)
		r.Shutdown(context.Background())
		close(started)
		<-done
	}()
	for i := range 3 {
		env := &queue.Envelope{From: "a@sender.test", To: []queue.Recipient{{Addr: fmt.Sprintf("x%d@dest.test", i)}}, Stream: StreamBulk}
		if _, err := r.Submit(context.Background(), env, strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
			t.Fatal(err)
		}
	}
	<-started
	// Wait until the two other batches hold their slots.
	for {
		r.mu.Lock()
		d := r.dests[destKey{StreamBulk, "mx:dest.test"}]
		held := 0
		if d != nil {
			held = len(d.sem)
		}
		r.mu.Unlock()
		if held == 3 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	got := r.Destinations()
	want := DestinationStatus{Stream: StreamBulk, Key: "mx:dest.test", InFlight: 1, Max: 5}
	if len(got) != 1 || got[0] != want {
		t.Fatalf("Destinations = %+v, want %+v", got, want)
	}
}
