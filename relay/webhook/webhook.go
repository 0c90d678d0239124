// Package webhook posts relay events to an HTTP endpoint as signed JSON
// batches.
//
// A Sender is a relay.Observer, to be passed to relay.Config.Observer
// (through relay.Multi alongside others) as it is: it needs no
// relay.AsyncObserver around it. Observe only appends the event to a
// bounded in-memory buffer, so delivery never waits for the receiver; one
// goroutine per Sender takes the buffer in batches (BatchSize events, or
// what has gathered after FlushInterval) and POSTs them in order. A batch
// that fails (a network error, a timeout, a 5xx, 408 or 429) is retried
// with exponential backoff and jitter, honouring Retry-After, until it is
// accepted or RetryWindow has passed; meanwhile new events keep buffering
// behind it. Delivery is at least once: a batch whose response was lost is
// posted again with the same batch_id and event ids, which receivers use
// to drop duplicates.
//
// A 413 (Payload Too Large) condemns the batch, not its events: the
// Sender splits the batch in two halves, posted in order as batches of
// their own with derived ids ("<batch_id>.1", then "<batch_id>.2", stable
// across retries), each retried like any batch, and halves again what is
// still too large, down to a single event, which alone is dropped and
// counted. Later batches then hold no more events than the largest part
// the receiver accepted (half the refused batch if it accepted none), and
// the limit doubles back towards BatchSize after every 16 full batches
// accepted with no 413 in between (partial batches do not count): a
// receiver that caps request bodies costs a split now and then, not the
// events.
//
// Every POST is signed (see SignatureHeader and Verify), and the payload
// schema is documented in docs/webhooks.md.
//
// What a Sender cannot keep, it drops and counts (Stats.Dropped): events
// observed while MaxBuffered events are waiting, batches refused with a
// 4xx other than 408, 413 and 429, single events refused with a 413,
// batches still failing after RetryWindow, and what Close could not send
// in time. Events live only in memory: those still buffered when the
// process dies are lost.
package webhook

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/batonmail/baton/relay"
)

// Config configures a Sender. URL and Secret are required; zero values
// of the other fields mean the defaults given.
type Config struct {
	// URL is the endpoint the batches are POSTed to (http or https).
	URL string
	// Secret keys the HMAC signature of every POST.
	Secret string
	// PreviousSecrets also sign every POST (one v1 signature each), while
	// receivers move from an old secret to Secret.
	PreviousSecrets []string
	// Kinds are the event kinds to send (default DefaultKinds).
	Kinds []relay.EventKind
	// BatchSize is the most events per POST (default 100). After a 413
	// the Sender posts smaller batches for a while (see the package
	// documentation).
	BatchSize int
	// FlushInterval is how long a partial batch waits for more events
	// before it is sent (default 1s).
	FlushInterval time.Duration
	// MaxBuffered caps the events held in memory, waiting or in the batch
	// being posted (default 100000). Beyond it new events are dropped
	// and counted: the buffer keeps the oldest, so what the receiver
	// gets stays a gap-free prefix of the stream until the drop.
	MaxBuffered int
	// RetryWindow is how long a failing batch is retried before it is
	// dropped and counted (default 1h).
	RetryWindow time.Duration
	// MinBackoff and MaxBackoff bound the wait between retries of a
	// batch, which doubles from MinBackoff (default 1s) up to MaxBackoff
	// (default 5m), with jitter. A Retry-After on a 429 or 503 response
	// is honoured even when longer.
	MinBackoff, MaxBackoff time.Duration
	// Timeout bounds one POST, response included (default 10s).
	Timeout time.Duration
	// HTTPClient sends the requests (default: a client on
	// http.DefaultTransport that does not follow redirects, so a 3xx is
	// retried like a 5xx). Its own Timeout, if any, applies as well.
	HTTPClient *http.Client
	// Logger receives failures, retries and buffer overflows (once per
	// overflow; nil: discard).
	Logger *slog.Logger
}

