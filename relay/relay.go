package relay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/time/rate"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// Signer signs a message at submission. Sign reads the whole message once
// and returns header fields to prepend (nil when it has nothing to add).
// *dkim.Signer implements it.
type Signer interface {
	Sign(ctx context.Context, msg io.Reader) ([]byte, error)
}

// Limits bound delivery to one destination (a domain, or a static route
// shared by several domains).
type Limits struct {
	// MaxConcurrent caps simultaneous deliveries (and so connections) to
	// the destination; default 20, as Postfix.
	MaxConcurrent int
	// Rate caps messages per second to the destination; 0 means no limit.
	Rate float64
	// Burst is the number of messages that may go at once under Rate
	// (default 1).
	Burst int
	// MaxRcpts caps recipients per SMTP transaction; a message with more
	// recipients at the destination is sent in several transactions
	// (default 100, RFC 5321 §4.5.3.1.8's minimum).
	MaxRcpts int
}

func (l Limits) withDefaults() Limits {
	if l.MaxConcurrent <= 0 {
		l.MaxConcurrent = 20
	}
	if l.Burst <= 0 {
		l.Burst = 1
	}
	if l.MaxRcpts <= 0 {
		l.MaxRcpts = 100
	}
	return l
}

// Config wires a Relay. The zero Config works: an in-memory queue, DNS from
// /etc/resolv.conf, and the SMTP deliverer.
type Config struct {
	// Hostname is used in EHLO, DSNs and logs; default os.Hostname.
	Hostname string
	// Queue keeps accepted mail; nil means an in-memory queue.
	Queue queue.Queue
	// Resolver finds destinations; nil means mx.NewDNS with the system's
	// resolver configuration.
	Resolver mx.Resolver
	// Deliverer talks to destinations; nil means an SMTPDeliverer.
	Deliverer Deliverer
	// Signer, when set, signs every submitted message before it is queued
	// (DKIM).
	Signer Signer
	// Observer receives delivery events; nil means SlogObserver(Logger).
	Observer Observer
	// Metrics receives every event too, and each delivery attempt's
	// duration; nil means NopMetrics.
	Metrics Metrics
	// Suppressions, when set, fails recipients that failed permanently
	// before, and records new permanent "no such user" failures.
	Suppressions Suppressions
	// Logger receives the relay's own logs; nil discards them.
	Logger *slog.Logger

	// Workers caps deliveries in progress across all destinations and
	// streams (default 100); Streams share it out.
	Workers int
	// MaxInFlight caps leased messages (default 4 × Workers) when the
	// queue cannot lease by stream (queue.StreamLeaser) and every stream
	// shares one lease loop; otherwise each stream has its own
	// StreamConfig.MaxInFlight, which this bounds by default.
	MaxInFlight int
	// Streams configures mail streams by name (see StreamConfig and
	// ValidStreamName). StreamTransactional and StreamBulk always exist,
	// with default settings unless they have an entry here. Submit
	// accepts only messages of these streams; messages of other streams
	// found in the queue are still delivered, with default settings.
	Streams map[string]StreamConfig
	// LeaseTime is how long a worker owns a leased message (default 15
	// minutes; longer than the slowest delivery's timeouts).
	LeaseTime time.Duration
	// Limits applies to every destination without an entry in
	// Destinations.
	Limits Limits
	// Destinations sets limits per domain or per route key ("mx:domain",
	// "route:name"); a domain entry wins over the route key's.
	Destinations map[string]Limits
	// DomainTLS raises (or, with mx.TLSNone, lowers) the TLS requirement
	// for recipient domains, whatever the resolver said: for example
	// mx.TLSVerified for a partner that must never get plaintext.
	DomainTLS map[string]mx.TLSMode
	// DelayWarning, when positive, sends a delay DSN once a message has
	// waited this long for a recipient that keeps failing temporarily.
	DelayWarning time.Duration
	// DSN configures generated bounces; zero fields take defaults from
	// Hostname.
	DSN DSNConfig
	// SpoolMemory is how much of a message Submit buffers in memory
	// when it must read the message twice (DKIM signing) before spilling
	// to a temporary file in SpoolDir (default 1 MiB, os.TempDir()).
	SpoolMemory int64
	SpoolDir    string
	// RouteCacheTTL keeps successful route lookups this long (default 1
	// minute; negative disables the cache).
	RouteCacheTTL time.Duration
}

