package relay

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/queue"
)

// Streams every relay has, configured or not.
const (
	// StreamTransactional is the default stream (queue.DefaultStream):
	// password resets, receipts, alerts; mail someone is waiting for.
	StreamTransactional = queue.DefaultStream
	// StreamBulk is for newsletters and campaigns: large batches whose
	// backlog must never delay transactional mail.
	StreamBulk = "bulk"
)

// StreamConfig sets how a relay delivers one mail stream.
//
// Every message belongs to a stream (queue.Envelope.StreamName). With a
// queue that implements queue.StreamLeaser each stream has its own lease
// loop and its own in-flight leases, its own share of the relay's workers,
// and its own per-destination concurrency slots and rate limiters: a bulk
// stream holding every slot to a domain leaves the transactional stream's
// slots to that domain free.
//
// How workers are shared: Config.Workers is the relay's total; Workers
// caps what one stream may use of it, and Reserved sets aside workers
// that only this stream may use. A stream takes a worker only while the
// free workers exceed the unused reserves of the other streams, so
// however many streams are busy, the reserve of an idle stream stays free
// for its first message. Reserving beats capping alone: caps that sum to
// less than the total would leave workers idle whenever transactional
// mail is quiet, while caps that sum to more (several bulk streams, or
// streams discovered in the queue) could together take every worker. The
// defaults: transactional may use all workers and has a quarter of them
// (at least one) reserved; every other stream may use half (at least one)
// and reserves none.
type StreamConfig struct {
	// Workers caps this stream's deliveries in progress, within
	// Config.Workers (larger values are lowered to it). Default:
	// Config.Workers for StreamTransactional, half of it (at least 1) for
	// any other stream.
	Workers int
	// Reserved is how many of Config.Workers only this stream may use,
	// even while it is idle (capped at Workers). Zero takes the default:
	// a quarter of Config.Workers (at least 1, unless Config.Workers is
	// 1) for StreamTransactional, none for other streams; a negative
	// value reserves none. New fails unless the reserves leave at least
	// one worker unreserved, for the streams without a reserve.
	Reserved int
	// MaxInFlight caps this stream's leased messages (default 4 ×
	// Workers, at most Config.MaxInFlight): messages waiting for a worker
	// or a destination slot hold a lease, so a stream cannot lease more
	// than it can deliver soon.
	MaxInFlight int
	// Limits are this stream's limits for every destination without an
	// entry in Destinations; zero fields take Config.Limits' values.
	Limits Limits
	// Destinations sets this stream's limits per domain or per route key,
	// as Config.Destinations does for every stream. For a destination the
	// most specific entry wins, and the stream's entry before the relay's
	// at the same level: the stream's domain entry, Config's domain
	// entry, the stream's route key entry, Config's route key entry, the
	// stream's Limits, Config.Limits. The limits are applied per stream:
	// MaxConcurrent 20 lets bulk and transactional each have 20
	// deliveries to the destination in progress.
	Destinations map[string]Limits
}

// ValidStreamName reports why name cannot name a stream, or nil; it is
// queue.ValidStreamName, the one rule for stream names.
func ValidStreamName(name string) error { return queue.ValidStreamName(name) }

// streamDiscovery is how often a relay looks for messages of streams it
// does not know (queue.Stats.ByStream), for example left from an earlier
// configuration or queued by another node, so that they are delivered
// with default settings.
const streamDiscovery = 30 * time.Second

// stream is one stream's share of the relay.
type stream struct {
	name  string
	cfg   StreamConfig // defaults applied
	sem   chan struct{}
	share *share
	slots chan struct{} // in-flight leases of the stream's own loop
}

// errUnknownStream answers a submission to a stream the relay does not
// deliver. RFC 3463 X.6.0 (other or undefined media error): the stream is
// a property of the message, chosen by its header (or, through Submit, by
// its envelope), and retrying the same message cannot help.
func errUnknownStream(name string) error {
	return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: fmt.Sprintf("Unknown mail stream %q", name)}
}

