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
	// Scopes are the API key scopes of the identity, if any.
	Scopes []string
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
	From   string
	To     []string
	Size   int64
	Header textproto.Header
}

// Policy checks each stage of a submission.
//
// Hooks run in order Connect, (Auth), Mail, Rcpt once per recipient, Data.
// A hook returns nil to allow, or an *smtp.SMTPError to refuse with that
// reply; any other error is answered 451 4.3.0 and logged. Implementations
// are safe for concurrent use; hooks must honour ctx.
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
	// Data runs once the whole message has been received, before it is
	// queued.
	Data(ctx context.Context, c *Client, m *Message) error
}

// Reject returns an SMTP error whose enhanced code is forced into the class
// of code (4 or 5), so a temporary reply can never carry a permanent
// enhanced code. enhanced is given as three numbers, e.g. Reject(550,
// [3]int{5,7,1}, "Relay access denied").
func Reject(code int, enhanced [3]int, text string) *smtp.SMTPError {
	enhanced[0] = code / 100
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enhanced), Message: text}
}