// Stats are a Sender's counters, in events unless said otherwise.
type Stats struct {
	// Sent counts events in batches the receiver accepted (2xx).
	Sent int64
	// Batches counts accepted batches.
	Batches int64
	// Dropped counts events that will never be sent (see the package
	// documentation for why).
	Dropped int64
	// Retries counts failed POSTs that were retried (in POSTs).
	Retries int64
	// Pending counts events buffered or in the batch being posted.
	Pending int64
}

// Sender posts events to one webhook URL. Create it with New; it is safe
// for concurrent use.
type Sender struct {
	cfg    Config
	url    string // for logs, without query and credentials
	kinds  uint64 // bit k set: kind k is sent
	log    *slog.Logger
	client *http.Client
	prefix string // makes event and batch ids unique across Senders
	wait   func(ctx context.Context, d time.Duration) error
	kick   chan struct{}
	ctx    context.Context // cancelled when Close gives up
	cancel context.CancelFunc
	// closeCtx is s.ctx, also cancelled when Close is called: it wakes
	// the goroutine to flush, and cuts a backoff short.
	closeCtx    context.Context
	closeCancel context.CancelFunc
	done        chan struct{}

	mu       sync.Mutex
	buf      []item
	inflight int
	seq      uint64
	closed   bool
	overflow bool // events dropped for MaxBuffered since the buffer was last empty
	// batchSize is the effective BatchSize: lower than cfg.BatchSize
	// after a 413, until it grows back.
	batchSize int

	batchSeq                        uint64 // run goroutine only
	closeRetried                    bool   // run goroutine only: a backoff was cut short by Close
	fullStreak                      int    // run goroutine only: full batches accepted since the last 413
	sent, batches, dropped, retries atomic.Int64
}

// growAfter is how many full batches must be accepted, with no 413 in
// between, before a batch size lowered by a 413 doubles again: few
// enough that one oversized event does not slow a busy Sender for long,
// many enough that a receiver's hard cap costs a split only that often.
const growAfter = 16

// Messages logged about 413 answers, also matched by the tests.
const (
	splitMsg     = "webhook batch too large for the receiver; posting it in two halves"
	tooLargeMsg  = "webhook event dropped: too large for the receiver on its own"
	batchSizeMsg = "webhook batch size lowered after a 413"
)

// overflowMsg is logged when events start to be dropped for MaxBuffered.
const overflowMsg = "webhook buffer full: new events are dropped until it has room"

type item struct {
	seq uint64
	e   relay.Event
}

var _ relay.Observer = (*Sender)(nil)

// New checks cfg and starts the Sender's goroutine; Close stops it.
func New(cfg Config) (*Sender, error) {
	return newSender(cfg, sleep)
}

func newSender(cfg Config, wait func(context.Context, time.Duration) error) (*Sender, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("webhook: url: %w", err)
	}
	if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("webhook: url %q: want an http or https URL", u.Redacted())
	}
	if cfg.Secret == "" {
		return nil, errors.New("webhook: a secret is required to sign the requests")
	}
	if len(cfg.Kinds) == 0 {
		cfg.Kinds = DefaultKinds
	}
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&cfg.FlushInterval, time.Second)
	def(&cfg.RetryWindow, time.Hour)
	def(&cfg.MinBackoff, time.Second)
	def(&cfg.MaxBackoff, 5*time.Minute)
	def(&cfg.Timeout, 10*time.Second)
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = cfg.MinBackoff
	}
	if cfg.BatchSize <= 0 {
		cfg.BatchSize = 100
	}
	if cfg.MaxBuffered <= 0 {
		cfg.MaxBuffered = 100000
	}
	if cfg.HTTPClient == nil {
		// A redirect is answered as a failure rather than followed: the
		// events and their signature are for the configured URL only.
		cfg.HTTPClient = &http.Client{Transport: http.DefaultTransport,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	}
	s := &Sender{cfg: cfg, log: cfg.Logger, client: cfg.HTTPClient, wait: wait,
		kick: make(chan struct{}, 1), done: make(chan struct{}), batchSize: cfg.BatchSize}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	logURL := *u
	logURL.User, logURL.RawQuery, logURL.Fragment = nil, "", ""
	s.url = logURL.String()
	s.log = s.log.With("webhook", s.url)
	for _, k := range cfg.Kinds {
		if k <= 0 || k > maxKind {
			return nil, fmt.Errorf("webhook: bad event kind %d", k)
		}
		s.kinds |= 1 << k
	}
	var r [8]byte
	crand.Read(r[:])
	s.prefix = hex.EncodeToString(r[:])
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.closeCtx, s.closeCancel = context.WithCancel(s.ctx)
	go s.run()
	return s, nil
}

