package relay

import (
	"context"
	"crypto/tls"
	"log/slog"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/batonmail/baton/queue"
)

// EventKind says what happened to a message or recipient.
type EventKind int

// Event kinds. Per-recipient kinds carry Rcpt; EventAccepted is emitted
// once per recipient of an accepted message as well, so counting events of
// one kind counts recipients.
const (
	// EventAccepted: a message was queued (one event per recipient).
	EventAccepted EventKind = iota + 1
	// EventDelivered: the destination accepted the recipient (2xx).
	EventDelivered
	// EventDeferred: a temporary failure; the recipient will be retried.
	EventDeferred
	// EventFailed: a permanent failure (5xx); the recipient is final.
	EventFailed
	// EventExpired: the message reached its maximum age before the
	// recipient could be delivered; the recipient is final.
	EventExpired
	// EventSuppressed: the recipient was on the suppression list and was
	// failed without an attempt.
	EventSuppressed
	// EventDSNSent: a delivery status notification about the recipient
	// was queued to the sender; DSNID names it.
	EventDSNSent
	// EventDelayWarning: a delay DSN (still being retried) about the
	// recipient was queued to the sender; DSNID names it.
	EventDelayWarning
)

var eventKindNames = [...]string{
	EventAccepted:     "accepted",
	EventDelivered:    "delivered",
	EventDeferred:     "deferred",
	EventFailed:       "failed",
	EventExpired:      "expired",
	EventSuppressed:   "suppressed",
	EventDSNSent:      "dsn_sent",
	EventDelayWarning: "delay_warning",
}

// String returns the kind's name in lower case ("delivered", "dsn_sent").
func (k EventKind) String() string {
	if k > 0 && int(k) < len(eventKindNames) {
		return eventKindNames[k]
	}
	return "EventKind(" + strconv.Itoa(int(k)) + ")"
}

