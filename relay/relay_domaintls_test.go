package relay

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// DomainTLS holds for a domain that shares a route (a smarthost) with
// others: its recipients never ride in another domain's transaction.
func TestRelay_DomainTLS_OnSharedRoute_AppliesPerDomain(t *testing.T) {
	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Key: "route:smarthost", Hosts: []mx.Host{{Name: "smarthost.test"}}, TLS: mx.TLSOpportunistic}, nil
	})
	var mu sync.Mutex
	got := map[string]mx.TLSMode{}
	done := make(chan struct{}, 10)
	del := DelivererFunc(func(ctx context.Context, d *Delivery) *DeliveryResult {
		mu.Lock()
		for _, rc := range d.Rcpts {
			got[rc.Addr] = d.Route.TLS
		}
		mu.Unlock()
		r := &DeliveryResult{}
		for range d.Rcpts {
			r.Replies = append(r.Replies, queue.Reply{Code: 250})
		}
		done <- struct{}{}
		return r
	})
	r, err := New(Config{Resolver: res, Deliverer: del, DomainTLS: map[string]mx.TLSMode{"partner.test": mx.TLSVerified}})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())
	if _, err := r.Submit(context.Background(), &queue.Envelope{From: "a@sender.test", To: []queue.Recipient{{Addr: "x@other.test"}, {Addr: "y@partner.test"}}}, strings.NewReader("Subject: x\r\n\r\nhi\r\n")); err != nil {
		t.Fatal(err)
	}
	for {
		<-done
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n == 2 {
			break
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if got["x@other.test"] != mx.TLSOpportunistic {
		t.Fatalf("other.test recipient delivered with TLS mode %v, want the route's", got["x@other.test"])
	}
	if got["y@partner.test"] < mx.TLSVerified {
		t.Fatalf("partner.test recipient delivered with TLS mode %v; DomainTLS requires %v", got["y@partner.test"], mx.TLSVerified)
	}
}
