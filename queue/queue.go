package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"
)

// ID names one queued message. IDs are opaque, unique within a queue, and
// safe to print in logs and file names.
type ID string

// Notify is the RFC 3461 NOTIFY parameter of one recipient, as a bit set.
// The zero value means the parameter was absent, which a DSN generator
// treats as FAILURE,DELAY.
type Notify uint8

// NOTIFY keywords. NotifyNever excludes the others.
const (
	NotifyNever Notify = 1 << iota
	NotifySuccess
	NotifyFailure
	NotifyDelay
)

// Ret is the RFC 3461 RET parameter: how much of the message a DSN returns.
type Ret string

// RET values; the empty value means the parameter was absent.
const (
	RetFull    Ret = "FULL"
	RetHeaders Ret = "HDRS"
)

// Recipient is one forward-path of a message with its DSN parameters.
type Recipient struct {
	// Addr is the address, local@domain, without angle brackets.
	Addr string
	// Notify is the RFC 3461 NOTIFY parameter.
	Notify Notify
	// ORCPT is the RFC 3461 original recipient, as "type;address"
	// (for example "rfc822;user@example.test"), or empty.
	ORCPT string
}

// Domain returns the part of the address after the last '@', in lower case.
func (r Recipient) Domain() string { return Domain(r.Addr) }

// Domain returns the domain of an address (the part after the last '@') in
// lower case, without a trailing dot. It returns "" when addr has no '@'.
func Domain(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	return strings.TrimSuffix(strings.ToLower(addr[i+1:]), ".")
}

// Envelope is what the SMTP transaction (or a Go caller) said about a
// message besides its content. It is immutable once enqueued.
type Envelope struct {
	// From is the reverse-path without angle brackets; "" is the null
	// sender (bounces), which is never itself bounced.
	From string
	// To lists the recipients, at least one, without duplicates.
	To []Recipient
	// Ret and EnvID are the RFC 3461 MAIL parameters.
	Ret   Ret
	EnvID string
	// SMTPUTF8 is set when the message needs RFC 6531 SMTPUTF8 support.
	SMTPUTF8 bool
	// EightBit is set when the body was declared BODY=8BITMIME.
	EightBit bool
	// RequireTLS is set for RFC 8689 REQUIRETLS messages: they may only
	// travel over verified TLS.
	RequireTLS bool
	// Identity names the authenticated submitter or allow-listed client,
	// for logs and per-identity accounting; empty when unknown.
	Identity string
	// Held enqueues the message on hold: stored, listed and inspectable,
	// but never leased until Release. Sandbox identities use it to capture
	// mail that must not be delivered.
	Held bool
	// Sandbox marks mail captured from a sandbox identity (it is Held
	// too): admin tools show such messages as that identity's sandbox
	// mailbox.
	Sandbox bool
	// Stream names the mail stream the message belongs to ("bulk",
	// "transactional"...). Streams let a relay share delivery capacity so
	// that one stream's backlog never delays another; "" means
	// DefaultStream.
	Stream string
}

// DefaultStream is the stream of a message whose Envelope.Stream is empty.
const DefaultStream = "transactional"

// ValidStreamName reports why name cannot name a stream, or nil. Stream
// names are 1 to 64 lower-case ASCII letters, digits, '-', '_' and '.',
// so that they fit in password file attributes, headers, metric labels
// and logs.
func ValidStreamName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("queue: stream name %q: want 1 to 64 characters", name)
	}
	for _, c := range []byte(name) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("queue: stream name %q: only a-z, 0-9, '-', '_' and '.' are allowed", name)
		}
	}
	return nil
}

// StreamName returns e.Stream, or DefaultStream when it is empty.
func (e *Envelope) StreamName() string { return StreamName(e.Stream) }

// StreamName returns the stream a name selects: name itself, or
// DefaultStream for "".
func StreamName(name string) string {
	if name == "" {
		return DefaultStream
	}
	return name
}

// State is the queue state of a whole message.
type State int

// Message states. A message with every recipient final is no longer in the
// queue and has no state.
const (
	// StateQueued: waiting for its next attempt (or due now) and not yet
	// tried for any recipient.
	StateQueued State = iota + 1
	// StateDeferred: tried at least once, some recipients wait for a retry.
	StateDeferred
	// StateLeased: a worker holds a lease on it.
	StateLeased
	// StateHeld: on hold; never leased until released.
	StateHeld
)

// States returns every message state, in the order reports list them.
func States() []State { return []State{StateQueued, StateDeferred, StateLeased, StateHeld} }

var stateNames = map[State]string{StateQueued: "queued", StateDeferred: "deferred", StateLeased: "leased", StateHeld: "held"}