// MarshalText implements encoding.TextMarshaler, so JSON webhooks carry the
// name.
func (k EventKind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// Event is one thing that happened in the relay. Fields that do not apply
// to a kind are zero.
type Event struct {
	Kind EventKind
	// Time is when it happened.
	Time time.Time
	// ID is the queue ID of the message concerned.
	ID queue.ID
	// From is the envelope sender ("" for the null sender).
	From string
	// Rcpt is the recipient concerned.
	Rcpt string
	// Host is the remote host that gave Reply, if any.
	Host string
	// TLS describes the delivery connection, for delivery attempts.
	TLS TLSInfo
	// Reply is the reply that decided the outcome.
	Reply queue.Reply
	// Duration is, for EventAccepted, how long the submission took; for
	// delivery outcomes, how long the message has been queued.
	Duration time.Duration
	// Attempts counts the delivery attempts for the recipient so far.
	Attempts int
	// DSNID is the queue ID of the DSN, for EventDSNSent and
	// EventDelayWarning.
	DSNID queue.ID
	// Identity names the submitter (Envelope.Identity).
	Identity string
	// Size is the message size in bytes.
	Size int64
	// Stream is the message's stream (Envelope.StreamName).
	Stream string
	// Dest names the destination a delivery attempt went to: the route
	// key ("mx:example.com", "route:smarthost"), followed by
	// "|domain:DOMAIN" for a domain with a TLS requirement or limits of
	// its own (Config.DomainTLS, Config.Destinations), which has slots of
	// its own; for delivery outcomes.
	Dest string
}

// Observer receives events.
//
// The relay calls Observe synchronously from its submission and delivery
// paths, possibly from many goroutines at once: implementations must be
// safe for concurrent use, must return quickly and must never block (wrap
// slow work such as a webhook in an AsyncObserver, which drops and counts
// what does not fit its buffer), and must not panic. The Event is a value the
// observer may keep.
type Observer interface {
	Observe(ctx context.Context, e Event)
}

// ObserverFunc adapts a function to Observer.
type ObserverFunc func(ctx context.Context, e Event)

// Observe calls f.
func (f ObserverFunc) Observe(ctx context.Context, e Event) { f(ctx, e) }

// Multi returns an Observer that passes each event to every non-nil
// observer in order. With none it returns an observer that does nothing.
func Multi(obs ...Observer) Observer {
	var list multiObserver
	for _, o := range obs {
		switch o := o.(type) {
		case nil:
		case multiObserver:
			list = append(list, o...)
		default:
			list = append(list, o)
		}
	}
	return list
}

type multiObserver []Observer

func (m multiObserver) Observe(ctx context.Context, e Event) {
	for _, o := range m {
		o.Observe(ctx, e)
	}
}

// SlogObserver returns an Observer that writes one structured log line per
// event to logger (nil means discard): the message "event" with the
// attributes kind, id (the queue ID) and those of the other fields that are
// set. Failures and expiries log at Warn, everything else at Info.
func SlogObserver(logger *slog.Logger) Observer {
	if logger == nil {
		return Multi()
	}
	return slogObserver{logger}
}

type slogObserver struct{ log *slog.Logger }

func (s slogObserver) Observe(ctx context.Context, e Event) {
	level := slog.LevelInfo
	if e.Kind == EventFailed || e.Kind == EventExpired {
		level = slog.LevelWarn
	}
	if !s.log.Enabled(ctx, level) {
		return
	}
	attrs := make([]slog.Attr, 0, 16)
	attrs = append(attrs, slog.String("kind", e.Kind.String()), slog.String("id", string(e.ID)))
	if e.Kind != EventAccepted || e.From != "" {
		attrs = append(attrs, slog.String("from", e.From))
	}
	if e.Rcpt != "" {
		attrs = append(attrs, slog.String("rcpt", e.Rcpt))
	}
	if e.Host != "" {
		attrs = append(attrs, slog.String("host", e.Host))
	}
	if e.TLS.Version != 0 {
		attrs = append(attrs, slog.String("tls", tls.VersionName(e.TLS.Version)), slog.Bool("tls_verified", e.TLS.Verified))
	}
	if e.Reply.Code != 0 || e.Reply.Text != "" {
		r := e.Reply
		r.Host = "" // logged as host
		attrs = append(attrs, slog.String("reply", dsnOneLine(r.String(), 512)))
	}
	if e.Duration != 0 {
		attrs = append(attrs, slog.Duration("duration", e.Duration))
	}
	if e.Attempts != 0 {
		attrs = append(attrs, slog.Int("attempts", e.Attempts))
	}
	if e.DSNID != "" {
		attrs = append(attrs, slog.String("dsn_id", string(e.DSNID)))
	}
	if e.Identity != "" {
		attrs = append(attrs, slog.String("identity", e.Identity))
	}
	if e.Size != 0 {
		attrs = append(attrs, slog.Int64("size", e.Size))
	}
	if e.Stream != "" && e.Stream != queue.DefaultStream {
		attrs = append(attrs, slog.String("stream", e.Stream))
	}
	if e.Dest != "" {
		attrs = append(attrs, slog.String("dest", e.Dest))
	}
	s.log.LogAttrs(ctx, level, "event", attrs...)
}

// EventCounter is an Observer that counts events by kind with atomic
// counters: a cheap base for metrics and a convenient probe in tests. The
// zero value is ready to use.
type EventCounter struct {
	n [len(eventKindNames)]atomic.Int64
}

// Observe implements Observer.
func (c *EventCounter) Observe(_ context.Context, e Event) {
	if e.Kind > 0 && int(e.Kind) < len(c.n) {
		c.n[e.Kind].Add(1)
	}
}

// Count returns how many events of kind k were observed.
func (c *EventCounter) Count(k EventKind) int64 {
	if k > 0 && int(k) < len(c.n) {
		return c.n[k].Load()
	}
	return 0
}
