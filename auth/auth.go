// Package auth decides who a submitter is.
//
// An Authenticator turns SMTP AUTH credentials into an Identity; an
// AddrAuthenticator does the same for trusted client addresses that cannot
// authenticate (IP allow-lists). An Identity carries what the policy stage
// needs to know about the submitter; the relay passes those values on, so
// this package imports no other baton package.
//
// Implementations:
//
//   - PasswordFile: users with bcrypt password hashes in a text file
//     (htpasswd -B compatible, with optional per-user restrictions),
//     reloaded when it changes, edited safely (lock, temporary file,
//     rename, mode 0600). Unknown users cost a bcrypt comparison against a
//     dummy hash, like a wrong password, so timing does not reveal which
//     user names exist.
//   - APIKeys: random 256-bit keys presented as the password under a fixed
//     user name ("apikey"), stored as SHA-256 hashes, with scopes ("send",
//     "send:sandbox") and revocation.
//   - AllowList: an AddrAuthenticator for trusted networks (CIDR, IPv4 and
//     IPv6, IPv4-mapped addresses matched as IPv4).
//   - Multi and MultiAddr try several in order.
//
// The SMTP mechanisms that carry the credentials (RFC 4954 AUTH with RFC
// 4616 PLAIN, or the LOGIN mechanism) belong to the server; this package
// sees a user name and a password. Passwords are hashed with bcrypt
// (golang.org/x/crypto/bcrypt).
package auth

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"
)

// Identity is an authenticated submitter.
type Identity struct {
	// Name identifies the submitter in logs and accounting (a user name, an
	// API key's name, or an allow-list entry's name).
	Name string
	// SenderDomains and SenderAddrs restrict the envelope sender and the
	// header From to these domains and addresses; both empty means any
	// sender is allowed.
	SenderDomains []string
	SenderAddrs   []string
	// MaxSize caps the size of one message in bytes; 0 means the server's
	// limit.
	MaxSize int64
	// Rate limits what the identity may send; the zero value means no
	// per-identity limit.
	Rate Rate
	// Sandbox identities have their mail accepted and stored on hold but
	// never delivered: for staging environments.
	Sandbox bool
	// Scopes lists what an API key may do ("send" is needed to submit).
	// Password identities have no scopes and may do everything.
	Scopes []string
	// Stream, when set, is the mail stream ("transactional", "bulk"...)
	// of every message the identity submits, whatever the message asks
	// for; empty lets each message choose (relay.ServerConfig.StreamHeader),
	// defaulting to the transactional stream. See ValidStream.
	Stream string
}

// ValidStream reports why s cannot be an identity's stream, or nil: a
// stream name is empty (none pinned) or 1 to 64 lower-case ASCII letters,
// digits, '-', '_' and '.' (queue.ValidStreamName says the same; this
// package imports no other baton package, so it keeps its own copy).
func ValidStream(s string) error {
	if s == "" {
		return nil
	}
	if len(s) > 64 {
		return fmt.Errorf("auth: stream name %q too long", s)
	}
	for _, c := range []byte(s) {
		if !('a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("auth: stream name %q: only a-z, 0-9, '-', '_' and '.' are allowed", s)
		}
	}
	return nil
}

// MaySend reports whether the identity may submit mail: identities without
// scopes (nil Scopes: passwords, allow-lists) may; an API key needs "send",
// or "send:sandbox" when its mail is captured (Sandbox).
func (id *Identity) MaySend() bool {
	if id.Scopes == nil {
		return true
	}
	for _, s := range id.Scopes {
		if s == ScopeSend || s == ScopeSendSandbox && id.Sandbox {
			return true
		}
	}
	return false
}

// Rate is a limit over a window: at most Messages messages and Recipients
// recipients per Per. Zero fields are unlimited.
type Rate struct {
	Messages   int
	Recipients int
	Per        time.Duration
}

// Authenticator checks SMTP AUTH credentials.
//
// Authenticate returns the identity for valid credentials, an error
// matching ErrInvalidCredentials for wrong ones, and any other error for
// a failure to check (which the server answers with a temporary 454
// 4.7.0). Implementations are safe for concurrent use and take about the
// same time for unknown users as for wrong passwords.
type Authenticator interface {
	Authenticate(ctx context.Context, username, password string) (*Identity, error)
}

// AuthenticatorFunc adapts a function to Authenticator.
type AuthenticatorFunc func(ctx context.Context, username, password string) (*Identity, error)

// Authenticate calls f.
func (f AuthenticatorFunc) Authenticate(ctx context.Context, username, password string) (*Identity, error) {
	return f(ctx, username, password)
}

// AddrAuthenticator recognises trusted clients by address.
//
// AuthenticateAddr returns the identity of a client allowed to submit
// without AUTH, or an error matching ErrNotAllowed. Implementations are
// safe for concurrent use.
type AddrAuthenticator interface {
	AuthenticateAddr(ctx context.Context, addr netip.Addr) (*Identity, error)
}

// Errors returned by authenticators; match them with errors.Is.
var (
	ErrInvalidCredentials = errors.New("auth: invalid credentials")
	ErrNotAllowed         = errors.New("auth: address not allowed")
)
