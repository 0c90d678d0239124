package relay

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// A final attempt that runs into the lease deadline (a tarpit) still gets
// its bounce queued: finish has time of its own within the lease.
func TestRelay_ExpiredAttemptHittingDeadline_StillBounced(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{Schedule: queue.Schedule{MaxAge: time.Millisecond}})
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Hosts: []mx.Host{{Name: "mx." + d}}}, nil
	})
	attempts := make(chan struct{}, 100)
	del := DelivererFunc(func(ctx context.Context, d *Delivery) *DeliveryResult {
		<-ctx.Done() // a tarpit: the attempt runs into the lease deadline
		attempts <- struct{}{}
		r := &DeliveryResult{}
		for range d.Rcpts {
			r.Replies = append(r.Replies, queue.Reply{Code: 451, Enhanced: "4.4.7", Text: "abandoned"})
		}
		return r
	})
	dsnSent := make(chan Event, 10)
	obs := ObserverFunc(func(ctx context.Context, e Event) {
		if e.Kind == EventDSNSent {
			dsnSent <- e
		}
	})
	r, err := New(Config{Queue: q, Resolver: res, Deliverer: del, LeaseTime: 1100 * time.Millisecond, Logger: stLogger(t), Observer: obs})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())
	if _, err := r.Submit(context.Background(), &queue.Envelope{From: "a@sender.test", To: []queue.Recipient{{Addr: "b@dest.test"}}}, strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-dsnSent:
		if e.Rcpt != "b@dest.test" || e.DSNID == "" {
			t.Fatalf("DSN event = %+v", e)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no DSN queued for the expired recipient")
	}
}