// HasStream reports whether Submit accepts messages of the named stream
// ("" is StreamTransactional): the built-in streams and those in
// Config.Streams. Streams found only in the queue are delivered but not
// accepted. The SMTP Server asks it to refuse an unknown stream before
// the message is submitted.
func (r *Relay) HasStream(name string) bool {
	_, ok := r.accepts[queue.StreamName(name)]
	return ok
}

// StreamChecker is implemented by Submitters that deliver only some
// streams, such as *Relay. The SMTP Server uses it to refuse a message
// whose stream header names an unknown stream with 554 5.6.0, and one
// whose identity is pinned to an unknown stream with 451 4.3.5.
type StreamChecker interface {
	HasStream(name string) bool
}

// or returns l with its zero fields taken from d.
func (l Limits) or(d Limits) Limits {
	if l.MaxConcurrent <= 0 {
		l.MaxConcurrent = d.MaxConcurrent
	}
	if l.Rate <= 0 {
		l.Rate = d.Rate
	}
	if l.Burst <= 0 {
		l.Burst = d.Burst
	}
	if l.MaxRcpts <= 0 {
		l.MaxRcpts = d.MaxRcpts
	}
	return l
}

// streamDefaults fills the zero fields of c for the stream name on a relay
// with workers workers and at most inFlight leases by default.
func streamDefaults(name string, c StreamConfig, workers, inFlight int) StreamConfig {
	if c.Workers <= 0 {
		c.Workers = workers
		if name != StreamTransactional {
			c.Workers = max(1, workers/2)
		}
	}
	c.Workers = min(c.Workers, workers)
	switch {
	case c.Reserved < 0:
		c.Reserved = 0
	case c.Reserved == 0 && name == StreamTransactional:
		c.Reserved = min(max(1, workers/4), workers-1)
	}
	c.Reserved = min(c.Reserved, c.Workers)
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = min(4*c.Workers, inFlight)
	}
	return c
}

// initStreams sets up the configured and built-in streams; loops start
// later, in startStreams.
func (r *Relay) initStreams() error {
	r.streams = make(map[string]*stream)
	r.accepts = make(map[string]struct{})
	r.pool = newWorkerPool(r.cfg.Workers)
	names := []string{StreamTransactional, StreamBulk}
	for n := range r.cfg.Streams {
		if n != StreamTransactional && n != StreamBulk {
			names = append(names, n)
		}
	}
	sort.Strings(names[2:])
	reserved := 0
	for _, n := range names {
		if err := ValidStreamName(n); err != nil {
			return err
		}
		c := streamDefaults(n, r.cfg.Streams[n], r.cfg.Workers, r.cfg.MaxInFlight)
		reserved += c.Reserved
		r.streams[n] = r.newStream(n, c)
		r.accepts[n] = struct{}{}
	}
	if reserved >= r.cfg.Workers {
		return fmt.Errorf("relay: streams reserve %d of the %d workers; at least one must stay unreserved", reserved, r.cfg.Workers)
	}
	return nil
}

func (r *Relay) newStream(name string, c StreamConfig) *stream {
	return &stream{name: name, cfg: c, sem: make(chan struct{}, c.Workers),
		share: r.pool.add(c.Reserved), slots: make(chan struct{}, c.MaxInFlight)}
}

// streamFor returns the named stream, adding it with default settings
// (and starting its lease loop, when streams have their own) if the relay
// did not know it.
func (r *Relay) streamFor(name string) *stream {
	name = queue.StreamName(name)
	r.smu.Lock()
	defer r.smu.Unlock()
	s := r.streams[name]
	if s != nil {
		return s
	}
	s = r.newStream(name, streamDefaults(name, StreamConfig{}, r.cfg.Workers, r.cfg.MaxInFlight))
	r.streams[name] = s
	r.log.Warn("delivering messages of an unconfigured stream with default settings", "stream", name)
	if r.leaser != nil && r.ctx.Err() == nil {
		r.startLoop(s)
	}
	return s
}