// Relay is the pipeline: it accepts messages (Submit), keeps them in the
// queue, and delivers them in the background until every recipient is
// delivered, failed (and bounced) or expired (and bounced).
type Relay struct {
	// deep runs deliveries (see stackPool).
	deep     *stackPool
	cfg      Config
	q        queue.Queue
	resolver mx.Resolver
	deliver  Deliverer
	obs      Observer
	metrics  Metrics
	log      *slog.Logger
	ownQueue bool
	ownDeliv interface{ Close() error }

	ctx    context.Context // cancelled by Shutdown to stop leasing
	cancel context.CancelFunc
	hard   context.Context // cancelled when Shutdown's deadline passes
	hardC  context.CancelFunc
	wg     sync.WaitGroup

	pool    *workerPool        // deliveries in progress, shared by streams
	leaser  queue.StreamLeaser // nil: one lease loop for every stream
	smu     sync.Mutex
	streams map[string]*stream
	// accepts holds the streams Submit accepts (built in or in
	// Config.Streams). It is set by New and only read after, without a
	// lock: streams found later are added to streams only.
	accepts map[string]struct{}
	// noStreamStats warns once about a queue whose Stats lacks ByStream.
	noStreamStats sync.Once

	mu    sync.Mutex
	dests map[destKey]*destination
	cache map[string]routeEntry
}

// maxDestinations is how many destinations the relay remembers before it
// forgets idle ones.
const maxDestinations = 10000

type destination struct {
	sem     chan struct{}
	limiter *rate.Limiter
	// active counts the deliveries in progress: a batch takes its slot
	// in sem before it waits for the rate limiter and a worker, so
	// len(sem) also counts batches that are not being delivered yet.
	active atomic.Int32
}

type routeEntry struct {
	route *mx.Route
	until time.Time
}

var _ Submitter = (*Relay)(nil)

// New wires a relay from cfg and starts delivering. Call Shutdown to stop.
func New(cfg Config) (*Relay, error) {
	if cfg.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		cfg.Hostname = h
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 100
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 4 * cfg.Workers
	}
	if cfg.LeaseTime <= 0 {
		cfg.LeaseTime = 15 * time.Minute
	}
	if cfg.SpoolMemory <= 0 {
		cfg.SpoolMemory = 1 << 20
	}
	if cfg.RouteCacheTTL == 0 {
		cfg.RouteCacheTTL = time.Minute
	}
	if cfg.DSN.ReportingMTA == "" {
		cfg.DSN.ReportingMTA = cfg.Hostname
	}
	r := &Relay{cfg: cfg, q: cfg.Queue, resolver: cfg.Resolver, deliver: cfg.Deliverer, obs: cfg.Observer, log: cfg.Logger,
		dests: make(map[destKey]*destination), cache: make(map[string]routeEntry),
		deep: newStackPool(10 * time.Second)}
	if r.q == nil {
		r.q = queue.NewMemory(queue.MemoryConfig{})
		r.ownQueue = true
	}
	if r.resolver == nil {
		d, err := mx.NewDNS(mx.DNSConfig{Logger: cfg.Logger})
		if err != nil {
			return nil, fmt.Errorf("relay: default resolver: %w", err)
		}
		r.resolver = d
	}
	if r.deliver == nil {
		d := NewSMTPDeliverer(SMTPDelivererConfig{Hostname: cfg.Hostname, Logger: cfg.Logger, MaxConns: max(200, cfg.Workers)})
		r.deliver, r.ownDeliv = d, d
	}
	if r.obs == nil {
		r.obs = SlogObserver(cfg.Logger)
	}
	r.metrics = cfg.Metrics
	if r.metrics == nil {
		r.metrics = NopMetrics{}
	} else {
		r.obs = Multi(r.obs, r.metrics)
	}
	if err := r.initStreams(); err != nil {
		if r.ownDeliv != nil {
			r.ownDeliv.Close()
		}
		if r.ownQueue {
			r.q.Close()
		}
		return nil, err
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.hard, r.hardC = context.WithCancel(context.Background())
	r.startStreams()
	return r, nil
}

// Queue returns the relay's queue, for administration.
func (r *Relay) Queue() queue.Queue { return r.q }

