package queue_test

import (
	"context"
	"testing"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/queuetest"
)

// memHarness runs the suite on Memory, which is not durable.
type memHarness struct{}

func (memHarness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	return queue.NewMemory(queue.MemoryConfig{Schedule: cfg.Schedule, Now: cfg.Now}), nil
}

func (memHarness) Close() {}

func TestMemory_Conformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{}, func(t *testing.T) queuetest.Harness { return memHarness{} })
}

// dirHarness runs the suite on Dir in a fresh directory, with real syncs.
type dirHarness struct{ path string }

func (h *dirHarness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	return queue.OpenDir(queue.DirConfig{Path: h.path, Schedule: cfg.Schedule, Now: cfg.Now})
}

func (h *dirHarness) Close() {}

func TestDir_Conformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
		return &dirHarness{path: t.TempDir()}
	})
}

func TestDir_FileSync_Conformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true, LargeBody: 1 << 20}, func(t *testing.T) queuetest.Harness {
		return &dirFileSyncHarness{path: t.TempDir()}
	})
}

type dirFileSyncHarness struct{ path string }

func (h *dirFileSyncHarness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	return queue.OpenDir(queue.DirConfig{Path: h.path, Schedule: cfg.Schedule, Now: cfg.Now, FileSync: true})
}

func (h *dirFileSyncHarness) Close() {}

// TestDir_NoJournal_Conformance runs the suite on Dir writing every
// message to a file of its own.
func TestDir_NoJournal_Conformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
		return &dirCfgHarness{cfg: queue.DirConfig{Path: t.TempDir(), NoJournal: true}}
	})
}

// TestDir_SmallJournal_Conformance runs the suite on Dir with journal
// segments so small that the suite's messages roll over, recycle and
// checkpoint them all the time.
func TestDir_SmallJournal_Conformance(t *testing.T) {
	queuetest.Run(t, queuetest.Capabilities{Durable: true}, func(t *testing.T) queuetest.Harness {
		return &dirCfgHarness{cfg: queue.DirConfig{Path: t.TempDir(), JournalSegmentSize: 64 << 10, JournalSegments: 2}}
	})
}

type dirCfgHarness struct{ cfg queue.DirConfig }

func (h *dirCfgHarness) Open(ctx context.Context, cfg queuetest.Config) (queue.Queue, error) {
	c := h.cfg
	c.Schedule, c.Now = cfg.Schedule, cfg.Now
	return queue.OpenDir(c)
}

func (h *dirCfgHarness) Close() {}
