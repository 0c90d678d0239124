package relay_test

import (
	"context"
	"fmt"
	"log"
	"strings"
	"time"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// ExampleNew is the README's embedding example: a relay with a zero
// Config (in-memory queue, DNS from the system) and one submission.
func ExampleNew() {
	ctx := context.Background()
	r, err := relay.New(relay.Config{}) // in-memory queue, system DNS
	if err != nil {
		log.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	id, err := r.Submit(ctx, &queue.Envelope{
		From: "app@example.com",
		To:   []queue.Recipient{{Addr: "user@example.net"}},
	}, strings.NewReader("From: app@example.com\r\nTo: user@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"))
	if err != nil {
		log.Fatal(err)
	}
	log.Printf("queued as %s", id)
}

// ExampleNew_stages replaces the resolver and the deliverer: a host
// program's own routing and transport, here a function that prints what it
// would send.
func ExampleNew_stages() {
	delivered := make(chan struct{})
	r, err := relay.New(relay.Config{
		Resolver: mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
			return &mx.Route{Domain: domain, Key: "route:outbound", Hosts: []mx.Host{{Name: "smtp.example.net"}}}, nil
		}),
		Deliverer: relay.DelivererFunc(func(ctx context.Context, d *relay.Delivery) *relay.DeliveryResult {
			res := &relay.DeliveryResult{Host: d.Route.Hosts[0].Name}
			for _, rc := range d.Rcpts {
				fmt.Printf("deliver %s via %s\n", rc.Addr, d.Route.Hosts[0].Name)
				res.Replies = append(res.Replies, queue.Reply{Code: 250, Enhanced: "2.0.0", Text: "OK"})
			}
			close(delivered)
			return res
		}),
	})
	if err != nil {
		log.Fatal(err)
	}
	_, err = r.Submit(context.Background(), &queue.Envelope{
		From: "app@example.com",
		To:   []queue.Recipient{{Addr: "user@example.net"}},
	}, strings.NewReader("Subject: hi\r\n\r\nHello.\r\n"))
	if err != nil {
		log.Fatal(err)
	}
	<-delivered
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.Shutdown(ctx)
	// Output: deliver user@example.net via smtp.example.net
}