func (s State) String() string {
	if n, ok := stateNames[s]; ok {
		return n
	}
	return "unknown"
}

// MarshalText encodes a state as its name, so JSON and other text
// encodings show "queued" rather than a number.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText is the inverse of MarshalText.
func (s *State) UnmarshalText(b []byte) error {
	v, ok := ParseState(string(b))
	if !ok {
		return errors.New("queue: unknown state " + strconv.Quote(string(b)))
	}
	*s = v
	return nil
}

// ParseState is the inverse of State.String.
func ParseState(s string) (State, bool) {
	for k, v := range stateNames {
		if v == strings.ToLower(s) {
			return k, true
		}
	}
	return 0, false
}

// RcptState is where one recipient of a message stands.
type RcptState int

// Recipient states. Delivered and Failed are final.
const (
	RcptPending RcptState = iota
	RcptDelivered
	RcptFailed
)

func (s RcptState) String() string {
	switch s {
	case RcptPending:
		return "pending"
	case RcptDelivered:
		return "delivered"
	case RcptFailed:
		return "failed"
	}
	return "unknown"
}

// Result is what one delivery attempt did for one recipient.
type Result int

// Results a worker reports in Settle.
const (
	// Delivered: the destination accepted the recipient (2xx). Final.
	Delivered Result = iota + 1
	// Retry: a temporary failure (4xx, network, DNS); try again later.
	Retry
	// Failed: a permanent failure (5xx). Final.
	Failed
)

func (r Result) String() string {
	switch r {
	case Delivered:
		return "delivered"
	case Retry:
		return "retry"
	case Failed:
		return "failed"
	}
	return "unknown"
}

// Reply is an SMTP reply, or the local equivalent of one, that decided a
// recipient's outcome.
type Reply struct {
	// Code is the three-digit SMTP reply code (250, 451, 550...).
	Code int
	// Enhanced is the RFC 3463 enhanced status code ("5.1.1"), or "".
	Enhanced string
	// Text is the reply text (what the remote server said, or a local
	// explanation such as "connection refused").
	Text string
	// Host is the remote host that gave the reply, or "" for a local one.
	Host string
}

// String formats the reply as it would appear on the wire, with the host.
func (r Reply) String() string {
	var b strings.Builder
	if r.Code != 0 {
		b.WriteString(itoa(r.Code))
		b.WriteByte(' ')
	}
	if r.Enhanced != "" {
		b.WriteString(r.Enhanced)
		b.WriteByte(' ')
	}
	b.WriteString(r.Text)
	if r.Host != "" {
		b.WriteString(" (")
		b.WriteString(r.Host)
		b.WriteString(")")
	}
	return b.String()
}

func itoa(n int) string {
	if n <= 0 || n > 999 {
		return "000"
	}
	return string([]byte{byte('0' + n/100), byte('0' + n/10%10), byte('0' + n%10)})
}

// Attempt is one entry of a recipient's history.
type Attempt struct {
	At     time.Time
	Result Result
	Reply  Reply
}

// MaxHistory bounds the attempts kept per recipient; older ones are
// dropped first, so memory and metadata size stay bounded.
const MaxHistory = 16

// RecipientStatus is the queue's record of one recipient.
type RecipientStatus struct {
	Recipient
	State RcptState
	// Attempts counts delivery attempts reported for this recipient.
	Attempts int
	// NextAttempt is when a pending recipient is next due.
	NextAttempt time.Time
	// Last is the reply of the most recent attempt.
	Last Reply
	// Expired is set when the recipient failed because the message
	// reached the schedule's maximum age.
	Expired bool
	// History holds the most recent attempts, oldest first, at most
	// MaxHistory of them.
	History []Attempt
}

// Message is a snapshot of a queued message. Snapshots are copies: changing
// one does not change the queue.
type Message struct {
	ID       ID
	Envelope Envelope
	// Received is when the message was enqueued.
	Received time.Time
	// Expires is when pending recipients fail as expired (Received plus the
	// schedule's MaxAge).
	Expires time.Time
	// Size is the body's size in bytes.
	Size  int64
	State State
	// Recipients holds one status per Envelope.To entry, in the same order.
	Recipients []RecipientStatus
}

// NextAttempt returns the earliest NextAttempt among pending recipients, or
// the zero time when none is pending.
func (m *Message) NextAttempt() time.Time {
	var t time.Time
	for _, r := range m.Recipients {
		if r.State == RcptPending && (t.IsZero() || r.NextAttempt.Before(t)) {
			t = r.NextAttempt
		}
	}
	return t
}