// Observe implements relay.Observer: it buffers the event, or drops and
// counts it when MaxBuffered events are already held or the Sender is
// closed. It never blocks on the network.
func (s *Sender) Observe(_ context.Context, e relay.Event) {
	if e.Kind <= 0 || e.Kind > maxKind || s.kinds&(1<<e.Kind) == 0 {
		return
	}
	s.mu.Lock()
	if s.closed || len(s.buf)+s.inflight >= s.cfg.MaxBuffered {
		first := !s.closed && !s.overflow
		s.overflow = s.overflow || !s.closed
		s.mu.Unlock()
		s.dropped.Add(1)
		if first {
			// Once per overflow, not per event: the drops are otherwise
			// silent until Close.
			s.log.Warn(overflowMsg, "max_buffered", s.cfg.MaxBuffered, "dropped_total", s.dropped.Load())
		}
		return
	}
	s.seq++
	s.buf = append(s.buf, item{s.seq, e})
	n := len(s.buf)
	size := s.batchSize
	s.mu.Unlock()
	if n == 1 || n == size {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// Stats returns the Sender's counters.
func (s *Sender) Stats() Stats {
	s.mu.Lock()
	pending := int64(len(s.buf) + s.inflight)
	s.mu.Unlock()
	return Stats{Sent: s.sent.Load(), Batches: s.batches.Load(), Dropped: s.dropped.Load(),
		Retries: s.retries.Load(), Pending: pending}
}

// Close stops accepting events and sends what is buffered, retrying as
// usual, until everything is sent or dropped or ctx is done; then it
// abandons the rest (counted as dropped) and returns ctx.Err(). A batch
// waiting out its backoff when Close is called is tried again at once
// (once per Sender), so that a receiver that has come back gets it
// before ctx ends. Calling Close again is harmless.
func (s *Sender) Close(ctx context.Context) error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		s.closeCancel()
	}
	s.mu.Unlock()
	select {
	case <-s.done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.cancel()
		<-s.done // the POST and the backoff wait both end with s.ctx
		return ctx.Err()
	}
}

func (s *Sender) run() {
	defer close(s.done)
	defer func() {
		s.mu.Lock()
		n := len(s.buf)
		s.buf = nil
		s.mu.Unlock()
		if n > 0 {
			s.dropped.Add(int64(n))
			s.log.Error("webhook events abandoned at close", "events", n)
		}
	}()
	for {
		batch := s.next()
		if batch == nil {
			return
		}
		s.send(batch)
		s.mu.Lock()
		s.inflight = 0
		s.mu.Unlock()
	}
}