// startStreams starts the lease loops: one per stream, and a discovery
// loop, when the queue can lease by stream; otherwise one shared loop.
func (r *Relay) startStreams() {
	ls, ok := r.q.(queue.StreamLeaser)
	if !ok {
		r.log.Info("queue cannot lease by stream: all streams share one lease loop, so a backlog in one stream can delay the others")
		slots := make(chan struct{}, r.cfg.MaxInFlight)
		r.wg.Add(1)
		go r.schedule(slots, func(ctx context.Context, n int) ([]*queue.Lease, error) {
			return r.q.Lease(ctx, n, r.cfg.LeaseTime)
		}, nil)
		return
	}
	r.leaser = ls
	r.smu.Lock()
	for _, s := range r.streams {
		r.startLoop(s)
	}
	r.smu.Unlock()
	r.discoverStreams()
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		t := time.NewTicker(streamDiscovery)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				r.discoverStreams()
			case <-r.ctx.Done():
				return
			}
		}
	}()
}

// startLoop starts a stream's lease loop; the caller holds smu.
func (r *Relay) startLoop(s *stream) {
	r.wg.Add(1)
	go r.schedule(s.slots, func(ctx context.Context, n int) ([]*queue.Lease, error) {
		return r.leaser.LeaseStream(ctx, s.name, n, r.cfg.LeaseTime)
	}, s)
}

// discoverStreams starts loops for streams the queue holds messages of
// that the relay does not know.
func (r *Relay) discoverStreams() {
	ctx, cancel := context.WithTimeout(r.ctx, time.Minute)
	defer cancel()
	st, err := r.q.Stats(ctx)
	if err != nil {
		if r.ctx.Err() == nil && !errors.Is(err, queue.ErrClosed) {
			r.log.Warn("cannot look for streams in the queue", "err", err)
		}
		return
	}
	if st.ByStream == nil && len(st.ByState) > 0 {
		r.noStreamStats.Do(func() {
			r.log.Warn("the queue's Stats does not count messages by stream: messages of unconfigured streams are not found and not delivered")
		})
	}
	for name, n := range st.ByStream {
		if n > 0 {
			r.streamFor(name)
		}
	}
}

// workerPool shares the relay's workers between streams: a stream may
// take a worker only while the free workers exceed the reserves the other
// streams are not using (see StreamConfig). The per-stream caps are
// channels in front of it, so at most each stream's StreamConfig.Workers
// goroutines wait here per stream.
type workerPool struct {
	mu    sync.Mutex
	total int
	used  int
	// unused sums, over streams, the part of each reserve not in use.
	unused int
	wake   chan struct{} // closed and replaced when a worker is released
}

// share is one stream's account in a workerPool.
type share struct {
	reserved, used int
}

func newWorkerPool(total int) *workerPool {
	return &workerPool{total: total, wake: make(chan struct{})}
}

// add opens an account with reserved workers. Streams added after New
// (discovered ones) reserve none, so the reserves never exceed the total.
func (p *workerPool) add(reserved int) *share {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.unused += reserved
	return &share{reserved: reserved}
}

// acquire takes a worker for s, waiting until one may be taken or ctx is
// done.
func (p *workerPool) acquire(ctx context.Context, s *share) error {
	for {
		p.mu.Lock()
		own := 0
		if s.used < s.reserved {
			own = 1 // the worker comes out of s's own reserve
		}
		if p.total-p.used-(p.unused-own) > 0 {
			p.used++
			s.used++
			p.unused -= own
			p.mu.Unlock()
			return nil
		}
		wake := p.wake
		p.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// release gives back a worker taken by acquire for s.
func (p *workerPool) release(s *share) {
	p.mu.Lock()
	p.used--
	s.used--
	if s.used < s.reserved {
		p.unused++
	}
	close(p.wake)
	p.wake = make(chan struct{})
	p.mu.Unlock()
}

// acquireWorker takes one of the stream's workers and a worker of the
// relay; release gives both back.
func (r *Relay) acquireWorker(ctx context.Context, s *stream) (release func(), err error) {
	select {
	case s.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if err := r.pool.acquire(ctx, s.share); err != nil {
		<-s.sem
		return nil, err
	}
	return func() {
		r.pool.release(s.share)
		<-s.sem
	}, nil
}
