package jetstream_test

import (
	"context"
	"testing"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
	"github.com/batonmail/baton/queue/queuetest"
)

// harness gives each conformance case its own NATS server (storage in the
// case's temporary directory) and bucket prefix.
type harness struct {
	url    string
	prefix string
}

func (h *harness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	return jetstream.Open(ctx, jetstream.Config{URL: h.url, Prefix: h.prefix, Node: "conformance", Schedule: cfg.Schedule, Now: cfg.Now})
}

func (h *harness) Close() {}

func TestConformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
		return &harness{url: startNATS(t), prefix: uniquePrefix()}
	})
}
