package relay

import (
	"context"
	"time"

	"github.com/emersion/go-smtp"
)

// Metrics receives what the relay and the SMTP server measure: every Event
// (Metrics is an Observer) and the facts that are not events about one
// message: delivery attempts with their duration, the replies the server
// sends, inbound connections and TLS, failed AUTH attempts and refusals.
// Set it as Config.Metrics and ServerConfig.Metrics; nil means NopMetrics,
// so a library user carries no metrics stack unless they ask for one.
//
// Contract: methods are called synchronously from the submission, delivery
// and connection paths (ServerReply once for every reply the server
// sends), from many goroutines at once. Implementations must be safe for
// concurrent use, must return quickly, must never block (no I/O, no
// waiting on a lock held across I/O) and must not panic. Arguments are
// only valid during the call: an implementation must not keep or modify
// a *DeliveryResult. Methods may be added to this interface in later
// versions; embed NopMetrics to keep an implementation compiling.
type Metrics interface {
	Observer
	// DeliveryAttempt reports one delivery attempt (one Deliverer.Deliver
	// call, usually one SMTP transaction) to the destination dest (the
	// group key, as Event.Dest) that took elapsed, from the start of the
	// attempt to its last reply. Attempts that never started, because
	// the relay was shutting down or the lease ran out while waiting for
	// the destination's limits, are not reported.
	DeliveryAttempt(dest string, elapsed time.Duration, res *DeliveryResult)
	// ServerConnection reports a client connection the server accepted
	// (not one refused for MaxConns; see Refused).
	ServerConnection()
	// ServerTLS reports a completed inbound TLS handshake (implicit TLS or
	// STARTTLS) with the negotiated version (tls.VersionTLS13...).
	ServerTLS(version uint16)
	// ServerReply reports the code of a reply the server sent (once per
	// reply, not per line of a multi-line reply).
	ServerReply(code int)
	// AuthFailure reports a failed AUTH attempt with its SASL mechanism
	// ("PLAIN", "LOGIN"): wrong credentials, an authenticator error, or
	// a refusal by the policy's Auth hook.
	AuthFailure(mechanism string)
	// Refused reports a connection or command the server refused for a
	// limit or a policy: stage is one of the Stage constants and reason
	// one of the Refused constants.
	Refused(stage, reason string)
}

// Stages of an SMTP session, for Metrics.Refused.
const (
	StageConnect = "connect"
	StageAuth    = "auth"
	StageMail    = "mail"
	StageRcpt    = "rcpt"
	StageData    = "data"
	// StageCommand is any command, for refusals that are not about one
	// stage (a flood of commands without progress).
	StageCommand = "command"
)

// Reasons for Metrics.Refused. A policy's refusal is classified by its
// reply: policies report limits as temporary replies with an enhanced
// code of class x.7 (RFC 3463 security or policy status), such as
// policy.RateLimit's 450 4.7.1 and policy.ConnLimit's 421 4.7.0.
const (
	// RefusedConnLimit: a connection refused because of ServerConfig.MaxConns
	// or by the policy's Connect hook with a temporary 4.7.x reply
	// (policy.ConnLimit, or an address blocked by policy.AuthThrottle).
	RefusedConnLimit = "connection_limit"
	// RefusedRateLimit: MAIL, RCPT or DATA refused by the policy with a
	// temporary 4.7.x reply (policy.RateLimit).
	RefusedRateLimit = "rate_limit"
	// RefusedAuthLimit: a connection closed after too many failed AUTH
	// attempts (ServerConfig.MaxAuthFailures, or the policy's Auth hook
	// answering 421, as policy.AuthThrottle does).
	RefusedAuthLimit = "auth_limit"
	// RefusedCommandFlood: a connection closed after too many commands
	// without progress (ServerConfig.MaxJunkCommands).
	RefusedCommandFlood = "command_flood"
	// RefusedPolicy: any other refusal by the policy (relay denied, sender
	// not allowed, too many recipients...), MAIL without the required
	// authentication, and a message over the size limit (declared with
	// SIZE or found in the DATA). ServerConfig.MaxRecipients is enforced
	// by go-smtp itself and is not reported.
	RefusedPolicy = "policy"
)

// refusalReason classifies a policy's refusal at stage.
func refusalReason(stage string, reply *smtp.SMTPError) string {
	limit := reply.Code/100 == 4 && reply.EnhancedCode[0] == 4 && reply.EnhancedCode[1] == 7
	switch {
	case !limit:
		return RefusedPolicy
	case stage == StageConnect:
		return RefusedConnLimit
	case stage == StageAuth:
		return RefusedAuthLimit
	default:
		return RefusedRateLimit
	}
}

// NopMetrics is a Metrics that does nothing: the default. Embed it in an
// implementation that cares about a few methods only.
type NopMetrics struct{}

var _ Metrics = NopMetrics{}

// Observe implements Observer.
func (NopMetrics) Observe(context.Context, Event) {}

// DeliveryAttempt implements Metrics.
func (NopMetrics) DeliveryAttempt(string, time.Duration, *DeliveryResult) {}

// ServerConnection implements Metrics.
func (NopMetrics) ServerConnection() {}

// ServerTLS implements Metrics.
func (NopMetrics) ServerTLS(uint16) {}

// ServerReply implements Metrics.
func (NopMetrics) ServerReply(int) {}

// AuthFailure implements Metrics.
func (NopMetrics) AuthFailure(string) {}

// Refused implements Metrics.
func (NopMetrics) Refused(string, string) {}
