// Package prommetrics exports what the relay measures for Prometheus.
//
// Metrics implements relay.Metrics with counters and a histogram from
// github.com/prometheus/client_golang, kept in a Registry of its own (never
// the global one), and serves them in the Prometheus text format through
// Handler. Queue depth and the age of the oldest message per state are
// not counted as they change: they are read from the queue's Stats each
// time Prometheus scrapes, with a short timeout, so they are always the
// queue's own view (shared by every node of a shared queue).
//
// Recipient counters are labelled by stream and destination. Streams and
// destinations come from the mail (a destination is a recipient domain's
// route key), so their number is capped: past MaxStreams or
// MaxDestinations distinct values, new ones are counted under "other".
//
// docs/metrics.md lists every metric.
package prommetrics

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// Config configures New. The zero value works: no queue gauges, default
// caps and buckets.
type Config struct {
	// Queue, when set, is asked for Stats at every scrape, for the queue
	// gauges.
	Queue queue.Queue
	// StatsTimeout bounds one Queue.Stats call (default 5 seconds); a
	// scrape whose Stats fails or times out has no queue gauges and
	// counts an error in baton_queue_stats_errors_total.
	StatsTimeout time.Duration
	// MaxDestinations caps the distinct "dest" label values (default
	// 200); later destinations are counted as "other".
	MaxDestinations int
	// MaxStreams caps the distinct "stream" label values (default 50).
	MaxStreams int
	// LatencyBuckets are the upper bounds, in seconds, of the delivery
	// latency histogram; nil means DefaultLatencyBuckets.
	LatencyBuckets []float64
	// NoRuntime leaves out the Go runtime and process collectors
	// (go_*, process_*), which are registered by default.
	NoRuntime bool
	// Logger receives failed Stats calls and HTTP serving errors; nil
	// discards them.
	Logger *slog.Logger
}

// DefaultLatencyBuckets are the delivery latency histogram's buckets, in
// seconds: from a fast pooled connection to a slow server's data timeout.
var DefaultLatencyBuckets = []float64{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// Other is the label value that stands for destinations and streams past
// the configured caps.
const Other = "other"

// Metrics is a relay.Metrics that Prometheus can scrape. Set the same
// Metrics as relay.Config.Metrics and relay.ServerConfig.Metrics and serve
// Handler. It is safe for concurrent use.
type Metrics struct {
	cfg     Config
	reg     *prometheus.Registry
	log     *slog.Logger
	handler http.Handler

	recipients   *prometheus.CounterVec
	latency      *prometheus.HistogramVec
	deliveryTLS  [3]prometheus.Counter // none, encrypted, verified
	deliveryRep  [6]prometheus.Counter // by class 0 ("other"), 1..5
	conns        prometheus.Counter
	serverTLS    *prometheus.CounterVec
	serverRep    [6]prometheus.Counter
	authFailures *prometheus.CounterVec
	refusals     *prometheus.CounterVec

	mu       sync.RWMutex
	counters map[eventKey]prometheus.Counter
	observer map[string]prometheus.Observer
	dests    map[string]struct{}
	streams  map[string]struct{}
}

type eventKey struct {
	kind         relay.EventKind
	stream, dest string
}

var _ relay.Metrics = (*Metrics)(nil)

// maxCached bounds the label-lookup caches; past it lookups still work,
// through client_golang's own maps, only a little slower.
const maxCached = 10000

// New returns Metrics registered in a Registry of their own.
func New(cfg Config) *Metrics {
	if cfg.StatsTimeout <= 0 {
		cfg.StatsTimeout = 5 * time.Second
	}
	if cfg.MaxDestinations <= 0 {
		cfg.MaxDestinations = 200
	}
	if cfg.MaxStreams <= 0 {
		cfg.MaxStreams = 50
	}
	if cfg.LatencyBuckets == nil {
		cfg.LatencyBuckets = DefaultLatencyBuckets
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Metrics{
		cfg: cfg, reg: prometheus.NewRegistry(), log: cfg.Logger,
		counters: map[eventKey]prometheus.Counter{},
		observer: map[string]prometheus.Observer{},
		dests:    map[string]struct{}{},
		streams:  map[string]struct{}{},
	}
	m.recipients = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_recipients_total",
		Help: "Recipient events by event (accepted, delivered, deferred, failed, expired, suppressed, dsn_sent, delay_warning), stream and destination.",
	}, []string{"event", "stream", "dest"})
	m.latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "baton_delivery_duration_seconds",
		Help:    "Duration of delivery attempts (one SMTP transaction, from its start to the last reply) by destination.",
		Buckets: cfg.LatencyBuckets,
	}, []string{"dest"})
	dtls := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_delivery_tls_total",
		Help: "Delivery attempts that reached a server, by connection security: none, encrypted (TLS, certificate not verified) or verified.",
	}, []string{"tls"})
	for i, v := range []string{"none", "encrypted", "verified"} {
		m.deliveryTLS[i] = dtls.WithLabelValues(v)
	}
	drep := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_delivery_replies_total",
		Help: "Replies from destination servers, one per recipient, by class (2xx, 4xx, 5xx).",
	}, []string{"class"})
	m.conns = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "baton_smtp_connections_total",
		Help: "Client connections accepted by the SMTP server.",
	})
	m.serverTLS = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_smtp_tls_total",
		Help: "Completed inbound TLS handshakes (STARTTLS or implicit TLS) by TLS version.",
	}, []string{"version"})
	srep := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_smtp_replies_total",
		Help: "Replies sent by the SMTP server by class (2xx, 3xx, 4xx, 5xx).",
	}, []string{"class"})
	for i := range m.serverRep {
		m.serverRep[i] = srep.WithLabelValues(className(i))
		m.deliveryRep[i] = drep.WithLabelValues(className(i))
	}
	m.authFailures = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_smtp_auth_failures_total",
		Help: "Failed AUTH attempts by SASL mechanism.",
	}, []string{"mechanism"})
	m.refusals = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "baton_smtp_refusals_total",
		Help: "Connections and commands refused by a limit or the policy, by stage and reason (connection_limit, rate_limit, auth_limit, command_flood, policy).",
	}, []string{"stage", "reason"})
	m.reg.MustRegister(m.recipients, m.latency, dtls, drep, m.conns, m.serverTLS, srep, m.authFailures, m.refusals)
	if cfg.Queue != nil {
		m.reg.MustRegister(newQueueCollector(cfg.Queue, cfg.StatsTimeout, cfg.MaxStreams, m.log))
	}
	if !cfg.NoRuntime {
		m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	}
	// One handler: it registers its own error counter in the registry.
	m.handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		ErrorLog:      slogPrintln{m.log},
		ErrorHandling: promhttp.ContinueOnError,
		Registry:      m.reg,
	})
	return m
}