// next waits for a batch to send: BatchSize events (the effective batch
// size), or fewer once
// FlushInterval has passed since the first of them was seen or the Sender
// is closing. It returns nil when the Sender is closed and empty, or
// abandoned.
func (s *Sender) next() []item {
	var flush *time.Timer
	defer func() {
		if flush != nil {
			flush.Stop()
		}
	}()
	due := false
	for {
		if s.ctx.Err() != nil {
			return nil
		}
		s.mu.Lock()
		n := len(s.buf)
		if n >= s.batchSize || n > 0 && (due || s.closed) {
			n = min(n, s.batchSize)
			batch := make([]item, n)
			copy(batch, s.buf)
			clear(s.buf[:n])
			s.buf = s.buf[n:]
			s.inflight = n
			if len(s.buf) == 0 {
				s.overflow = false
			}
			s.mu.Unlock()
			return batch
		}
		closed := s.closed
		s.mu.Unlock()
		if n == 0 && closed {
			return nil
		}
		var flushC <-chan time.Time
		if n > 0 {
			if flush == nil {
				flush = time.NewTimer(s.cfg.FlushInterval)
			}
			flushC = flush.C
		}
		select {
		case <-s.kick:
		case <-flushC:
			due = true
		case <-s.closeCtx.Done():
		case <-s.ctx.Done():
			return nil
		}
	}
}

// split records what became of a batch split after a 413.
type split struct {
	split    bool // a 413 split the batch
	accepted int  // events in the largest part accepted
}

// send posts one batch taken by next until its events are accepted or
// dropped, then adapts the effective batch size: down after a 413, back
// up after growAfter full batches accepted since the last 413.
func (s *Sender) send(batch []item) {
	s.batchSeq++
	s.mu.Lock()
	size := s.batchSize
	s.mu.Unlock()
	var sp split
	s.deliver(s.prefix+"-b"+strconv.FormatUint(s.batchSeq, 10), batch, &sp)
	switch {
	case sp.split:
		s.fullStreak = 0
		next := sp.accepted
		if next == 0 {
			next = (len(batch) + 1) / 2
		}
		if next < size {
			s.mu.Lock()
			s.batchSize = next
			s.mu.Unlock()
			s.log.Warn(batchSizeMsg, "batch_size", next, "was", size)
		}
	case sp.accepted == len(batch) && len(batch) >= size && size < s.cfg.BatchSize:
		s.fullStreak++
		if s.fullStreak >= growAfter {
			s.fullStreak = 0
			s.mu.Lock()
			s.batchSize = min(2*size, s.cfg.BatchSize)
			s.mu.Unlock()
		}
	}
}

// deliver posts batch as the batch id until it is accepted, refused for
// good, out of its retry window, or abandoned by Close. A 413 splits it:
// the halves are delivered in turn, as id.1 and id.2, the second once the
// first is accepted or dropped, so that the events keep their order.
func (s *Sender) deliver(id string, batch []item, sp *split) {
	b := Batch{BatchID: id, SentAt: time.Now().UTC(), Events: make([]Event, len(batch))}
	for i := range batch {
		b.Events[i] = wireEvent(s.prefix+"-"+strconv.FormatUint(batch[i].seq, 10), &batch[i].e)
	}
	body, err := json.Marshal(&b)
	if err != nil { // cannot happen with these types; never retry it
		s.drop(batch, b.BatchID, "cannot encode the batch", err)
		return
	}
	log := s.log.With("batch_id", b.BatchID, "events", len(batch))
	deadline := time.Now().Add(s.cfg.RetryWindow)
	for attempt := 1; ; attempt++ {
		status, retryAfter, err := s.post(b.BatchID, attempt, body)
		if err == nil {
			s.sent.Add(int64(len(batch)))
			s.batches.Add(1)
			s.settle(len(batch))
			sp.accepted = max(sp.accepted, len(batch))
			if attempt > 1 {
				log.Info("webhook batch delivered after retries", "attempts", attempt)
			}
			return
		}
		if s.ctx.Err() != nil {
			s.drop(batch, b.BatchID, "abandoned at close", err)
			return
		}
		if status == http.StatusRequestEntityTooLarge {
			if len(batch) == 1 {
				s.dropped.Add(1)
				s.settle(1)
				log.Error(tooLargeMsg, "event_id", b.Events[0].ID, "id", b.Events[0].QueueID,
					"kind", b.Events[0].Kind, "bytes", len(body), "err", err)
				return
			}
			sp.split = true
			log.Warn(splitMsg, "bytes", len(body), "err", err)
			h := (len(batch) + 1) / 2
			s.deliver(id+".1", batch[:h], sp)
			if s.ctx.Err() != nil {
				s.drop(batch[h:], id+".2", "abandoned at close", s.ctx.Err())
				return
			}
			s.deliver(id+".2", batch[h:], sp)
			return
		}
		if status >= 400 && status < 500 && status != http.StatusRequestTimeout && status != http.StatusTooManyRequests {
			s.drop(batch, b.BatchID, "refused by the receiver", err)
			return
		}
		now := time.Now()
		if !now.Before(deadline) {
			s.drop(batch, b.BatchID, "still failing after the retry window", err)
			return
		}
		delay := s.backoff(attempt)
		if retryAfter > delay {
			delay = retryAfter
		}
		if left := deadline.Sub(now); delay > left {
			delay = left // one last try at the end of the window
		}
		s.retries.Add(1)
		log.Warn("webhook post failed; will retry", "attempt", attempt, "retry_in", delay, "err", err)
		wctx := s.ctx
		if !s.closeRetried {
			// Close cuts one backoff short: what it flushes gets a try
			// now, not after a wait that may outlast Close's deadline.
			wctx = s.closeCtx
		}
		if s.wait(wctx, delay) != nil {
			if s.ctx.Err() != nil {
				s.drop(batch, b.BatchID, "abandoned at close", err)
				return
			}
			s.closeRetried = true
		}
	}
}

