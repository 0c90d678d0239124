// Package baton is an SMTP relay you can import.
//
// A message travels one way through five stages, each an interface with a
// default implementation, wired together by package relay:
//
//	SMTP client ─▶ relay.Server ─┐
//	Go caller ───────────────────┤
//	                             ▼
//	relay.Submitter (relay.Relay)     auth: who is sending?
//	                                  policy: may they send this, now?
//	                                  dkim: sign for the sender's domain
//	                             ▼
//	queue.Queue                       durable: 250 only after it is stored
//	                             ▼
//	scheduler (relay.Relay)           leases due mail, groups recipients by destination
//	mx.Resolver                       domain → hosts in order + TLS policy
//	relay.Deliverer                   SMTP client, pooled connections
//	                             ▼
//	per-recipient results → queue: delivered / retry at T / failed → DSN to the sender
//
// Start with relay.New: with a zero relay.Config it runs in-process with an
// in-memory queue and DNS from the system, so a test or a host program can
// submit mail with one call. For a daemon, see examples/relayd, which uses
// the file-backed queue.Dir, reads a TOML configuration, and adds the
// SMTP submission listeners, password and API-key authentication and
// DKIM signing.
//
// Packages:
//
//   - queue: what a queued message is and keeping it safe (Memory, Dir,
//     the Schedule of retries, and queue/queuetest, the conformance suite
//     for custom backends).
//   - mx: where mail for a domain goes (DNS with MX rules of RFC 5321 and
//     RFC 7505, static routes and smarthosts, MTA-STS).
//   - auth: who a submitter is (password file, API keys, IP allow-lists).
//   - policy: what a submitter may do, one hook per SMTP stage.
//   - dkim: DKIM signing keys, the signer, and a sender-domain readiness
//     check.
//   - relay: the pipeline, the SMTP server, the SMTP deliverer, DSNs and
//     events.
package baton
