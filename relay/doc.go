// Package relay is baton's pipeline: it takes mail in, queues it, and
// delivers it.
//
// A Relay (New) implements Submitter: Submit signs a message (when a
// Signer is configured), stores it in the queue and returns its ID once it
// is durable. In the background the Relay's scheduler leases due messages
// from the queue, groups each message's due recipients by destination
// (the route key from the mx.Resolver: one per domain, or one per static
// route), waits for that destination's limits (concurrency, rate), hands
// each group to the Deliverer in one SMTP transaction per message and
// destination, and settles the lease with one outcome per recipient: 2xx
// delivered, 4xx retried later on the queue's Schedule, 5xx failed.
// Failed and expired recipients are reported to the envelope sender with
// an RFC 3464 delivery status notification, queued (with the null sender)
// before the failure is recorded, so a crash can repeat a bounce but never
// lose one; null-sender mail is never bounced.
//
// Messages belong to mail streams (Config.Streams, StreamConfig):
// "transactional" by default, "bulk", or others. With a queue that leases
// by stream (queue.StreamLeaser) each stream has its own lease loop,
// in-flight leases, share of the workers and per-destination limits and
// connections, so that a bulk backlog never delays transactional mail.
// The Server takes the stream from the client's identity or from a
// header (ServerConfig.StreamHeader) that it removes.
//
// Server is the SMTP front end (RFC 5321, with RFC 3207 STARTTLS, RFC 4954
// AUTH, RFC 1870 SIZE, RFC 6152 8BITMIME, RFC 2920 PIPELINING, RFC 6531
// SMTPUTF8, RFC 2034 ENHANCEDSTATUSCODES, RFC 3461 DSN and RFC 8689
// REQUIRETLS); it is one caller of Submit among others.
//
// SMTPDeliverer is the default Deliverer: an SMTP client with connection
// reuse per destination, opportunistic or required STARTTLS, RFC 2920
// PIPELINING of each transaction's commands, and RFC 5321 §4.5.3.2
// timeouts.
//
// Bounces are RFC 3464 delivery status notifications (multipart/report,
// RFC 6522, with RFC 6533 types for internationalised mail), honouring the
// RFC 3461 DSN parameters given at submission (NOTIFY, RET, ENVID, ORCPT)
// and marked Auto-Submitted (RFC 3834). Optional delay warnings go out once
// a message has waited Config.DelayWarning. A Suppressions list fails
// recipients that bounced permanently with "no such user" kinds of codes
// (5.1.1, 5.1.10, ...) for later messages, reporting them, never dropping
// them silently. An Observer receives one typed Event per step (accepted,
// delivered, deferred, failed, expired, suppressed, DSN sent) with the
// queue ID, the remote reply and TLS details; SlogObserver logs them.
// Metrics (no-op unless set) receives the same events plus what is not
// about one message: delivery attempt durations, the server's replies,
// inbound TLS, AUTH failures and refusals by limits and policy.
//
// Every stage is an interface (Submitter, queue.Queue, mx.Resolver,
// Deliverer, policy.Policy), so a host program can replace any one of them.
package relay