// Submit implements Submitter: it signs the message when a Signer is
// configured, stores it, and returns its ID once it is durable. A message
// of a stream the relay does not deliver (see HasStream) is refused with
// 554 5.6.0.
func (r *Relay) Submit(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
	start := time.Now()
	if err := env.Validate(); err != nil {
		return "", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 4}, Message: "Invalid envelope"}
	}
	if !r.HasStream(env.Stream) {
		return "", errUnknownStream(env.Stream)
	}
	var size int64
	if r.cfg.Signer != nil {
		sp, err := r.spool(ctx, body)
		if err != nil {
			return "", err
		}
		defer sp.Close()
		rd, err := sp.Reader()
		if err != nil {
			return "", err
		}
		sig, err := r.cfg.Signer.Sign(ctx, rd)
		if err != nil {
			// A message we cannot sign is still the sender's mail: queue
			// it unsigned rather than refuse it, and say so in the log.
			r.log.WarnContext(ctx, "signing failed; queueing unsigned", "from", env.From, "err", err)
			sig = nil
		}
		rd, err = sp.Reader()
		if err != nil {
			return "", err
		}
		body = io.MultiReader(bytes.NewReader(sig), rd)
	}
	cr := &countReader{r: body}
	id, err := r.q.Enqueue(ctx, env, cr)
	if err != nil {
		return "", err
	}
	size = cr.n
	for _, rc := range env.To {
		r.obs.Observe(ctx, Event{Kind: EventAccepted, Time: time.Now(), ID: id, From: env.From, Rcpt: rc.Addr, Identity: env.Identity, Size: size, Duration: time.Since(start), Stream: env.StreamName()})
	}
	return id, nil
}

type countReader struct {
	r io.Reader
	n int64
}

func (c *countReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Shutdown stops leasing new messages and waits for deliveries in progress
// to finish. When ctx is done first it cancels them: they are recorded as
// temporary failures (or, if even that fails, their leases expire) and
// delivered again later; it returns ctx.Err(). The queue is
// closed only if the relay created it.
func (r *Relay) Shutdown(ctx context.Context) error {
	r.cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		r.hardC()
		<-done
		err = ctx.Err()
	}
	r.hardC()
	if r.ownDeliv != nil {
		r.ownDeliv.Close()
	}
	if r.ownQueue {
		r.q.Close()
	}
	return err
}

