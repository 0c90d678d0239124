// Package policy decides what a submitter may do, one SMTP stage at a time.
//
// A Policy has one hook per stage of an SMTP session: connect, AUTH, MAIL,
// RCPT and end of DATA. Each hook returns nil to allow or an
// *smtp.SMTPError (from github.com/emersion/go-smtp) to refuse with that
// exact reply; the server sends it as it is. Refusals carry matching basic
// and enhanced codes (a 4xx with a 4.x.x, a 5xx with a 5.x.x; build them
// with Reject) and text that reveals nothing internal.
//
// The relay describes the client with a Client value it fills from the
// auth package's Identity, so this package depends on no other baton
// package.
//
// Policies compose with Chain (first refusal wins); Base allows everything
// and is embedded by policies that care about a few stages; Funcs adapts
// plain functions. The built-ins, in the order a Chain usually lists them:
//
//   - AuthThrottle: delays after failed AUTH, 421 after several on one
//     connection, then blocks the address for a while (refused at Connect).
//   - ConnLimit: concurrent connections per address (421 4.7.0).
//   - ClosedRelay: unauthenticated clients reach only local domains, and
//     nothing at all when there are none (530 5.7.0, 554 5.7.1).
//   - SendScope: API keys need the "send" scope (550 5.7.1).
//   - Senders: envelope sender and header From limited to the identity's
//     domains and addresses (553 5.7.1).
//   - Limits: recipients per message (452 4.5.3) and size (552 5.3.4).
//   - RateLimit: messages and recipients per window, per address and per
//     identity (450 4.7.1 with a retry hint).
//
// Policies that keep per-connection state implement Closer, and the
// server calls Disconnect when a connection ends; policies that know a
// size limit implement SizeLimiter so the server can stop reading early.
// Memory of every built-in is bounded: per-address and per-identity state
// is evicted when idle and capped in size.
//
// Standards: RFC 5321 (SMTP: reply codes, relaying rules of section 3.6,
// recipient limits of 4.5.3.1.10), RFC 3463 and RFC 5248 (enhanced status
// codes), RFC 4954 (AUTH, 530 5.7.0 Authentication required), RFC 1870
// (SIZE, 552 5.3.4), RFC 6409 (message submission: the submission server
// may enforce sender addresses), RFC 5322 (the From header).
package policy

import (
	"context"
	"net/netip"
	"time"

	"github.com/emersion/go-message/textproto"
	"github.com/emersion/go-smtp"
)

// Client is what the policy knows about an SMTP client (or Go caller).
type Client struct {
	// Addr is the client's IP address; the zero Addr for in-process
	// submissions.
	Addr netip.Addr
	// HELO is the name given in EHLO/HELO.
	HELO string
	// TLS is set once the connection is encrypted.
	TLS bool
	// Authenticated is set after AUTH succeeded or the client's address
	// matched an allow-list: only then may it relay.
	Authenticated bool
	// Identity names the submitter when Authenticated.
	Identity string
	// SenderDomains and SenderAddrs restrict the senders of an
	// authenticated client; both empty means unrestricted.
	SenderDomains []string
	SenderAddrs   []string
	// MaxSize caps the message size for this client; 0 means the
	// server's limit.
	MaxSize int64
	// Rate is this client's own limit; zero fields mean unlimited.
	Rate Rate
	// Scopes are the API key scopes of the identity, if any; nil for
	// identities without scopes (passwords, allow-lists), which may do
	// everything.
	Scopes []string
	// Sandbox is set when the identity's mail is captured, not delivered.
	Sandbox bool

	// state holds per-connection counters of the built-in policies (the
	// recipients of the current transaction, AUTH failures), keyed by
	// policy. Hooks of one Client run one at a time (see Policy), so it
	// needs no lock; it lives here so that it ends with the connection.
	state map[any]int
}

// add adds n to the counter of c named key and returns its new value.
func (c *Client) add(key any, n int) int {
	if c.state == nil {
		c.state = make(map[any]int)
	}
	c.state[key] += n
	return c.state[key]
}

func (c *Client) get(key any) int { return c.state[key] }

func (c *Client) set(key any, v int) {
	if c.state == nil {
		c.state = make(map[any]int)
	}
	c.state[key] = v
}

// Rate is a limit over a window: at most Messages messages and Recipients
// recipients per Per. Zero fields are unlimited.
type Rate struct {
	Messages   int
	Recipients int
	Per        time.Duration
}

// Message is what the DATA hook sees: the envelope and the parsed header.
// The body is not shown to policies, so the relay never holds it whole.
type Message struct {
	From string
	To   []string
	// Size is the message size when it is known in advance: for the SMTP
	// server, the size the client declared with the RFC 1870 SIZE
	// parameter, or 0 when it declared none. The server calls Data before
	// the body has arrived and enforces its size limits (SizeLimiter,
	// Client.MaxSize) while the body streams.
	Size   int64
	Header textproto.Header
}

// Policy checks each stage of a submission.
//
// Hooks run in order Connect, (Auth), Mail, Rcpt once per recipient, Data.
// A hook returns nil to allow, or an *smtp.SMTPError to refuse with that
// reply; any other error is answered 451 4.3.0 and logged. Implementations
// are safe for concurrent use; hooks must honour ctx.
//
// The caller keeps one *Client per connection (or per in-process
// submission) and passes that same pointer to every hook, updating its
// fields (TLS, Authenticated, Identity...) as the session goes on. It
// calls the Connect, Auth, Mail and Rcpt hooks of one Client one at a time,
// never concurrently; Data may overlap with a later Mail only under BDAT.
// When a policy also implements Closer, the caller calls Disconnect once
// when the connection ends, whatever Connect returned.
type Policy interface {
	// Connect runs when a client connects, before the greeting.
	Connect(ctx context.Context, c *Client) error
	// Auth runs after each AUTH attempt with whether it succeeded, so a
	// policy can throttle failures; an error replaces the server's reply
	// (a 421 also closes the connection).
	Auth(ctx context.Context, c *Client, username string, ok bool) error
	// Mail runs at MAIL FROM; from is "" for the null sender.
	Mail(ctx context.Context, c *Client, from string) error
	// Rcpt runs at each RCPT TO.
	Rcpt(ctx context.Context, c *Client, from, to string) error
	// Data runs once the message header has been received and parsed,
	// before the message is queued: the body is still streaming from the
	// client, and a refusal means nothing is queued. Size limits are
	// enforced by the server while the body streams, not here.
	Data(ctx context.Context, c *Client, m *Message) error
}

// Closer is implemented by policies that keep per-connection state (such
// as ConnLimit, which counts open connections per address). The server
// calls Disconnect exactly once for every Client it passed to Connect, when
// the connection ends, whether or not Connect refused it; in-process
// callers that call Connect do the same. Disconnect must not block.
type Closer interface {
	Disconnect(ctx context.Context, c *Client)
}

// SizeLimiter is implemented by policies that cap the message size (Limits,
// and a Chain holding one). The server may call MaxMessageSize after MAIL
// to stop reading DATA early (answering 552 5.3.4) instead of receiving a
// message the Data hook is bound to refuse; 0 means no limit.
type SizeLimiter interface {
	MaxMessageSize(c *Client) int64
}

// Reject returns an SMTP error whose enhanced code is forced into the class
// of code (4 or 5), so a temporary reply can never carry a permanent
// enhanced code. enhanced is given as three numbers, e.g. Reject(550,
// [3]int{5,7,1}, "Relay access denied").
func Reject(code int, enhanced [3]int, text string) *smtp.SMTPError {
	enhanced[0] = code / 100
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enhanced), Message: text}
}