// Clone returns a deep copy of m.
func (m *Message) Clone() *Message {
	c := *m
	c.Envelope.To = append([]Recipient(nil), m.Envelope.To...)
	c.Recipients = make([]RecipientStatus, len(m.Recipients))
	for i, r := range m.Recipients {
		r.History = append([]Attempt(nil), r.History...)
		c.Recipients[i] = r
	}
	return &c
}

// Lease is a worker's exclusive, time-bounded claim on a due message.
type Lease struct {
	// Token identifies this lease; Settle refuses a token whose lease has
	// expired and been taken by another worker.
	Token string
	// Message is the message as it was when leased.
	Message *Message
	// Due lists the indexes into Message.Recipients that are pending and
	// due: the recipients this worker should attempt.
	Due []int
	// Until is when the lease expires unless settled.
	Until time.Time
}

// Outcome reports the result of an attempt for one recipient of a lease.
type Outcome struct {
	// Rcpt is the recipient address, as in Envelope.To.
	Rcpt string
	// Result is what happened.
	Result Result
	// Reply is the reply that decided it.
	Reply Reply
	// RetryAt is when to try again, for Retry; the zero time lets the
	// queue's Schedule choose from the recipient's attempt count.
	RetryAt time.Time
}

// Filter selects messages for List and Retry. The zero Filter selects all.
type Filter struct {
	// ID selects one message.
	ID ID
	// Domain selects messages with a pending recipient at this domain.
	Domain string
	// Sender selects messages whose envelope sender equals this address
	// (case-insensitively); use Null to select null-sender messages.
	Sender string
	// Null selects null-sender messages (Sender is then ignored).
	Null bool
	// State selects messages in this state; zero selects every state.
	State State
	// ReceivedBefore selects messages received before this time.
	ReceivedBefore time.Time
	// Stream selects messages of this stream (compared with
	// Envelope.StreamName, so DefaultStream selects "" too).
	Stream string
}

// Match reports whether m is selected by f.
func (f *Filter) Match(m *Message) bool {
	if f.ID != "" && m.ID != f.ID {
		return false
	}
	if f.Null && m.Envelope.From != "" {
		return false
	}
	if !f.Null && f.Sender != "" && !strings.EqualFold(m.Envelope.From, f.Sender) {
		return false
	}
	if f.State != 0 && m.State != f.State {
		return false
	}
	if f.Stream != "" && m.Envelope.StreamName() != f.Stream {
		return false
	}
	if !f.ReceivedBefore.IsZero() && !m.Received.Before(f.ReceivedBefore) {
		return false
	}
	if f.Domain != "" {
		d := strings.TrimSuffix(strings.ToLower(f.Domain), ".")
		found := false
		for _, r := range m.Recipients {
			if r.State == RcptPending && r.Domain() == d {
				found = true
				break
			}
		}
		if !found {
			return false
		}
	}
	return true
}

// Stats counts queued messages.
type Stats struct {
	// ByState counts messages per state.
	ByState map[State]int
	// ByDomain counts pending recipients per destination domain.
	ByDomain map[string]int
	// Quarantined counts damaged files a persistent backend moved aside
	// instead of delivering (0 for backends that never quarantine).
	Quarantined int
	// ByStream counts messages per stream (Envelope.StreamName).
	ByStream map[string]int
	// Oldest is, per state, the earliest Received time among messages in
	// that state: how long the oldest message has waited.
	Oldest map[State]time.Time
}

// Add counts m into s; backends share it to implement Stats. It creates
// the maps it needs.
func (s *Stats) Add(m *Message) {
	if s.ByState == nil {
		s.ByState = map[State]int{}
	}
	if s.ByDomain == nil {
		s.ByDomain = map[string]int{}
	}
	if s.ByStream == nil {
		s.ByStream = map[string]int{}
	}
	if s.Oldest == nil {
		s.Oldest = map[State]time.Time{}
	}
	s.ByState[m.State]++
	s.ByStream[m.Envelope.StreamName()]++
	if t, ok := s.Oldest[m.State]; !ok || m.Received.Before(t) {
		s.Oldest[m.State] = m.Received
	}
	for _, r := range m.Recipients {
		if r.State == RcptPending {
			s.ByDomain[r.Domain()]++
		}
	}
}

