package admin

import (
	"context"
	"crypto/tls"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// RecorderConfig configures NewRecorder. The zero value means defaults.
type RecorderConfig struct {
	// Queue is sampled for the queue depth plot; nil records no depth.
	Queue queue.Admin
	// MaxMessages bounds the messages whose event history is kept
	// (default 10000); the oldest are forgotten first.
	MaxMessages int
	// MaxEvents bounds the events kept per message (default 64); later
	// events beyond it are counted as dropped.
	MaxEvents int
	// MaxDestinations bounds the destinations tracked (default 1000); the
	// one idle longest is forgotten first.
	MaxDestinations int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Recorder is a relay.Observer that remembers the last hour of the relay's
// activity for the dashboard: per-minute counts of accepted, delivered,
// deferred and bounced recipients, per-minute queue depth samples, the
// last reply and TLS state per destination, and the recent events of each
// message, so that a search still finds a message after it left the queue.
//
// Memory is bounded by the RecorderConfig limits. Observe takes a mutex for
// a few map updates and never waits for anything else, as the Observer
// contract requires. A Recorder is safe for concurrent use.
type Recorder struct {
	cfg RecorderConfig

	mu      sync.Mutex
	minutes [60]minuteBucket
	dests   map[string]*destState
	msgs    map[queue.ID]*MessageHistory
	order   []queue.ID // ring of IDs in msgs, oldest at head
	head    int
}

var _ relay.Observer = (*Recorder)(nil)

type minuteBucket struct {
	minute   int64 // Unix minute the bucket holds
	counts   Counts
	depth    int
	hasDepth bool
}

type destState struct {
	last    DestinationActivity
	domains map[string]bool
}

// maxDomainsPerDest bounds the recipient domains remembered per
// destination (a smarthost route may carry many).
const maxDomainsPerDest = 100

// NewRecorder returns an empty Recorder.
func NewRecorder(cfg RecorderConfig) *Recorder {
	if cfg.MaxMessages <= 0 {
		cfg.MaxMessages = 10000
	}
	if cfg.MaxEvents <= 0 {
		cfg.MaxEvents = 64
	}
	if cfg.MaxDestinations <= 0 {
		cfg.MaxDestinations = 1000
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Recorder{cfg: cfg, dests: map[string]*destState{}, msgs: map[queue.ID]*MessageHistory{}}
}

// Counts counts recipients by outcome. Bounced counts final failures:
// permanent failures, expiries and suppressed recipients.
type Counts struct {
	Accepted  int64 `json:"accepted"`
	Delivered int64 `json:"delivered"`
	Deferred  int64 `json:"deferred"`
	Bounced   int64 `json:"bounced"`
}

func (c *Counts) add(k relay.EventKind) {
	switch k {
	case relay.EventAccepted:
		c.Accepted++
	case relay.EventDelivered:
		c.Delivered++
	case relay.EventDeferred:
		c.Deferred++
	case relay.EventFailed, relay.EventExpired, relay.EventSuppressed:
		c.Bounced++
	}
}

func (c *Counts) plus(o Counts) {
	c.Accepted += o.Accepted
	c.Delivered += o.Delivered
	c.Deferred += o.Deferred
	c.Bounced += o.Bounced
}

// bucket returns the bucket for the minute of t, emptied if it held an
// older minute. The caller holds r.mu.
func (r *Recorder) bucket(t time.Time) *minuteBucket {
	m := t.Unix() / 60
	b := &r.minutes[m%60]
	if b.minute != m {
		*b = minuteBucket{minute: m}
	}
	return b
}

// Observe implements relay.Observer.
func (r *Recorder) Observe(_ context.Context, e relay.Event) {
	t := e.Time
	if t.IsZero() {
		t = r.cfg.Now()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// An event stamped ahead of the clock counts now; one older than the
	// window counts nowhere.
	bt := t
	if now := r.cfg.Now(); bt.After(now) {
		bt = now
	} else if now.Sub(bt) >= time.Hour {
		bt = time.Time{}
	}
	if !bt.IsZero() {
		r.bucket(bt).counts.add(e.Kind)
	}
	if e.Dest != "" && isOutcome(e.Kind) {
		r.observeDest(e, t)
	}
	if e.ID != "" {
		r.observeMsg(e, t)
	}
}

func isOutcome(k relay.EventKind) bool {
	return k == relay.EventDelivered || k == relay.EventDeferred || k == relay.EventFailed || k == relay.EventExpired
}

func (r *Recorder) observeDest(e relay.Event, t time.Time) {
	d := r.dests[e.Dest]
	if d == nil {
		if len(r.dests) >= r.cfg.MaxDestinations {
			var oldest string
			var ot time.Time
			for k, v := range r.dests {
				if oldest == "" || v.last.LastTime.Before(ot) {
					oldest, ot = k, v.last.LastTime
				}
			}
			delete(r.dests, oldest)
		}
		d = &destState{last: DestinationActivity{Dest: e.Dest}, domains: map[string]bool{}}
		r.dests[e.Dest] = d
	}
	a := &d.last
	a.LastTime = t
	a.LastReply = e.Reply
	a.LastHost = e.Host
	a.TLS = tlsString(e.TLS)
	a.TLSVerified = e.TLS.Verified
	switch e.Kind {
	case relay.EventDelivered:
		a.Delivered++
	case relay.EventDeferred:
		a.Deferred++
	default:
		a.Bounced++
	}
	if dom := queue.Domain(e.Rcpt); dom != "" && len(d.domains) < maxDomainsPerDest {
		d.domains[dom] = true
	}
}

// tlsString names a delivery's TLS version, or "none" for plaintext.
func tlsString(i relay.TLSInfo) string {
	if i.Version == 0 {
		return "none"
	}
	return tls.VersionName(i.Version)
}

func (r *Recorder) observeMsg(e relay.Event, t time.Time) {
	m := r.msgs[e.ID]
	if m == nil {
		if len(r.order) < r.cfg.MaxMessages {
			r.order = append(r.order, e.ID)
		} else {
			delete(r.msgs, r.order[r.head])
			r.order[r.head] = e.ID
			r.head = (r.head + 1) % len(r.order)
		}
		m = &MessageHistory{ID: e.ID, From: e.From, Identity: e.Identity, Stream: e.Stream, First: t}
		r.msgs[e.ID] = m
	}
	if e.Size != 0 {
		m.Size = e.Size
	}
	if len(m.Events) >= r.cfg.MaxEvents {
		m.Dropped++
		return
	}
	ev := HistoryEvent{Time: t, Kind: e.Kind.String(), Rcpt: e.Rcpt, Reply: e.Reply, Host: e.Host,
		Dest: e.Dest, Attempts: e.Attempts, DSNID: e.DSNID}
	if isOutcome(e.Kind) {
		ev.TLS = tlsString(e.TLS)
	}
	m.Events = append(m.Events, ev)
}

// Sample reads the queue's statistics and records the depth (messages in
// every state) for the current minute. It returns the statistics, or nil
// when the Recorder has no queue.
func (r *Recorder) Sample(ctx context.Context) (*queue.Stats, error) {
	if r.cfg.Queue == nil {
		return nil, nil
	}
	st, err := r.cfg.Queue.Stats(ctx)
	if err != nil {
		return nil, err
	}
	n := 0
	for _, c := range st.ByState {
		n += c
	}
	r.mu.Lock()
	b := r.bucket(r.cfg.Now())
	b.depth, b.hasDepth = n, true
	r.mu.Unlock()
	return st, nil
}

// Run samples the queue depth every interval (a minute when interval is
// not positive) until ctx is done. Each sample may take up to interval: a
// queue whose Stats hangs (a NATS server gone) must not stop the
// sampling for good.
func (r *Recorder) Run(ctx context.Context, interval time.Duration) {
	if interval <= 0 {
		interval = time.Minute
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		sctx, cancel := context.WithTimeout(ctx, interval)
		r.Sample(sctx)
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Minute is one minute of activity.
type Minute struct {
	// Time is the minute's start.
	Time time.Time `json:"time"`
	Counts
	// Depth is the last queue depth sampled in the minute, or nil.
	Depth *int `json:"depth"`
}

// Window is the last hour of activity.
type Window struct {
	// Totals sums Minutes.
	Totals Counts `json:"totals"`
	// Minutes holds the 60 minutes up to and including the current one,
	// oldest first.
	Minutes []Minute `json:"minutes"`
}

// Window returns the last hour's per-minute counts and depth samples.
func (r *Recorder) Window() Window {
	now := r.cfg.Now().Unix() / 60
	w := Window{Minutes: make([]Minute, 0, 60)}
	r.mu.Lock()
	defer r.mu.Unlock()
	for m := now - 59; m <= now; m++ {
		mi := Minute{Time: time.Unix(m*60, 0).UTC()}
		if b := &r.minutes[m%60]; b.minute == m {
			mi.Counts = b.counts
			if b.hasDepth {
				d := b.depth
				mi.Depth = &d
			}
		}
		w.Totals.plus(mi.Counts)
		w.Minutes = append(w.Minutes, mi)
	}
	return w
}

// DestinationActivity is what the Recorder knows about a destination.
type DestinationActivity struct {
	// Dest is the destination key, as relay.Event.Dest.
	Dest string `json:"dest"`
	// Domains lists recipient domains delivered through it, sorted.
	Domains []string `json:"domains"`
	// LastTime, LastReply and LastHost describe the latest attempt.
	LastTime  time.Time   `json:"last_time"`
	LastReply queue.Reply `json:"last_reply"`
	LastHost  string      `json:"last_host,omitempty"`
	// TLS is the latest attempt's TLS version ("TLS 1.3"), or "none".
	TLS         string `json:"tls"`
	TLSVerified bool   `json:"tls_verified"`
	// Delivered, Deferred and Bounced count recipient outcomes since the
	// Recorder started (or first saw the destination).
	Delivered int64 `json:"delivered"`
	Deferred  int64 `json:"deferred"`
	Bounced   int64 `json:"bounced"`
}

// Destinations returns the tracked destinations sorted by key.
func (r *Recorder) Destinations() []DestinationActivity {
	r.mu.Lock()
	out := make([]DestinationActivity, 0, len(r.dests))
	for _, d := range r.dests {
		a := d.last
		for dom := range d.domains {
			a.Domains = append(a.Domains, dom)
		}
		sort.Strings(a.Domains)
		out = append(out, a)
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Dest < out[j].Dest })
	return out
}

// HistoryEvent is one recorded event of a message.
type HistoryEvent struct {
	Time time.Time `json:"time"`
	// Kind is the relay.EventKind's name ("accepted", "delivered"...).
	Kind     string      `json:"kind"`
	Rcpt     string      `json:"rcpt,omitempty"`
	Reply    queue.Reply `json:"reply"`
	Host     string      `json:"host,omitempty"`
	Dest     string      `json:"dest,omitempty"`
	TLS      string      `json:"tls,omitempty"`
	Attempts int         `json:"attempts,omitempty"`
	DSNID    queue.ID    `json:"dsn_id,omitempty"`
}

// MessageHistory is the recorded events of one message, oldest first.
type MessageHistory struct {
	ID       queue.ID       `json:"id"`
	From     string         `json:"from"`
	Identity string         `json:"identity,omitempty"`
	Stream   string         `json:"stream,omitempty"`
	Size     int64          `json:"size,omitempty"`
	First    time.Time      `json:"first"`
	Events   []HistoryEvent `json:"events"`
	// Dropped counts events beyond RecorderConfig.MaxEvents.
	Dropped int `json:"dropped,omitempty"`
}

func (h *MessageHistory) clone() MessageHistory {
	c := *h
	c.Events = append([]HistoryEvent(nil), h.Events...)
	return c
}

// History returns the recorded events of message id.
func (r *Recorder) History(id queue.ID) (MessageHistory, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := r.msgs[id]
	if m == nil {
		return MessageHistory{}, false
	}
	return m.clone(), true
}

// Search returns up to max recorded messages whose ID, sender or any
// recipient equals q (addresses compared case-insensitively), newest
// first.
func (r *Recorder) Search(q string, max int) []MessageHistory {
	q = strings.TrimSpace(q)
	if q == "" {
		return nil
	}
	var out []MessageHistory
	r.mu.Lock()
	defer r.mu.Unlock()
	// Walk the ring newest first.
	n := len(r.order)
	for i := 0; i < n && len(out) < max; i++ {
		id := r.order[(r.head+n-1-i)%n]
		m := r.msgs[id]
		if m != nil && m.matches(q) {
			out = append(out, m.clone())
		}
	}
	return out
}

func (h *MessageHistory) matches(q string) bool {
	if string(h.ID) == q || (h.From != "" && strings.EqualFold(h.From, q)) {
		return true
	}
	for _, e := range h.Events {
		if strings.EqualFold(e.Rcpt, q) {
			return true
		}
	}
	return false
}
