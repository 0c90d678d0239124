package boltqueue_test

import (
	"context"
	"path/filepath"
	"testing"

	"github.com/batonmail/baton/examples/boltqueue"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/queuetest"
)

// harness opens the bbolt backend on a database file private to one case.
type harness struct{ path string }

func (h *harness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	return boltqueue.Open(boltqueue.Config{Path: h.path, Schedule: cfg.Schedule, Now: cfg.Now})
}

func (h *harness) Close() {}

func TestConformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true, LargeBody: 4 << 20}, func(t *testing.T) queuetest.Harness {
		return &harness{path: filepath.Join(t.TempDir(), "queue.db")}
	})
}
