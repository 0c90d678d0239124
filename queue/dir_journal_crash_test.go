package queue

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// jcrashConfig is the Dir configuration of TestDir_JournalKillNine and its
// child: segments so small that rollover, spare reuse, recycling and the
// checkpoint's copy-out happen many times before each kill.
func jcrashConfig(dir string) DirConfig {
	return DirConfig{Path: dir, JournalSegmentSize: 64 << 10, JournalSegments: 2}
}

// jcrashOrderStream is the stream of the messages of the child's ordering
// goroutine, which leases them with LeaseStream; the other workers lease
// only the default stream.
const jcrashOrderStream = "order"

// jcrashSize picks a body size (in lines of crashBody): mostly small ones,
// some close to the largest record a 64 KiB segment takes, and some
// larger than that, which are written to files of their own.
func jcrashSize() int {
	switch p := rand.IntN(100); {
	case p < 75:
		return rand.IntN(250)
	case p < 90:
		return 500 + rand.IntN(350) // 10-15 KiB: large records
	default:
		return 1000 + rand.IntN(2500) // 20-60 KiB: files
	}
}

// TestDir_JournalCrashHelper is the child process of
// TestDir_JournalKillNine. It runs a mix of enqueues (of varied sizes),
// deliveries, deferrals, holds and releases, deletions and body readers
// held across settles on a Dir with a tiny journal, and prints
//
//	ACK id tag n    Enqueue returned id (body crashBody(tag, n))
//	GONE id         the message is about to be finished: it may be gone
//	SEALED id       the message was finished (Settle or Delete returned)
//	                and a later Enqueue by the same goroutine returned:
//	                it must never come back
//	DEFERRED id     a Settle with a temporary failure returned: the
//	                message has at least one attempt on record
//	HELD id         Hold returned: the message stays held...
//	UNHOLD id       ...until Release is called
//	ERR ...         the child saw something wrong
//
// It does nothing in a normal test run.
func TestDir_JournalCrashHelper(t *testing.T) {
	dir := os.Getenv("BATON_QUEUE_JCRASH_DIR")
	if dir == "" {
		t.Skip("helper process for TestDir_JournalKillNine")
	}
	q, err := OpenDir(jcrashConfig(dir))
	if err != nil {
		fmt.Println("ERR open:", err)
		os.Exit(1)
	}
	var outMu sync.Mutex
	say := func(format string, args ...any) {
		outMu.Lock()
		fmt.Printf(format+"\n", args...)
		outMu.Unlock()
	}
	fail := func(format string, args ...any) {
		say("ERR "+format, args...)
		os.Exit(1)
	}
	ctx := context.Background()
	pid := os.Getpid()

	// pool holds acknowledged messages of the default stream for the
	// admin and reader goroutines.
	type msg struct {
		id  ID
		tag string
		n   int
	}
	var poolMu sync.Mutex
	var pool []msg
	addPool := func(m msg) {
		poolMu.Lock()
		if len(pool) < 2000 {
			pool = append(pool, m)
		} else {
			pool[rand.IntN(len(pool))] = m
		}
		poolMu.Unlock()
	}
	pickPool := func() (msg, bool) {
		poolMu.Lock()
		defer poolMu.Unlock()
		if len(pool) == 0 {
			return msg{}, false
		}
		return pool[rand.IntN(len(pool))], true
	}
	// readAll reads a body reader and checks it byte for byte.
	check := func(rc io.ReadCloser, m msg, what string) {
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			fail("%s %s: read: %v", what, m.id, err)
		}
		if string(b) != crashBody(m.tag, m.n) {
			fail("%s %s: body differs (%d bytes, want %d)", what, m.id, len(b), len(crashBody(m.tag, m.n)))
		}
	}
	rcpt := "r@example.test"
	enqueue := func(stream, tag string, n int) ID {
		env := testEnv(rcpt)
		env.Stream = stream
		id, err := q.Enqueue(ctx, env, strings.NewReader(crashBody(tag, n)))
		if err != nil {
			fail("enqueue: %v", err)
		}
		say("ACK %s %s %d", id, tag, n)
		return id
	}
	var bodies sync.Map // ID -> msg, for readers opened before a settle

	// Workers: enqueue, then lease one message of the default stream and
	// deliver it, defer it, deliver it while a body reader is open, or
	// leave it leased.
	for w := range 6 {
		go func() {
			for i := 0; ; i++ {
				tag := fmt.Sprintf("w%d-%d-%d", w, i, pid)
				n := jcrashSize()
				id := enqueue("", tag, n)
				m := msg{id, tag, n}
				bodies.Store(id, m)
				addPool(m)
				lctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
				ls, _ := q.LeaseStream(lctx, DefaultStream, 1, time.Hour)
				cancel()
				for _, l := range ls {
					v, _ := bodies.Load(l.Message.ID)
					lm, _ := v.(msg)
					var rc io.ReadCloser
					if lm.id != "" && rand.IntN(4) == 0 {
						// A reader opened before the settle must read the
						// same bytes after it, whatever happened to the
						// message's record or file meanwhile.
						if r, err := q.Open(ctx, lm.id); err == nil {
							rc = r
						}
					}
					o := Outcome{Rcpt: rcpt, Result: Retry, Reply: Reply{Code: 451, Text: "later"}}
					switch p := rand.IntN(10); {
					case p < 5:
						say("GONE %s", l.Message.ID)
						o = Outcome{Rcpt: rcpt, Result: Delivered, Reply: Reply{Code: 250}}
					case p < 6:
						say("GONE %s", l.Message.ID)
						o = Outcome{Rcpt: rcpt, Result: Failed, Reply: Reply{Code: 550, Text: "no"}}
					case p < 9:
						// Deferred: copied out of the journal.
					default:
						// Left leased until the kill.
						if rc != nil {
							rc.Close()
						}
						continue
					}
					if _, err := q.Settle(ctx, l, []Outcome{o}); err != nil {
						fail("settle %s: %v", l.Message.ID, err)
					}
					if o.Result == Retry {
						say("DEFERRED %s", l.Message.ID)
					}
					if rc != nil {
						// Let other messages move the journal on first.
						time.Sleep(time.Duration(rand.IntN(3)) * time.Millisecond)
						check(rc, lm, "reader held across settle")
					}
				}
			}
		}()
	}

	// Admin: hold and release, retry deferred messages now, delete.
	go func() {
		var held []ID
		for {
			time.Sleep(time.Millisecond)
			m, ok := pickPool()
			if !ok {
				continue
			}
			var err error
			switch p := rand.IntN(10); {
			case p < 3:
				if err = q.Hold(ctx, m.id); err == nil {
					say("HELD %s", m.id)
					held = append(held, m.id)
				}
			case p < 5 && len(held) > 0:
				k := rand.IntN(len(held))
				say("UNHOLD %s", held[k])
				err = q.Release(ctx, held[k])
				held = append(held[:k], held[k+1:]...)
			case p < 7:
				_, err = q.Retry(ctx, Filter{ID: m.id})
			case p < 8:
				say("GONE %s", m.id)
				err = q.Delete(ctx, m.id)
			default:
				if _, err = q.Get(ctx, m.id); err == nil {
					var rc io.ReadCloser
					if rc, err = q.Open(ctx, m.id); err == nil {
						check(rc, m, "admin read")
					}
				}
			}
			if err != nil && !errors.Is(err, ErrNotFound) {
				fail("admin %s: %v", m.id, err)
			}
		}
	}()

	// Readers: open bodies and read them slowly, while the journal moves
	// on under them.
	for range 2 {
		go func() {
			for {
				m, ok := pickPool()
				if !ok {
					time.Sleep(time.Millisecond)
					continue
				}
				rc, err := q.Open(ctx, m.id)
				if errors.Is(err, ErrNotFound) {
					continue
				}
				if err != nil {
					fail("open %s: %v", m.id, err)
				}
				time.Sleep(time.Duration(rand.IntN(5)) * time.Millisecond)
				check(rc, m, "slow reader")
			}
		}()
	}

	// The ordering goroutine: finish a message (deliver or delete it),
	// then enqueue the next one. The finish's DONE record was queued
	// before the next ENQ record, so once the next Enqueue returned, the
	// finished message must never come back.
	func() {
		var prev ID // finished, waiting for the next Enqueue to seal it
		for i := 0; ; i++ {
			tag := fmt.Sprintf("o-%d-%d", i, pid)
			id := enqueue(jcrashOrderStream, tag, jcrashSize())
			if prev != "" {
				say("SEALED %s", prev)
			}
			if rand.IntN(3) == 0 {
				// Deferred first, so that it is finished as a file.
				l := leaseOne(ctx, q, id)
				if l == nil {
					fail("ordering: cannot lease %s", id)
				}
				if _, err := q.Settle(ctx, l, []Outcome{{Rcpt: rcpt, Result: Retry, Reply: Reply{Code: 451, Text: "later"}}}); err != nil {
					fail("ordering: defer %s: %v", id, err)
				}
				if _, err := q.Retry(ctx, Filter{ID: id}); err != nil {
					fail("ordering: retry %s: %v", id, err)
				}
			}
			say("GONE %s", id)
			if rand.IntN(4) == 0 {
				if err := q.Delete(ctx, id); err != nil {
					fail("ordering: delete %s: %v", id, err)
				}
			} else {
				l := leaseOne(ctx, q, id)
				if l == nil {
					fail("ordering: cannot lease %s", id)
				}
				if _, err := q.Settle(ctx, l, []Outcome{{Rcpt: rcpt, Result: Delivered, Reply: Reply{Code: 250}}}); err != nil {
					fail("ordering: deliver %s: %v", id, err)
				}
			}
			prev = id
		}
	}()
}

