package prommetrics

import (
	"context"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// BenchmarkObserve is the cost the exporter adds to each recipient event
// and each delivery attempt on the relay's hot path.
func BenchmarkObserve(b *testing.B) {
	m := New(Config{NoRuntime: true})
	ctx := context.Background()
	e := relay.Event{Kind: relay.EventDelivered, Stream: "transactional", Dest: "mx:example.com"}
	res := &relay.DeliveryResult{Host: "mx.example.com", Replies: []queue.Reply{{Code: 250}}}
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.Observe(ctx, e)
			m.DeliveryAttempt(e.Dest, 30*time.Millisecond, res)
			m.ServerReply(250)
		}
	})
}
