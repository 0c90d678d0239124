// Package jetstream is a queue.Queue kept in NATS JetStream, so that
// several relay processes, on one machine or many, share one queue: every
// process can enqueue, every process leases due mail, an operator's hold,
// release, delete or retry made through any process applies everywhere,
// and when a process dies the messages it had leased are delivered by the
// others once the leases expire.
//
// Open connects (or takes a *nats.Conn) and creates what is missing:
//
//	q, err := jetstream.Open(ctx, jetstream.Config{
//		URL:      "nats://n1:4222,nats://n2:4222,nats://n3:4222",
//		Replicas: 3,
//		Node:     "relay-a",
//	})
//	r, err := relay.New(relay.Config{Queue: q})
//
// The queue passes queue/queuetest, so it behaves as the in-memory and
// file-backed queues do; the rest of this comment says how it does so on
// JetStream and what an operator needs to know.
//
// # Storage
//
// Two JetStream resources, named from Config.Prefix (default "baton"), hold
// a queue:
//
//   - The key-value bucket Prefix_queue holds one record per message under
//     its ID: the envelope and per-recipient state (queue.Message, as
//     JSON), the lease (token, expiry and the Node that holds it) and where
//     the body is. It keeps one revision per key.
//   - The stream Prefix_bodies holds bodies, each as a run of messages of
//     at most Config.ChunkSize bytes on the subject Prefix_bodies.ID. A
//     body of any size is written and read one chunk at a time, so neither
//     the writer nor the reader holds it whole, and bodies larger than the
//     server's max_payload are stored as a matter of course. The stream
//     refuses new bodies when Config.MaxBytes is reached (the error
//     matches queue.ErrNoSpace); it never drops old ones.
//
// Both use file storage with Config.Replicas copies. Enqueue writes the
// chunks (each acknowledged by JetStream), then creates the record (only
// if the key is new), and returns the ID once the record is acknowledged:
// with Replicas 3 a majority of the cluster holds the message. JetStream
// acknowledges a write once it is in the servers' files, not once it is
// fsynced (the servers sync every two minutes by default); with one
// replica, set sync_interval: always in the server's jetstream block to
// survive a power cut as the file-backed queue does.
//
// # Leases
//
// A lease is a field of the message's record, and every change to a record
// is a compare-and-set: KeyValue.Update with the revision that was read.
// To lease a message a process reads its record, checks that it is due (not
// held, no live lease, a pending recipient whose next attempt has come),
// writes a new token and expiry, and owns the message only if JetStream
// accepted that write; of several processes racing for a message exactly
// one write succeeds, and the others move on. An expired lease needs no
// clean-up: the next claim simply overwrites it. Settle applies the
// outcomes with queue.ApplyOutcomes to the record as the lease wrote it and
// writes the result conditionally on that revision (or removes the record,
// then the body, when every recipient is final); when something else
// wrote in between, it reads the record again and refuses with
// queue.ErrLeaseLost unless the record still carries the lease's token. Hold, Release, Delete and Retry are
// compare-and-set writes too, retried from a fresh read when another
// process wrote in between. No coordinator, lock service or leader
// election is needed beyond JetStream's own.
//
// This was chosen over a work-queue stream with acknowledgement deadlines
// (AckWait, NakWithDelay) because those run on the servers' clock and keep
// no per-recipient state: per-recipient retry times, holds, listing and
// filtering by domain or sender, deleting and retrying a message that is
// waiting, and tests with an injected clock all need random access to each
// message's state, which a record per message gives directly.
//
// Reads go to each stream's leader (direct gets are turned off on both),
// so a process always reads its own writes, and a lease taken through one
// server is seen by a process connected to another.
//
// # Scheduling
//
// Each process watches the records bucket and keeps a small index of every
// message: its revision, its mail stream, whether it is held, its lease
// expiry and the earliest next attempt of its pending recipients (about
// 160 bytes a message; bodies, envelopes and histories are never in it).
// The index keeps one due heap per mail stream (Envelope.StreamName):
// LeaseStream (queue.StreamLeaser) takes the due messages of its stream
// only, so a bulk backlog never delays transactional mail, and Lease
// takes the earliest due across every stream. Either claims them as
// above; when nothing is due it sleeps until the earliest due time, or
// until the watch reports a change that makes something due sooner (an
// Enqueue, Release or Retry in any process, or a Settle that asks for an
// earlier retry) in the stream it waits for. It never polls the servers. With an injected clock (Config.Now, for tests)
// it also looks at the clock every 100 milliseconds, since the clock can
// jump without anything in NATS changing.
//
// Processes compare times that others wrote (lease expiry, due times), so
// their clocks must agree to well within the lease time: run NTP.
//
// # Processes and restarts
//
// Give each process its own Config.Node (relayd uses the host name). A
// process that opens the queue with a Node ends the leases that an earlier
// process with that Node left behind, so the messages it was delivering
// when it died or was restarted are due again at once instead of after the
// lease time. A process that dies for good leaves its leases to expire,
// after which the others take the messages: delivery is at least once, and
// a message whose delivery was in flight when its process died may arrive
// twice.
//
// List, Stats and Retry stream the records through an ordered consumer
// with flow control, never loading the whole queue. A finished or deleted message's record is purged,
// leaving a delete marker that JetStream removes after 15 minutes, and its
// body is purged. Bodies that no record refers to, left by a process that
// died inside Enqueue or between purging a record and its body, are
// removed by Sweep, which the queue runs every Config.SweepInterval.
//
// # Requirements and limits
//
// NATS Server 2.11 or later with JetStream enabled (delete markers with a
// time to live need it), on one server or a cluster; the client is
// github.com/nats-io/nats.go. A record must fit in one NATS message
// (max_payload, 1 MiB by default): the oldest history entries are dropped
// when it would not, and an envelope with so many recipients that even
// its initial record is too large is refused with queue.ErrInvalid.
//
// The package implements no SMTP standard itself; it stores what
// queue.Envelope carries for RFC 5321 (envelope sender and recipients),
// RFC 3461 (DSN parameters), RFC 6531 (SMTPUTF8) and RFC 8689
// (REQUIRETLS) unchanged.
package jetstream