// Queue keeps accepted messages safe until every recipient is final.
//
// Contract, which every implementation must keep and queue/queuetest checks:
//
//   - Safe for concurrent use by many goroutines (and, for shared backends,
//     many processes).
//   - Enqueue reads the body to EOF and returns an ID only when the message
//     is durable: for persistent backends, a crash after Enqueue returns
//     loses nothing. It returns an error and stores nothing otherwise; an
//     error caused by a full disk matches ErrNoSpace with errors.Is.
//     Bodies are stored byte for byte (8-bit data, long lines and bare
//     CR/LF alike) and streamed: never held whole in memory.
//   - Lease blocks until at least one message is due (or ctx is done) and
//     then leases up to max due messages exclusively until Lease.Until. A
//     message is due when it is not held, not leased under a live lease,
//     and one of its pending recipients has NextAttempt at or before now.
//     Each due message is leased by exactly one caller. A lease that is not
//     settled in time expires and the message is due again: delivery is
//     at-least-once.
//   - Settle records one outcome per attempted recipient and ends the
//     lease. Recipients without an outcome stay pending and become due
//     again at their previous NextAttempt. A Retry whose time would fall at
//     or after Message.Expires fails the recipient as expired instead
//     (Expired is set). When every recipient is final the message leaves
//     the queue. Settle returns the updated snapshot. Settling a lease that
//     expired and was re-leased returns ErrLeaseLost and changes nothing.
//   - Open streams the stored body; callers close it.
//   - Errors for unknown IDs match ErrNotFound with errors.Is. Deleting a
//     message twice returns ErrNotFound the second time and does no harm.
//   - After Close, calls return ErrClosed.
type Queue interface {
	// Enqueue stores a message and returns its ID once it is durable.
	Enqueue(ctx context.Context, env *Envelope, body io.Reader) (ID, error)
	// Lease waits for due messages and leases up to max of them for d.
	Lease(ctx context.Context, max int, d time.Duration) ([]*Lease, error)
	// Settle records the outcomes of a lease and releases it.
	Settle(ctx context.Context, l *Lease, outcomes []Outcome) (*Message, error)
	// Open returns the body of a queued message.
	Open(ctx context.Context, id ID) (io.ReadCloser, error)

	Admin
	io.Closer
}

// StreamLeaser is implemented by queues that can lease the messages of one
// stream, so that a relay can give each stream its own share of delivery
// capacity. LeaseStream keeps Lease's contract except that it considers
// only messages whose Envelope.StreamName equals stream; Lease itself still
// leases messages of every stream. A relay whose queue lacks it delivers
// every stream from one shared lease loop, in the queue's order.
type StreamLeaser interface {
	LeaseStream(ctx context.Context, stream string, max int, d time.Duration) ([]*Lease, error)
}

// Admin is the operator's view of a queue: what postqueue and postsuper
// give Postfix users. Every method is safe to call while workers lease and
// settle.
type Admin interface {
	// Get returns one message with its per-recipient history.
	Get(ctx context.Context, id ID) (*Message, error)
	// List calls fn for each message selected by f, in no particular
	// order, without holding the whole queue in memory. An error from fn
	// stops the walk and is returned.
	List(ctx context.Context, f Filter, fn func(*Message) error) error
	// Hold puts a message on hold; a leased message is held once its lease
	// is settled or expires.
	Hold(ctx context.Context, id ID) error
	// Release takes a message off hold and makes it due now.
	Release(ctx context.Context, id ID) error
	// Delete removes a message without delivering or bouncing it.
	Delete(ctx context.Context, id ID) error
	// Retry makes the pending recipients of the selected, unheld messages
	// due now and returns how many messages it touched. With a Domain,
	// only recipients at that domain are made due.
	Retry(ctx context.Context, f Filter) (int, error)
	// Stats counts messages by state and pending recipients by domain.
	Stats(ctx context.Context) (*Stats, error)
}

// Errors a Queue returns; match them with errors.Is.
var (
	ErrNotFound  = errors.New("queue: message not found")
	ErrLeaseLost = errors.New("queue: lease expired or taken by another worker")
	ErrClosed    = errors.New("queue: closed")
	ErrNoSpace   = errors.New("queue: insufficient storage")
	// ErrInvalid is returned by Enqueue for an envelope without
	// recipients or with malformed fields.
	ErrInvalid = errors.New("queue: invalid envelope")
)

// Validate checks the parts of an envelope every backend relies on.
func (e *Envelope) Validate() error {
	if len(e.To) == 0 {
		return errors.Join(ErrInvalid, errors.New("no recipients"))
	}
	seen := make(map[string]bool, len(e.To))
	for _, r := range e.To {
		if r.Addr == "" || strings.ContainsAny(r.Addr, "\r\n") {
			return errors.Join(ErrInvalid, errors.New("empty or malformed recipient"))
		}
		k := strings.ToLower(r.Addr)
		if seen[k] {
			return errors.Join(ErrInvalid, errors.New("duplicate recipient "+r.Addr))
		}
		seen[k] = true
	}
	if strings.ContainsAny(e.From, "\r\n") {
		return errors.Join(ErrInvalid, errors.New("malformed sender"))
	}
	return nil
}
