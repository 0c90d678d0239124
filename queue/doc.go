// Package queue keeps accepted mail safe until every recipient has a final
// outcome.
//
// A message enters with Enqueue (an Envelope and a streamed body) and is
// answered 250 by the SMTP server only after Enqueue returns, because from
// then on it survives a crash. Delivery workers Lease due messages: a lease
// is an exclusive claim for a bounded time, settled with one Outcome per
// attempted recipient (Delivered, Retry at a time with the reason, or
// Failed with the reason). A lease that is not settled in time expires and
// the message is due again, so a crashed worker never strands mail:
// delivery is at-least-once. A temporarily failed recipient is retried on
// the Schedule (exponential backoff with jitter) until the message reaches
// the schedule's maximum age, when it fails as expired (RFC 5321 §4.5.4.1
// asks for at least 4-5 days; the default is 5). Attempts and the last
// replies are kept per recipient (at most MaxHistory). The Admin methods are
// what postqueue and postsuper give Postfix users: list with filters,
// inspect, hold and release, delete, retry now, counts by state and domain.
//
// The envelope keeps the parameters later stages need: RFC 3461 DSN
// parameters (NOTIFY, ORCPT, RET, ENVID), RFC 6152 8BITMIME, RFC 6531
// SMTPUTF8 and RFC 8689 REQUIRETLS.
//
// # Backends
//
// Memory holds everything in process memory (tests, embedding). Dir is the
// file-backed queue relayd uses by default:
//
//   - Layout: PATH/wal/ holds the journal, segment files that new
//     messages are appended to (see dirjournal.go); PATH/msg/ID holds one
//     message per file (a checksummed header, the envelope record, the
//     body byte for byte, then appended state records; see dirformat.go),
//     PATH/tmp/ holds message files being written and up to 256 files of
//     delivered messages kept for reuse (free.N), PATH/quarantine/ holds
//     damaged files, PATH/lock is flock(2)ed by the one process that has
//     the directory open (a second OpenDir returns ErrLocked).
//   - Enqueue reads a body of up to 256 KiB into a buffer laid out as a
//     journal record holding the message's file image, and joins a group
//     commit: one goroutine takes every record that arrived while the
//     previous sync ran, appends them all to the current segment with one
//     pwritev(2), and makes them durable with one fdatasync(2). Segments
//     are preallocated and reused, so the sync writes data only, with no
//     file-system metadata: under load this costs a fraction of creating,
//     renaming and syncing a file per message. A larger body is streamed
//     into tmp/ID instead, with the header written last, and the file
//     joins the group commit (one syncfs(2) on Linux; elsewhere, or with
//     DirConfig.FileSync, each writer fsyncs its file and the group shares
//     one directory fsync), then is renamed into msg/ without another
//     sync: a rename lost in a crash is redone by recovery. Either way
//     many concurrent submissions cost one sync, and the disk's sync rate
//     is not the ceiling on messages per second. DirConfig.NoJournal
//     writes every message as a file.
//   - A journaled message is delivered from its record. The first change
//     to its state (a deferral, a hold) copies it into msg/ID first, where
//     its state records go as for any file; a finished message gets a
//     small DONE record in the journal. Segments are reused oldest first
//     once nothing in them is needed; when a long-lived message would
//     keep too many segments (DirConfig.JournalSegments), it is copied
//     into a file.
//   - Settle, Hold, Release append a small record to the message file and
//     sync it (group commit again); Retry appends without syncing (losing
//     it in a crash only delays mail). A message whose recipients are all
//     final is removed without a sync: at worst it is delivered again.
//     Its file is usually kept as tmp/free.N and the next Enqueue
//     truncates it and writes into it under its new name, which spares
//     the file system an inode allocation and release per message.
//   - Recovery (OpenDir): the journal's segments are replayed in order,
//     each up to its first record that is not intact (a crash's torn tail,
//     never acknowledged). Files in tmp/ that are complete and pass their
//     body checksum were synced and perhaps acknowledged, so they move into
//     msg/; the rest (and free.N) were never acknowledged and are removed.
//     A message with a DONE record is finished whatever else is on disk
//     (its file's removal may have been lost); one with a file in msg/ is
//     that file's; otherwise a journal record makes it queued. A file in
//     msg/ that cannot be read back is moved to quarantine/, logged and
//     counted (Stats.Quarantined, Dir.Quarantined); the other messages are
//     unaffected. A torn last state record is cut off. Leases do not
//     survive: every message is due again at its recorded next attempt.
//   - Memory: the index keeps an ID, a stream, the received and next-due
//     times, a few flags and where a journaled message's record is, per
//     message (about 230 bytes measured with 100,000 journaled messages)
//     plus pending-recipient counts per domain; envelopes and states are
//     read from disk when a message is leased or inspected (except for up
//     to 4096 messages between Enqueue and their first lease, kept as
//     written). Bodies are streamed, except that Enqueue holds a body of
//     up to 256 KiB in memory while it builds its journal record.
//   - Streams: each stream (Envelope.StreamName) has a due heap of its
//     own, so LeaseStream finds a stream's next message in O(log n) however
//     many messages of other streams are due; Lease takes the earliest due
//     message across the streams' heaps.
//   - A full disk makes Enqueue fail with an error matching ErrNoSpace and
//     leaves nothing behind; the SMTP server answers 452 4.3.1.
//
// # Writing a backend
//
// Any type with the Queue methods can be a backend (a database, a broker,
// a replicated store). Keep the contract written on Queue, and reuse the
// helpers that make every backend behave alike: Envelope.Validate in
// Enqueue, NewMessage for the initial record, NewID for IDs,
// Message.DueRecipients in Lease, ApplyOutcomes in Settle (it applies the
// Schedule, expiry and history rules), RetryNow in Release and Retry,
// Filter.Match in List and Retry, Stats.Add in Stats. Return errors that
// match ErrNotFound, ErrLeaseLost, ErrClosed, ErrNoSpace and ErrInvalid
// with errors.Is. Then prove it with queue/queuetest: one test file with a
// Harness that opens the backend on fresh storage and can reopen it, and
// queuetest.Run does the rest. examples/boltqueue is a complete backend on
// bbolt written from outside this module's internals, with its test.
package queue