func className(i int) string {
	if i >= 1 && i <= 5 {
		return strconv.Itoa(i) + "xx"
	}
	return "other"
}

func classIndex(code int) int {
	if c := code / 100; c >= 1 && c <= 5 {
		return c
	}
	return 0
}

// Registry returns the registry the metrics live in, for a caller that
// wants to add collectors of its own to the same endpoint.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in the Prometheus exposition formats. It
// returns the same handler every time, so it may be mounted on several
// listeners.
func (m *Metrics) Handler() http.Handler { return m.handler }

type slogPrintln struct{ log *slog.Logger }

func (l slogPrintln) Println(v ...any) {
	l.log.Warn("metrics: serving failed", "err", v)
}

// Observe implements relay.Observer: it counts the event's recipient.
func (m *Metrics) Observe(_ context.Context, e relay.Event) {
	m.counter(eventKey{e.Kind, e.Stream, e.Dest}).Inc()
}

func (m *Metrics) counter(k eventKey) prometheus.Counter {
	return cached(m, m.counters, k, func() prometheus.Counter {
		return m.recipients.WithLabelValues(k.kind.String(), capLabel(m.streams, k.stream, m.cfg.MaxStreams), capLabel(m.dests, k.dest, m.cfg.MaxDestinations))
	})
}

