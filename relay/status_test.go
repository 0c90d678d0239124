package relay

import (
	"context"
	"strings"
	"testing"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// Destinations counts a delivery in progress against its destination and
// reports the destination's limit.
func TestRelay_Destinations_ReportsInFlight(t *testing.T) {
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Hosts: []mx.Host{{Name: "mx." + d}}}, nil
	})
	started := make(chan struct{})
	release := make(chan struct{})
	del := DelivererFunc(func(ctx context.Context, d *Delivery) *DeliveryResult {
		started <- struct{}{}
		<-release
		r := &DeliveryResult{}
		for range d.Rcpts {
			r.Replies = append(r.Replies, queue.Reply{Code: 250})
		}
		return r
	})
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
