package jetstream_test

import (
	"context"
	"flag"
	"testing"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
	"github.com/batonmail/baton/queue/queuetest"
)

// Flags that point the conformance suite at a NATS deployment of your own
// (for example the three-node cluster of docs/nats.md):
//
//	go test ./queue/jetstream -run External -nats.url nats://127.0.0.1:4222 \
//		-nats.user relay -nats.password change-me -nats.replicas 3
var (
	extURL      = flag.String("nats.url", "", "run the conformance suite against this NATS deployment too")
	extUser     = flag.String("nats.user", "", "user name for -nats.url")
	extPassword = flag.String("nats.password", "", "password for -nats.url")
	extReplicas = flag.Int("nats.replicas", 1, "replicas for the buckets made on -nats.url")
)

// extHarness uses a fresh prefix per case on the external deployment and
// deletes the case's streams afterwards.
type extHarness struct {
	t      *testing.T
	prefix string
	q      *jetstream.Queue
}

func (h *extHarness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	q, err := jetstream.Open(ctx, jetstream.Config{URL: *extURL, User: *extUser, Password: *extPassword,
		Prefix: h.prefix, Replicas: *extReplicas, Node: "conformance", Schedule: cfg.Schedule, Now: cfg.Now})
	h.q = q
	return q, err
}

func (h *extHarness) Close() {
	q, err := jetstream.Open(context.Background(), jetstream.Config{URL: *extURL, User: *extUser, Password: *extPassword, Prefix: h.prefix})
	if err != nil {
		h.t.Logf("cleaning up %s: %v", h.prefix, err)
		return
	}
	defer q.Close()
	if err := q.Destroy(context.Background()); err != nil {
		h.t.Logf("cleaning up %s: %v", h.prefix, err)
	}
}

func TestConformance_External(t *testing.T) {
	if *extURL == "" {
		t.Skip("no -nats.url given")
	}
	queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
		return &extHarness{t: t, prefix: "conf" + uniquePrefix()}
	})
}
