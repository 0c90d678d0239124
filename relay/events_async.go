package relay

import (
	"context"
	"sync"
	"sync/atomic"
)

// AsyncObserverConfig configures NewAsyncObserver. The zero value means
// defaults.
type AsyncObserverConfig struct {
	// Buffer is how many events may wait for the wrapped observer
	// (default 1024). When it is full, new events are dropped and counted.
	Buffer int
}

// AsyncObserver passes events to a slow Observer (a webhook, a remote
// metrics sink) on a goroutine of its own, so the relay's delivery path
// never waits for it. Observe never blocks: when the buffer is full the
// event is dropped and counted (see Dropped). Events reach the wrapped
// observer in the order they were observed, one at a time, with a context
// that keeps the values of the original but is never cancelled.
type AsyncObserver struct {
	next    Observer
	ch      chan asyncEvent
	done    chan struct{}
	mu      sync.RWMutex // guards closed against sends on a closed ch
	closed  bool
	dropped atomic.Int64
}

type asyncEvent struct {
	ctx context.Context
	e   Event
}

var _ Observer = (*AsyncObserver)(nil)

// NewAsyncObserver starts a goroutine that feeds next; Close stops it.
func NewAsyncObserver(next Observer, cfg AsyncObserverConfig) *AsyncObserver {
	if cfg.Buffer <= 0 {
		cfg.Buffer = 1024
	}
	if next == nil {
		next = Multi()
	}
	a := &AsyncObserver{next: next, ch: make(chan asyncEvent, cfg.Buffer), done: make(chan struct{})}
	go a.run()
	return a
}

func (a *AsyncObserver) run() {
	defer close(a.done)
	for ev := range a.ch {
		a.next.Observe(ev.ctx, ev.e)
	}
}

// Observe implements Observer without blocking.
func (a *AsyncObserver) Observe(ctx context.Context, e Event) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	if a.closed {
		a.dropped.Add(1)
		return
	}
	select {
	case a.ch <- asyncEvent{context.WithoutCancel(ctx), e}:
	default:
		a.dropped.Add(1)
	}
}

// Dropped returns how many events were dropped because the buffer was
// full or the observer was closed.
func (a *AsyncObserver) Dropped() int64 { return a.dropped.Load() }

// Close stops accepting events and waits until the buffered ones have
// been passed on, or until ctx is done (the rest are then passed on in the
// background). Calling Close again is harmless.
func (a *AsyncObserver) Close(ctx context.Context) error {
	a.mu.Lock()
	if !a.closed {
		a.closed = true
		close(a.ch)
	}
	a.mu.Unlock()
	select {
	case <-a.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