// settle takes n events that were accepted or dropped off the in-flight
// count, so that Pending and MaxBuffered see each part of a split batch
// go as soon as it is done.
func (s *Sender) settle(n int) {
	s.mu.Lock()
	s.inflight = max(0, s.inflight-n)
	s.mu.Unlock()
}

func (s *Sender) drop(batch []item, id, why string, err error) {
	s.dropped.Add(int64(len(batch)))
	s.settle(len(batch))
	s.log.Error("webhook batch dropped: "+why, "batch_id", id, "events", len(batch), "err", err)
}

// backoff returns the wait after the attempt-th failure: MinBackoff
// doubled per failure up to MaxBackoff, of which a random half is taken
// off so that many relays do not retry in step.
func (s *Sender) backoff(attempt int) time.Duration {
	d := s.cfg.MinBackoff
	for i := 1; i < attempt && d < s.cfg.MaxBackoff; i++ {
		d *= 2
	}
	d = min(d, s.cfg.MaxBackoff)
	return d/2 + rand.N(d/2+1)
}

// post sends one attempt. It returns nil for a 2xx; otherwise the status
// (0 for a network error), the Retry-After of a 429 or 503, and an error
// describing the failure.
func (s *Sender) post(batchID string, attempt int, body []byte) (int, time.Duration, error) {
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.URL, bytes.NewReader(body))
	if err != nil {
		return 0, 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "baton-webhook/1")
	req.Header.Set("Baton-Batch-Id", batchID)
	req.Header.Set("Baton-Attempt", strconv.Itoa(attempt))
	req.Header.Set(SignatureHeader, Sign(time.Now(), body, append([]string{s.cfg.Secret}, s.cfg.PreviousSecrets...)...))
	resp, err := s.client.Do(req)
	if err != nil {
		// The error quotes the URL, whose query may hold a token: keep
		// the logs to the redacted one.
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = s.url
		}
		return 0, 0, err
	}
	defer resp.Body.Close()
	// Read a little of the body: enough to log why it failed, and to let
	// the connection be reused for small responses.
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return resp.StatusCode, 0, nil
	}
	var retryAfter time.Duration
	if resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusServiceUnavailable {
		retryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
	}
	return resp.StatusCode, retryAfter, fmt.Errorf("%s: %q", resp.Status, bytes.TrimSpace(snippet))
}

// parseRetryAfter reads a Retry-After value: seconds or an HTTP date
// (RFC 9110, section 10.2.3). It returns 0 when there is none.
func parseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		return time.Duration(min(secs, int64(24*time.Hour/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