// leaseOne leases message id of the ordering stream, the only message
// there that is due.
func leaseOne(ctx context.Context, q *Dir, id ID) *Lease {
	for range 100 {
		lctx, cancel := context.WithTimeout(ctx, time.Second)
		ls, err := q.LeaseStream(lctx, jcrashOrderStream, 1, time.Hour)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return nil
		}
		for _, l := range ls {
			if l.Message.ID == id {
				return l
			}
		}
	}
	return nil
}

var journalCrashRounds = flag.Int("queue.jcrash.rounds", 5, "kill -9 rounds in TestDir_JournalKillNine (longer runs: 40)")

// TestDir_JournalKillNine kills a process that works a Dir with a tiny
// journal under load with SIGKILL at random moments, and checks after
// each kill that every acknowledged message that was not being finished
// is there byte for byte, that no message finished before a later
// acknowledged Enqueue of the same goroutine came back, and that
// recovery leaves nothing quarantined and nothing in tmp/.
func TestDir_JournalKillNine(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	type acked struct {
		tag string
		n   int
	}
	all := map[ID]acked{}
	gone := map[ID]bool{}   // being finished: may or may not be there
	sealed := map[ID]bool{} // finished before a later acknowledged Enqueue
	tried := map[ID]bool{}  // deferred: an attempt is on record
	held := map[ID]bool{}   // held and not released
	for round := range *journalCrashRounds {
		firstSeq := maxSegment(dir) + 1 // the child's first segment
		cmd := exec.Command(os.Args[0], "-test.run=^TestDir_JournalCrashHelper$", "-test.count=1")
		// Under -race, a data race stops the child at once, and the parent
		// fails for the missing acknowledgements.
		cmd.Env = append(os.Environ(), "BATON_QUEUE_JCRASH_DIR="+dir, "GORACE=halt_on_error=1")
		cmd.Stderr = os.Stderr
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAt := 400 + rand.IntN(800)
		early := round == 2
		if early {
			// Soon after the start, while the keeper still works on
			// what the last round left (recycling, copying out).
			killAt = 1 + rand.IntN(30)
		}
		sc := bufio.NewScanner(out)
		seen, nsealed := 0, 0
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "ERR") {
				cmd.Process.Kill()
				cmd.Wait()
				t.Fatalf("round %d: child: %s", round, line)
			}
			f := strings.Fields(line)
			switch {
			case len(f) == 2 && f[0] == "GONE":
				gone[ID(f[1])] = true
			case len(f) == 2 && f[0] == "SEALED":
				sealed[ID(f[1])] = true
				nsealed++
			case len(f) == 2 && f[0] == "DEFERRED":
				tried[ID(f[1])] = true
			case len(f) == 2 && f[0] == "HELD":
				held[ID(f[1])] = true
			case len(f) == 2 && f[0] == "UNHOLD":
				delete(held, ID(f[1]))
			case len(f) == 4 && f[0] == "ACK":
				n, err := strconv.Atoi(f[3])
				if err != nil {
					t.Fatalf("round %d: bad line %q", round, line)
				}
				all[ID(f[1])] = acked{f[2], n}
				if seen++; seen == killAt {
					cmd.Process.Signal(syscall.SIGKILL)
				}
			}
		}
		cmd.Wait()
		if seen < killAt {
			t.Fatalf("round %d: child stopped after %d acknowledgements", round, seen)
		}
		if nsealed == 0 && !early {
			t.Fatalf("round %d: the ordering goroutine sealed nothing", round)
		}
		// The journal really was used and rolled over many times.
		maxSeq := maxSegment(dir)
		if maxSeq < firstSeq+4 && !early {
			t.Fatalf("round %d: the child wrote segments %d to %d only; the test did not exercise rollover", round, firstSeq, maxSeq)
		}
		segs, _ := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
		files, _ := os.ReadDir(filepath.Join(dir, "msg"))

		// No checkpoint in the parent: its copy-out would write to tmp/,
		// which must be empty after recovery.
		cfg := jcrashConfig(dir)
		cfg.JournalSegments = 1 << 20
		q, err := OpenDir(cfg)
		if err != nil {
			t.Fatalf("round %d: OpenDir after kill: %v", round, err)
		}
		for id := range sealed {
			if _, err := q.Get(context.Background(), id); !errors.Is(err, ErrNotFound) {
				t.Errorf("round %d: message %s came back after a crash (Get: %v), though it was finished before a later Enqueue returned", round, id, err)
			}
			if rc, err := q.Open(context.Background(), id); err == nil {
				rc.Close()
				t.Errorf("round %d: finished message %s can be opened after a crash", round, id)
			}
		}
		present, finished := 0, 0
		for id, a := range all {
			if sealed[id] {
				delete(all, id)
				continue
			}
			rc, err := q.Open(context.Background(), id)
			if err != nil && gone[id] {
				// Finished for good: not checked again.
				delete(all, id)
				finished++
				continue
			}
			if err != nil {
				t.Fatalf("round %d: acknowledged message %s lost: %v", round, id, err)
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || string(b) != crashBody(a.tag, a.n) {
				t.Fatalf("round %d: message %s damaged (%v)", round, id, err)
			}
			m, err := q.Get(context.Background(), id)
			if err != nil {
				t.Fatalf("round %d: Get(%s): %v", round, id, err)
			}
			// The message's file, with its state, wins over its journal
			// record, which has none.
			if tried[id] && m.Recipients[0].Attempts == 0 {
				t.Errorf("round %d: message %s was deferred, but no attempt is on record after the crash", round, id)
			}
			if held[id] && m.State != StateHeld {
				t.Errorf("round %d: message %s was held, but is %v after the crash", round, id, m.State)
			}
			present++
		}
		if qs, _ := q.Quarantined(context.Background()); len(qs) != 0 {
			t.Errorf("round %d: %d files quarantined after a kill", round, len(qs))
		}
		if left, _ := os.ReadDir(q.tmp); len(left) != 0 {
			var names []string
			for _, e := range left {
				names = append(names, e.Name())
			}
			t.Errorf("round %d: files left in tmp/ after recovery: %v", round, names)
		}
		q.Close()
		t.Logf("round %d: killed after %d acks (%d sealed); wrote segments %d..%d (%d on disk), %d message files; %d acknowledged messages present, %d finished",
			round, killAt, nsealed, firstSeq, maxSeq, len(segs), len(files), present, finished)
	}
	// After all those crashes the keeper still brings the journal down to
	// JournalSegments by copying the messages of the oldest out: no count
	// was left wrong by a recovery.
	q, err := OpenDir(jcrashConfig(dir))
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	waitSegments(t, q, 2)
	journalCounts(t, q)
	for id, a := range all {
		rc, err := q.Open(context.Background(), id)
		if err != nil && gone[id] {
			continue
		}
		if err != nil {
			t.Fatalf("after the checkpoint: acknowledged message %s lost: %v", id, err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil || string(b) != crashBody(a.tag, a.n) {
			t.Fatalf("after the checkpoint: message %s damaged (%v)", id, err)
		}
	}
}

// maxSegment returns the highest sequence number of the journal segments
// in dir, or -1 when there are none.
func maxSegment(dir string) int64 {
	top := int64(-1)
	segs, _ := filepath.Glob(filepath.Join(dir, "wal", "*.seg"))
	for _, s := range segs {
		if v, err := strconv.ParseInt(strings.TrimSuffix(filepath.Base(s), ".seg"), 16, 64); err == nil {
			top = max(top, v)
		}
	}
	return top
}
