package relay

import (
	"context"
	"io"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// Delivery is one message to hand to one destination for some of its
// recipients.
type Delivery struct {
	// ID is the queue ID, for logs.
	ID queue.ID
	// Envelope is the message's envelope (sender, DSN and TLS parameters).
	Envelope *queue.Envelope
	// Rcpts are the recipients to deliver to at this destination.
	Rcpts []queue.Recipient
	// Route says where to go and how strongly to protect the connection.
	Route *mx.Route
	// Size is the body size in bytes (for the SIZE parameter).
	Size int64
	// Open returns a fresh reader of the body each time it is called, so
	// a deliverer can start over with the next host.
	Open func(ctx context.Context) (io.ReadCloser, error)
}

// TLSInfo describes the protection of a delivery connection.
type TLSInfo struct {
	// Version is the negotiated TLS version (tls.VersionTLS13...), or 0
	// for plaintext.
	Version uint16
	// Verified is set when the certificate was verified for the host name.
	Verified bool
}

// DeliveryResult is what a delivery attempt did.
type DeliveryResult struct {
	// Replies holds one reply per Delivery.Rcpts entry, in order:
	// 2xx delivered, 4xx retry later, 5xx failed for good. Failures that
	// happen before a server replies (DNS, connect, TLS policy) are given
	// as local replies with the right class (e.g. 451 4.4.1).
	Replies []queue.Reply
	// Host is the host that gave the final replies ("" if none answered).
	Host string
	// TLS describes the connection that carried the transaction.
	TLS TLSInfo
	// RemoteDSN is set when the host that took the message advertised the
	// DSN extension, so it (not baton) reports success to the sender.
	RemoteDSN bool
}

// Deliverer delivers one message to one destination.
//
// Deliver tries the route's hosts in order until one takes the
// transaction, and returns a reply for every recipient: it never returns
// fewer replies than recipients and never panics on a misbehaving server.
// It honours ctx (cancelling it abandons the attempt, which the caller
// records as a temporary failure) and applies its own timeouts per SMTP
// stage. Implementations are safe for concurrent use.
type Deliverer interface {
	Deliver(ctx context.Context, d *Delivery) *DeliveryResult
}

// DelivererFunc adapts a function to Deliverer.
type DelivererFunc func(ctx context.Context, d *Delivery) *DeliveryResult

// Deliver calls f.
func (f DelivererFunc) Deliver(ctx context.Context, d *Delivery) *DeliveryResult { return f(ctx, d) }
