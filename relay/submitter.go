package relay

import (
	"context"
	"io"

	"github.com/batonmail/baton/queue"
)

// Submitter accepts messages into the relay.
//
// Submit reads body (a complete RFC 5322 message with CRLF line endings)
// to EOF and returns the queue ID only when the message is durable in the
// queue; until then nothing is promised. A refusal is an *smtp.SMTPError
// (from github.com/emersion/go-smtp) with the reply a client should see;
// other errors are internal and are answered 451 4.3.0 by the SMTP server.
// Implementations are safe for concurrent use. The SMTP Server is one
// caller; Go programs call Submit directly.
type Submitter interface {
	Submit(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error)
}

// SubmitterFunc adapts a function to Submitter.
type SubmitterFunc func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error)

// Submit calls f.
func (f SubmitterFunc) Submit(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
	return f(ctx, env, body)
}
