package webhook

import (
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// Batch is the JSON body of one webhook POST. The field names are part of
// the documented schema (docs/webhooks.md) and do not change; new fields
// may be added, so receivers should ignore fields they do not know.
type Batch struct {
	// BatchID identifies the batch; a retried POST carries the same ID
	// and the same body. The halves of a batch answered 413 are batches
	// of their own, with the batch's ID followed by ".1" and ".2".
	BatchID string `json:"batch_id"`
	// SentAt is when the batch was first posted.
	SentAt time.Time `json:"sent_at"`
	// Events are in the order the relay reported them.
	Events []Event `json:"events"`
}

// Event is one relay.Event as the webhook sends it. Fields that do not
// apply to the kind are omitted, except id, kind, time, queue_id, stream
// and from, which are always present.
type Event struct {
	// ID is unique per event (also across restarts), so a receiver can
	// drop the duplicates that at-least-once delivery may bring.
	ID string `json:"id"`
	// Kind is the relay.EventKind's name: "accepted", "delivered",
	// "deferred", "failed", "expired", "suppressed", "dsn_sent",
	// "delay_warning".
	Kind string `json:"kind"`
	// Time is when it happened.
	Time time.Time `json:"time"`
	// QueueID is the queue ID of the message concerned.
	QueueID string `json:"queue_id"`
	// Stream is the message's stream ("transactional" by default).
	Stream string `json:"stream"`
	// From is the envelope sender; "" is the null sender (a DSN).
	From string `json:"from"`
	// Rcpt is the recipient concerned.
	Rcpt string `json:"rcpt,omitempty"`
	// Dest is the destination of a delivery attempt ("mx:example.com",
	// "route:smarthost", see relay.Event.Dest).
	Dest string `json:"dest,omitempty"`
	// Host is the remote host that gave Reply.
	Host string `json:"host,omitempty"`
	// Reply is the SMTP reply that decided the outcome.
	Reply *Reply `json:"reply,omitempty"`
	// TLS describes the delivery connection; absent for plaintext and
	// for kinds that are not delivery attempts.
	TLS *TLS `json:"tls,omitempty"`
	// Attempts counts the delivery attempts for the recipient so far.
	Attempts int `json:"attempts,omitempty"`
	// DSNID is the queue ID of the DSN, for dsn_sent and delay_warning.
	DSNID string `json:"dsn_id,omitempty"`
	// Identity names the submitter (the AUTH user, API key or allowed
	// network).
	Identity string `json:"identity,omitempty"`
	// Size is the message size in bytes.
	Size int64 `json:"size,omitempty"`
	// SubmitMS is, for accepted, how long the submission took in
	// milliseconds.
	SubmitMS int64 `json:"submit_ms,omitempty"`
	// QueuedForMS is, for delivery outcomes, how long the message had
	// been queued, in milliseconds.
	QueuedForMS int64 `json:"queued_for_ms,omitempty"`
}

// Reply is an SMTP reply.
type Reply struct {
	// Code is the three-digit reply code (250, 451, 550).
	Code int `json:"code"`
	// Enhanced is the RFC 3463 enhanced status code ("5.1.1"), if any.
	Enhanced string `json:"enhanced,omitempty"`
	// Text is what the server said, or a local explanation.
	Text string `json:"text"`
}

// TLS describes the protection of a delivery connection.
type TLS struct {
	// Version is the negotiated version: "TLS 1.2", "TLS 1.3".
	Version string `json:"version"`
	// Verified is true when the certificate was verified for the host.
	Verified bool `json:"verified"`
}

// DefaultKinds are the kinds a Sender sends when Config.Kinds is empty:
// every delivery event except the delay warning, which repeats what the
// deferred events already say.
var DefaultKinds = []relay.EventKind{
	relay.EventAccepted, relay.EventDelivered, relay.EventDeferred, relay.EventFailed,
	relay.EventExpired, relay.EventSuppressed, relay.EventDSNSent,
}

// maxKind bounds the kinds a Sender can filter on (a bit set in a
// uint64); relay has far fewer.
const maxKind = 63

// ParseKinds turns kind names ("delivered", "dsn_sent") into kinds, as
// relay.EventKind.String spells them; "*" stands for every kind. It is for
// configuration files.
func ParseKinds(names []string) ([]relay.EventKind, error) {
	var kinds []relay.EventKind
	for _, n := range names {
		n = strings.ToLower(strings.TrimSpace(n))
		found := false
		for k := relay.EventKind(1); k <= maxKind; k++ {
			s := k.String()
			if strings.HasPrefix(s, "EventKind(") {
				break
			}
			if n == "*" || n == s {
				kinds = append(kinds, k)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("webhook: unknown event kind %q", n)
		}
	}
	return kinds, nil
}

// wireEvent converts a relay event to its JSON form.
func wireEvent(id string, e *relay.Event) Event {
	w := Event{
		ID:       id,
		Kind:     e.Kind.String(),
		Time:     e.Time,
		QueueID:  string(e.ID),
		Stream:   e.Stream,
		From:     e.From,
		Rcpt:     e.Rcpt,
		Dest:     e.Dest,
		Host:     e.Host,
		Attempts: e.Attempts,
		DSNID:    string(e.DSNID),
		Identity: e.Identity,
		Size:     e.Size,
	}
	if w.Stream == "" {
		w.Stream = queue.DefaultStream
	}
	if e.Reply.Code != 0 || e.Reply.Text != "" {
		w.Reply = &Reply{Code: e.Reply.Code, Enhanced: e.Reply.Enhanced, Text: e.Reply.Text}
		if w.Host == "" {
			w.Host = e.Reply.Host
		}
	}
	if e.TLS.Version != 0 {
		w.TLS = &TLS{Version: tls.VersionName(e.TLS.Version), Verified: e.TLS.Verified}
	}
	if e.Duration > 0 {
		ms := e.Duration.Milliseconds()
		if e.Kind == relay.EventAccepted {
			w.SubmitMS = ms
		} else {
			w.QueuedForMS = ms
		}
	}
	return w
}