// cached returns cache[k], or what create returns, kept in cache while it
// holds fewer than maxCached entries. create runs with m.mu held for
// writing, as capLabel needs.
func cached[K comparable, V any](m *Metrics, cache map[K]V, k K, create func() V) V {
	m.mu.RLock()
	v, ok := cache[k]
	m.mu.RUnlock()
	if ok {
		return v
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if v, ok := cache[k]; ok {
		return v
	}
	v = create()
	if len(cache) < maxCached {
		cache[k] = v
	}
	return v
}

// capLabel returns v, or Other once seen holds max other values; the
// caller holds m.mu for writing.
func capLabel(seen map[string]struct{}, v string, max int) string {
	if v == "" {
		return v
	}
	if _, ok := seen[v]; ok {
		return v
	}
	if len(seen) >= max {
		return Other
	}
	seen[v] = struct{}{}
	return v
}

// DeliveryAttempt implements relay.Metrics: the latency histogram, the
// connection's security and the replies by class.
func (m *Metrics) DeliveryAttempt(dest string, elapsed time.Duration, res *relay.DeliveryResult) {
	m.latencyFor(dest).Observe(elapsed.Seconds())
	answered := false
	for i := range res.Replies {
		r := &res.Replies[i]
		if r.Host != "" || res.Host != "" {
			answered = true
			m.deliveryRep[classIndex(r.Code)].Inc()
		}
	}
	if !answered {
		return
	}
	switch {
	case res.TLS.Version == 0:
		m.deliveryTLS[0].Inc()
	case !res.TLS.Verified:
		m.deliveryTLS[1].Inc()
	default:
		m.deliveryTLS[2].Inc()
	}
}

func (m *Metrics) latencyFor(dest string) prometheus.Observer {
	return cached(m, m.observer, dest, func() prometheus.Observer {
		return m.latency.WithLabelValues(capLabel(m.dests, dest, m.cfg.MaxDestinations))
	})
}

// ServerConnection implements relay.Metrics.
func (m *Metrics) ServerConnection() { m.conns.Inc() }

// ServerTLS implements relay.Metrics.
func (m *Metrics) ServerTLS(version uint16) {
	m.serverTLS.WithLabelValues(tls.VersionName(version)).Inc()
}

// ServerReply implements relay.Metrics.
func (m *Metrics) ServerReply(code int) { m.serverRep[classIndex(code)].Inc() }

// AuthFailure implements relay.Metrics.
func (m *Metrics) AuthFailure(mechanism string) {
	switch mechanism {
	case "PLAIN", "LOGIN":
	default:
		mechanism = Other // the relay offers only these; never trust a label
	}
	m.authFailures.WithLabelValues(mechanism).Inc()
}

// Refused implements relay.Metrics.
func (m *Metrics) Refused(stage, reason string) { m.refusals.WithLabelValues(stage, reason).Inc() }

// queueCollector reads the queue's Stats at scrape time.
type queueCollector struct {
	q          queue.Queue
	timeout    time.Duration
	maxStreams int
	log        *slog.Logger

	depth, oldest, byStream *prometheus.Desc
	errors                  prometheus.Counter

	mu   sync.Mutex
	call *statsCall // the Stats call in flight, shared by the scrapes
}

// statsCall is one Queue.Stats call; done is closed when it returned.
type statsCall struct {
	done chan struct{}
	st   *queue.Stats
	err  error
}

func newQueueCollector(q queue.Queue, timeout time.Duration, maxStreams int, log *slog.Logger) *queueCollector {
	return &queueCollector{
		q: q, timeout: timeout, maxStreams: maxStreams, log: log,
		depth: prometheus.NewDesc("baton_queue_messages",
			"Messages in the queue by state (queued, deferred, leased, held), read from the queue at scrape time.", []string{"state"}, nil),
		oldest: prometheus.NewDesc("baton_queue_oldest_age_seconds",
			"Age of the oldest message in each state (time since it was received); 0 when the state is empty.", []string{"state"}, nil),
		byStream: prometheus.NewDesc("baton_queue_stream_messages",
			"Messages in the queue by stream.", []string{"stream"}, nil),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "baton_queue_stats_errors_total",
			Help: "Scrapes whose queue Stats call failed or timed out (their queue gauges are missing).",
		}),
	}
}

// Describe implements prometheus.Collector.
func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.depth
	ch <- c.oldest
	ch <- c.byStream
	c.errors.Describe(ch)
}

// Collect implements prometheus.Collector.
func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	st, err := c.stats()
	if err != nil {
		c.errors.Inc()
		c.log.Warn("metrics: queue stats failed", "err", err)
		c.errors.Collect(ch)
		return
	}
	c.errors.Collect(ch)
	now := time.Now()
	// Every state is reported, even when empty, so no series vanishes.
	for _, s := range queue.States() {
		ch <- prometheus.MustNewConstMetric(c.depth, prometheus.GaugeValue, float64(st.ByState[s]), s.String())
		age := 0.0
		if t, ok := st.Oldest[s]; ok && st.ByState[s] > 0 {
			age = max(now.Sub(t).Seconds(), 0)
		}
		ch <- prometheus.MustNewConstMetric(c.oldest, prometheus.GaugeValue, age, s.String())
	}
	// Past the cap, the streams after the first ones in name order are
	// summed as "other", so the split is the same at every scrape.
	names := slices.Sorted(maps.Keys(st.ByStream))
	other := 0
	for i, name := range names {
		count := st.ByStream[name]
		if i >= c.maxStreams || name == Other {
			other += count
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.byStream, prometheus.GaugeValue, float64(count), name)
	}
	if other > 0 {
		ch <- prometheus.MustNewConstMetric(c.byStream, prometheus.GaugeValue, float64(other), Other)
	}
}

// stats returns the queue's Stats, or an error once the timeout has
// passed. The call runs on a goroutine of its own, shared by concurrent
// scrapes, so that a backend whose Stats ignores its context (one walking
// a large store under a lock) holds no scrape past the timeout, and
// scrapes never pile up calls behind a slow one.
func (c *queueCollector) stats() (*queue.Stats, error) {
	c.mu.Lock()
	call := c.call
	if call == nil {
		call = &statsCall{done: make(chan struct{})}
		c.call = call
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
			defer cancel()
			call.st, call.err = c.q.Stats(ctx)
			c.mu.Lock()
			c.call = nil
			c.mu.Unlock()
			close(call.done)
		}()
	}
	c.mu.Unlock()
	t := time.NewTimer(c.timeout)
	defer t.Stop()
	select {
	case <-call.done:
		return call.st, call.err
	case <-t.C:
		return nil, fmt.Errorf("queue stats: no answer after %v", c.timeout)
	}
}