// schedule leases due messages with lease while there is room for them in
// slots. Leases go to stream s, or, from the loop shared by all streams
// (s nil), to the stream of each message.
func (r *Relay) schedule(slots chan struct{}, lease func(ctx context.Context, n int) ([]*queue.Lease, error), s *stream) {
	defer r.wg.Done()
	backoff := 100 * time.Millisecond
	for {
		// Wait for at least one free slot before leasing.
		select {
		case slots <- struct{}{}:
		case <-r.ctx.Done():
			return
		}
		// Take more free slots, up to a batch, without waiting for them.
		reserved := 1
	more:
		for reserved < 64 {
			select {
			case slots <- struct{}{}:
				reserved++
			default:
				break more
			}
		}
		leases, err := lease(r.ctx, reserved)
		for i := len(leases); i < reserved; i++ {
			<-slots
		}
		for _, l := range leases {
			ls := s
			if ls == nil {
				ls = r.streamFor(l.Message.Envelope.Stream)
			}
			r.wg.Add(1)
			r.deep.goAsync(func() {
				defer r.wg.Done()
				defer func() { <-slots }()
				r.process(l, ls)
			})
		}
		if err != nil {
			if r.ctx.Err() != nil || errors.Is(err, queue.ErrClosed) {
				return
			}
			if s != nil {
				r.log.Error("queue lease failed", "stream", s.name, "err", err)
			} else {
				r.log.Error("queue lease failed", "err", err)
			}
			select {
			case <-time.After(backoff):
			case <-r.ctx.Done():
				return
			}
			backoff = min(2*backoff, 10*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// attempt is what a delivery attempt reported about one recipient besides
// its reply.
type attempt struct {
	tls       TLSInfo
	remoteDSN bool
	dest      string // the group key, Event.Dest
}

// group is the recipients of one message that go to one destination.
type group struct {
	key   string
	route *mx.Route
	rcpts []queue.Recipient
}

// process delivers the due recipients of one leased message, within the
// limits of its stream s, and settles the lease.
func (r *Relay) process(l *queue.Lease, s *stream) {
	// Deliveries stop well before the lease ends, leaving finish time to
	// bounce and settle while the lease is still ours.
	margin := min(r.cfg.LeaseTime/4, time.Minute)
	ctx, cancel := context.WithDeadline(r.hard, l.Until.Add(-margin))
	defer cancel()
	m := l.Message
	log := r.log.With("id", m.ID)
	outcomes := make([]queue.Outcome, 0, len(l.Due))
	add := func(rc queue.Recipient, res queue.Result, rep queue.Reply) {
		outcomes = append(outcomes, queue.Outcome{Rcpt: rc.Addr, Result: res, Reply: rep})
	}
	attempts := map[string]attempt{}

	// Resolve each domain once and group recipients by destination key.
	groups := map[string]*group{}
	var order []string
	routes := map[string]*mx.Route{}
	type failure struct {
		rep queue.Reply
		res queue.Result
	}
	fails := map[string]failure{}
	for _, i := range l.Due {
		rc := m.Recipients[i].Recipient
		if r.cfg.Suppressions != nil {
			s, ok, err := r.cfg.Suppressions.Lookup(ctx, rc.Addr)
			if err != nil {
				// Deliver anyway: a broken list must not stop mail.
				log.WarnContext(ctx, "suppression lookup failed", "rcpt", rc.Addr, "err", err)
			}
			if err == nil && ok {
				rep := SuppressedReply(s)
				add(rc, queue.Failed, rep)
				r.obs.Observe(ctx, Event{Kind: EventSuppressed, Time: time.Now(), ID: m.ID, From: m.Envelope.From, Rcpt: rc.Addr, Reply: rep, Identity: m.Envelope.Identity, Stream: m.Envelope.StreamName()})
				continue
			}
		}
		dom := rc.Domain()
		if f, ok := fails[dom]; ok {
			add(rc, f.res, f.rep)
			continue
		}
		rt, ok := routes[dom]
		if !ok {
			var err error
			if rt, err = r.route(ctx, dom); err != nil {
				rep, res := resolveFailure(dom, err)
				fails[dom] = failure{rep, res}
				log.InfoContext(ctx, "cannot resolve destination", "domain", dom, "err", err)
				add(rc, res, rep)
				continue
			}
			routes[dom] = rt
		}
		key := rt.Key
		if key == "" {
			key = "mx:" + dom
		}
		if r.ownSettings(s, dom) {
			// Its own TLS requirement or limits: never share a
			// transaction with other domains of the same route.
			key += "|domain:" + dom
		}
		g := groups[key]
		if g == nil {
			g = &group{key: key, route: rt}
			groups[key] = g
			order = append(order, key)
		}
		g.rcpts = append(g.rcpts, rc)
	}

	// Deliver to every destination at once; each waits for its own slots,
	// so a slow destination delays only its own recipients.
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, key := range order {
		g := groups[key]
		// Limits by route key use the route's key, not the group's: a
		// domain in a group of its own for its TLS requirement still
		// has its route's limits.
		routeKey, _, _ := strings.Cut(key, "|")
		lim := r.limitsFor(s, g.route.Domain, routeKey)
		d := r.destination(destKey{s.name, key}, lim)
		for start := 0; start < len(g.rcpts); start += lim.MaxRcpts {
			batch := g.rcpts[start:min(start+lim.MaxRcpts, len(g.rcpts))]
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, elapsed := r.deliverBatch(ctx, m, g, s, d, batch)
				mu.Lock()
				defer mu.Unlock()
				for i, rc := range batch {
					rep := queue.Reply{Code: 451, Enhanced: "4.3.0", Text: "no reply recorded"}
					if i < len(res.Replies) {
						rep = res.Replies[i]
					}
					if rep.Host == "" {
						rep.Host = res.Host
					}
					add(rc, classify(rep.Code), rep)
					attempts[rc.Addr] = attempt{tls: res.TLS, remoteDSN: res.RemoteDSN, dest: g.key}
				}
				log.DebugContext(ctx, "delivery attempt", "dest", g.key, "host", res.Host, "rcpts", len(batch), "elapsed", elapsed)
			}()
		}
	}
	wg.Wait()

	r.finish(l, outcomes, attempts, log)
}

// deliverBatch waits for the destination's limits and delivers one batch.
func (r *Relay) deliverBatch(ctx context.Context, m *queue.Message, g *group, s *stream, d *destination, batch []queue.Recipient) (*DeliveryResult, time.Duration) {
	local := func(text string) *DeliveryResult {
		res := &DeliveryResult{}
		for range batch {
			res.Replies = append(res.Replies, queue.Reply{Code: 451, Enhanced: "4.4.5", Text: text})
		}
		return res
	}
	select {
	case d.sem <- struct{}{}:
	case <-ctx.Done():
		return local("destination busy; delivery postponed"), 0
	}
	defer func() { <-d.sem }()
	if d.limiter != nil {
		if err := d.limiter.Wait(ctx); err != nil {
			return local("destination rate limit; delivery postponed"), 0
		}
	}
	release, err := r.acquireWorker(ctx, s)
	if err != nil {
		return local("relay busy; delivery postponed"), 0
	}
	defer release()
	d.active.Add(1)
	defer d.active.Add(-1)
	start := time.Now()
	res := r.deliver.Deliver(ctx, &Delivery{
		ID: m.ID, Envelope: &m.Envelope, Rcpts: batch, Route: g.route, Size: m.Size,
		Open: func(ctx context.Context) (io.ReadCloser, error) { return r.q.Open(ctx, m.ID) },
	})
	if res == nil {
		res = local("deliverer returned no result")
	}
	elapsed := time.Since(start)
	r.metrics.DeliveryAttempt(g.key, elapsed, res)
	return res, elapsed
}

func classify(code int) queue.Result {
	switch code / 100 {
	case 2:
		return queue.Delivered
	case 5:
		return queue.Failed
	}
	return queue.Retry
}

// resolveFailure turns a resolver error into the reply recorded for every
// recipient at the domain.
func resolveFailure(domain string, err error) (queue.Reply, queue.Result) {
	var me *mx.Error
	if errors.As(err, &me) {
		code, enh := me.Code, me.Enhanced
		if code == 0 {
			code, enh = 451, "4.4.3"
			if !me.Temporary {
				code, enh = 550, "5.1.2"
			}
		}
		rep := queue.Reply{Code: code, Enhanced: enh, Text: me.Reason}
		if me.Temporary {
			return rep, queue.Retry
		}
		return rep, queue.Failed
	}
	// Unknown errors are never a reason to bounce.
	return queue.Reply{Code: 451, Enhanced: "4.4.3", Text: "cannot resolve destination " + domain}, queue.Retry
}

// route resolves a domain, through a short cache.
func (r *Relay) route(ctx context.Context, domain string) (*mx.Route, error) {
	now := time.Now()
	if r.cfg.RouteCacheTTL > 0 {
		r.mu.Lock()
		e, ok := r.cache[domain]
		r.mu.Unlock()
		if ok && now.Before(e.until) {
			return e.route, nil
		}
	}
	rt, err := r.resolver.Resolve(ctx, domain)
	if err != nil {
		return nil, err
	}
	// A copy: the resolver may hand out a route it shares.
	c := *rt
	if c.Domain == "" {
		c.Domain = domain
	}
	if mode, ok := r.cfg.DomainTLS[domain]; ok && mode != c.TLS && (mode == mx.TLSNone || mode > c.TLS) {
		c.TLS = mode
	}
	rt = &c
	if r.cfg.RouteCacheTTL > 0 {
		r.mu.Lock()
		if len(r.cache) > 10000 {
			clear(r.cache)
		}
		r.cache[domain] = routeEntry{route: rt, until: now.Add(r.cfg.RouteCacheTTL)}
		r.mu.Unlock()
	}
	return rt, nil
}

// ownSettings reports whether a domain has a TLS requirement or limits of
// its own (for stream s).
func (r *Relay) ownSettings(s *stream, domain string) bool {
	_, tls := r.cfg.DomainTLS[domain]
	_, lim := r.cfg.Destinations[domain]
	_, slim := s.cfg.Destinations[domain]
	return tls || lim || slim
}

// limitsFor returns stream s's limits for a destination, the most specific
// entry first (see StreamConfig.Destinations).
func (r *Relay) limitsFor(s *stream, domain, key string) Limits {
	for _, k := range []string{domain, key} {
		if l, ok := s.cfg.Destinations[k]; ok {
			return l.withDefaults()
		}
		if l, ok := r.cfg.Destinations[k]; ok {
			return l.withDefaults()
		}
	}
	return s.cfg.Limits.or(r.cfg.Limits).withDefaults()
}

// destKey names a destination's slots: each stream has its own per group
// key (which names the domain too when it has settings of its own, see
// process).
type destKey struct{ stream, key string }

// destination returns the slots and rate limiter of id.
func (r *Relay) destination(id destKey, lim Limits) *destination {
	r.mu.Lock()
	defer r.mu.Unlock()
	d := r.dests[id]
	if d == nil {
		if len(r.dests) >= maxDestinations {
			// Forget idle destinations so memory follows the number of
			// destinations in use, not every one ever seen. A forgotten
			// rate limiter starts afresh, which its burst allows anyway.
			for k, v := range r.dests {
				if len(v.sem) == 0 {
					delete(r.dests, k)
				}
			}
		}
		d = &destination{sem: make(chan struct{}, lim.MaxConcurrent)}
		if lim.Rate > 0 {
			d.limiter = rate.NewLimiter(rate.Limit(lim.Rate), lim.Burst)
		}
		r.dests[id] = d
	}
	return d
}

// finish bounces what failed, records the outcomes and reports events.
// Bounces are queued before the lease is settled, so a crash in between
// repeats the attempt (and perhaps the bounce) but never loses the bounce.
// It runs on its own context, bounded by the lease, so a delivery that
// used up its time cannot starve the bounce.
func (r *Relay) finish(l *queue.Lease, outcomes []queue.Outcome, attempts map[string]attempt, log *slog.Logger) {
	ctx, cancel := context.WithDeadline(context.Background(), l.Until)
	defer cancel()
	m := l.Message
	now := time.Now()
	expiring := !m.Expires.IsZero() && !now.Before(m.Expires)

	// The statuses the DSNs report: a copy of the snapshot with this
	// attempt's replies applied. needs maps a recipient to the DSN kind
	// its outcome depends on.
	var failed, delayed, succeeded []queue.RecipientStatus
	needs := map[string]DSNKind{}
	for _, o := range outcomes {
		i := indexOf(m, o.Rcpt)
		if i < 0 {
			continue
		}
		st := m.Recipients[i]
		st.Last = o.Reply
		st.Attempts++
		switch o.Result {
		case queue.Failed:
			failed = append(failed, st)
			needs[o.Rcpt] = DSNFailure
		case queue.Retry:
			if expiring {
				st.Expired = true
				st.State = queue.RcptFailed
				failed = append(failed, st)
				needs[o.Rcpt] = DSNFailure
			} else if r.cfg.DelayWarning > 0 && r.crossesDelayWarning(m, &st, now) {
				delayed = append(delayed, st)
			}
		case queue.Delivered:
			if st.Notify&queue.NotifySuccess != 0 && !attempts[o.Rcpt].remoteDSN {
				succeeded = append(succeeded, st)
			}
		}
	}
	dsnIDs := map[string]queue.ID{}
	delayIDs := map[string]queue.ID{}
	bounceFailed := false
	for _, b := range []struct {
		kind  DSNKind
		rcpts []queue.RecipientStatus
	}{{DSNFailure, failed}, {DSNDelay, delayed}, {DSNRelayed, succeeded}} {
		if len(b.rcpts) == 0 {
			continue
		}
		id, err := r.bounce(ctx, m, b.rcpts, b.kind)
		if err != nil {
			log.ErrorContext(ctx, "cannot queue DSN", "kind", b.kind, "err", err)
			if b.kind == DSNFailure {
				bounceFailed = true
			}
			continue
		}
		for _, st := range b.rcpts {
			if id == "" {
				continue
			}
			dsnIDs[st.Addr] = id
			if b.kind == DSNDelay {
				delayIDs[st.Addr] = id
			}
		}
	}
	if bounceFailed {
		// Record everything but the failures whose bounce could not be
		// queued: those recipients stay pending and are attempted (and
		// bounced) again, while delivered ones are not delivered twice.
		kept := outcomes[:0:0]
		for _, o := range outcomes {
			if needs[o.Rcpt] != DSNFailure {
				kept = append(kept, o)
			}
		}
		log.WarnContext(ctx, "failures left pending until their bounce can be queued", "pending", len(outcomes)-len(kept))
		outcomes = kept
	}

	snap, err := r.q.Settle(ctx, l, outcomes)
	if err != nil {
		log.ErrorContext(ctx, "settle failed", "err", err)
		return
	}
	// The queue decides expiry with its own clock, a moment after ours:
	// bounce a recipient it expired that we did not expect to.
	var late []queue.RecipientStatus
	for _, o := range outcomes {
		if i := indexOf(snap, o.Rcpt); i >= 0 && snap.Recipients[i].Expired && needs[o.Rcpt] != DSNFailure {
			late = append(late, snap.Recipients[i])
		}
	}
	if len(late) > 0 {
		if id, err := r.bounce(ctx, snap, late, DSNFailure); err != nil {
			log.ErrorContext(ctx, "cannot queue DSN for recipients expired at settle", "err", err)
		} else if id != "" {
			for _, st := range late {
				dsnIDs[st.Addr] = id
			}
		}
	}
	if r.cfg.Suppressions != nil {
		for _, o := range outcomes {
			if o.Result == queue.Failed && ShouldSuppress(o.Reply) {
				if err := r.cfg.Suppressions.Add(ctx, Suppression{Addr: o.Rcpt, Reply: o.Reply, Created: now}); err != nil {
					log.WarnContext(ctx, "cannot record suppression", "rcpt", o.Rcpt, "err", err)
				}
			}
		}
	}
	for _, o := range outcomes {
		i := indexOf(snap, o.Rcpt)
		if i < 0 {
			continue
		}
		st := snap.Recipients[i]
		ev := Event{Time: now, ID: m.ID, From: m.Envelope.From, Rcpt: o.Rcpt, Host: o.Reply.Host, TLS: attempts[o.Rcpt].tls,
			Stream: m.Envelope.StreamName(), Dest: attempts[o.Rcpt].dest,
			Reply: o.Reply, Attempts: st.Attempts, Identity: m.Envelope.Identity, Size: m.Size, Duration: now.Sub(m.Received)}
		switch {
		case st.State == queue.RcptDelivered:
			ev.Kind = EventDelivered
		case st.State == queue.RcptFailed && st.Expired:
			ev.Kind = EventExpired
		case st.State == queue.RcptFailed:
			ev.Kind = EventFailed
		default:
			ev.Kind = EventDeferred
		}
		r.obs.Observe(ctx, ev)
		if id, ok := delayIDs[o.Rcpt]; ok {
			r.obs.Observe(ctx, Event{Kind: EventDelayWarning, Time: now, ID: m.ID, From: m.Envelope.From, Rcpt: o.Rcpt, DSNID: id, Stream: m.Envelope.StreamName(), Identity: m.Envelope.Identity, Size: m.Size})
		} else if id, ok := dsnIDs[o.Rcpt]; ok {
			r.obs.Observe(ctx, Event{Kind: EventDSNSent, Time: now, ID: m.ID, From: m.Envelope.From, Rcpt: o.Rcpt, DSNID: id, Stream: m.Envelope.StreamName(), Identity: m.Envelope.Identity, Size: m.Size})
		}
	}
}

// crossesDelayWarning reports whether this attempt is the first one after
// the message has waited DelayWarning: the one that warns the sender.
func (r *Relay) crossesDelayWarning(m *queue.Message, st *queue.RecipientStatus, now time.Time) bool {
	at := m.Received.Add(r.cfg.DelayWarning)
	if now.Before(at) {
		return false
	}
	for _, a := range st.History {
		if !a.At.Before(at) {
			return false // an earlier attempt already crossed it
		}
	}
	return true
}

// bounce queues a DSN for rcpts; it returns "" when none is due.
func (r *Relay) bounce(ctx context.Context, m *queue.Message, rcpts []queue.RecipientStatus, kind DSNKind) (queue.ID, error) {
	if !DSNDue(m, rcpts, kind) {
		return "", nil
	}
	orig, err := r.q.Open(ctx, m.ID)
	if err != nil {
		return "", err
	}
	defer orig.Close()
	env, body, err := BuildDSN(r.cfg.DSN, m, rcpts, kind, orig)
	if err != nil || env == nil {
		return "", err
	}
	// A DSN travels in the stream of the message it reports on: the
	// bounces of a bulk campaign must not compete with transactional mail.
	env.Stream = m.Envelope.Stream
	return r.q.Enqueue(ctx, env, body)
}

func indexOf(m *queue.Message, addr string) int {
	for i, r := range m.Recipients {
		if r.Addr == addr {
			return i
		}
	}
	for i, r := range m.Recipients {
		if strings.EqualFold(r.Addr, addr) {
			return i
		}
	}
	return -1
}
