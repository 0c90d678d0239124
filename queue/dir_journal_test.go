package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// smallJournal is a config whose segments roll over after a few dozen
// small messages, so that tests see rollover, recycling and checkpoints.
func smallJournal(path string) DirConfig {
	return DirConfig{Path: path, JournalSegmentSize: 64 << 10, JournalSegments: 2}
}

func openJournalDir(t *testing.T, cfg DirConfig) *Dir {
	t.Helper()
	q, err := OpenDir(cfg)
	if err != nil {
		t.Fatalf("OpenDir: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// dirNames lists a subdirectory of the queue.
func dirNames(t *testing.T, path, sub string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(path, sub))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// segments counts the segment files in use (not spares).
func segments(t *testing.T, path string) int {
	n := 0
	for _, name := range dirNames(t, path, "wal") {
		if strings.HasSuffix(name, ".seg") {
			n++
		}
	}
	return n
}

// leaseN leases n due messages.
func leaseN(t *testing.T, q *Dir, n int) []*Lease {
	t.Helper()
	var out []*Lease
	for len(out) < n {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		ls, err := q.Lease(ctx, n-len(out), time.Hour)
		cancel()
		if err != nil {
			t.Fatalf("Lease: %v (have %d of %d)", err, len(out), n)
		}
		out = append(out, ls...)
	}
	return out
}

// leaseAll leases every due message.
func leaseAll(t *testing.T, q *Dir) []*Lease {
	t.Helper()
	var out []*Lease
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		ls, err := q.Lease(ctx, 100, time.Hour)
		cancel()
		if len(ls) == 0 {
			if err != nil && !errors.Is(err, context.DeadlineExceeded) {
				t.Fatal(err)
			}
			return out
		}
		out = append(out, ls...)
	}
}

func settleAll(t *testing.T, q *Dir, ls []*Lease, res Result) {
	t.Helper()
	for _, l := range ls {
		var outs []Outcome
		for _, i := range l.Due {
			outs = append(outs, Outcome{Rcpt: l.Message.Recipients[i].Addr, Result: res, Reply: Reply{Code: map[Result]int{Delivered: 250, Retry: 451, Failed: 550}[res]}})
		}
		if _, err := q.Settle(context.Background(), l, outs); err != nil {
			t.Fatalf("Settle %s: %v", l.Message.ID, err)
		}
	}
}

func TestJournal_DeliveredMessagesNeverTouchMsgDir(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	var ids []ID
	for i := range 50 {
		ids = append(ids, mustEnqueue(t, q, fmt.Sprintf("body %d\r\n", i)))
	}
	if n := len(dirNames(t, dir, "msg")); n != 0 {
		t.Fatalf("msg/ holds %d files after journaled Enqueues", n)
	}
	for i, id := range ids {
		if got, want := readBody(t, q, id), fmt.Sprintf("body %d\r\n", i); got != want {
			t.Fatalf("body of %s = %q, want %q", id, got, want)
		}
	}
	settleAll(t, q, leaseAll(t, q), Delivered)
	if n := len(dirNames(t, dir, "msg")) + len(dirNames(t, dir, "tmp")); n != 0 {
		t.Errorf("msg/ and tmp/ hold %d files after delivery", n)
	}
	q.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Errorf("after reopen %d delivered messages came back", len(ids))
	}
}

func TestJournal_ReopenReplaysPendingMessages(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	a := mustEnqueue(t, q, "first\r\n", "x@one.test", "y@two.test")
	b := mustEnqueue(t, q, "second\r\n")
	c := mustEnqueue(t, q, "third\r\n")
	ls := leaseAll(t, q)
	for _, l := range ls {
		if l.Message.ID == b {
			settleAll(t, q, []*Lease{l}, Delivered)
		}
	}
	q.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	ids := listIDs(t, q)
	if len(ids) != 2 || !ids[a] || !ids[c] {
		t.Fatalf("after reopen listed %v, want %s and %s", ids, a, c)
	}
	m, err := q.Get(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Recipients) != 2 || m.Recipients[0].State != RcptPending || m.Recipients[1].Addr != "y@two.test" {
		t.Errorf("replayed message: %+v", m.Recipients)
	}
	if got := readBody(t, q, c); got != "third\r\n" {
		t.Errorf("replayed body %q", got)
	}
	// Replayed messages are journaled still: delivering them writes no
	// file either.
	settleAll(t, q, leaseAll(t, q), Delivered)
	if n := len(dirNames(t, dir, "msg")); n != 0 {
		t.Errorf("msg/ holds %d files", n)
	}
}

func TestJournal_DeferredMessageCopiedOutWithItsState(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	cfg := DirConfig{Path: dir, Now: func() time.Time { return clock }}
	q := openJournalDir(t, cfg)
	id := mustEnqueue(t, q, "deferred body\r\n")
	settleAll(t, q, leaseAll(t, q), Retry)
	if names := dirNames(t, dir, "msg"); len(names) != 1 || names[0] != string(id) {
		t.Fatalf("msg/ = %v, want the deferred message's file", names)
	}
	q.Close()
	q = openJournalDir(t, cfg)
	m, err := q.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Recipients[0].Attempts != 1 || m.State != StateDeferred {
		t.Errorf("after reopen: attempts %d, state %v; want the file's state, not the journal record's", m.Recipients[0].Attempts, m.State)
	}
	if got := readBody(t, q, id); got != "deferred body\r\n" {
		t.Errorf("body %q", got)
	}
	// Delivered later: neither the file nor the journal record brings it
	// back.
	clock = clock.Add(24 * time.Hour)
	settleAll(t, q, leaseAll(t, q), Delivered)
	q.Close()
	q = openJournalDir(t, cfg)
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Errorf("a delivered message came back: %v", ids)
	}
}

func TestJournal_DoneRecordRemovesFileWhoseRemovalWasLost(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC)
	cfg := DirConfig{Path: dir, Now: func() time.Time { return clock }}
	q := openJournalDir(t, cfg)
	id := mustEnqueue(t, q, "body\r\n")
	settleAll(t, q, leaseAll(t, q), Retry)
	saved, err := os.ReadFile(filepath.Join(dir, "msg", string(id)))
	if err != nil {
		t.Fatal(err)
	}
	clock = clock.Add(time.Hour)
	settleAll(t, q, leaseAll(t, q), Delivered)
	q.Close()
	// A crash undid the file's removal (discard does not sync it).
	if err := os.WriteFile(filepath.Join(dir, "msg", string(id)), saved, 0o600); err != nil {
		t.Fatal(err)
	}
	q = openJournalDir(t, cfg)
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Errorf("a delivered message came back from its old file: %v", ids)
	}
	if _, err := os.Stat(filepath.Join(dir, "msg", string(id))); !os.IsNotExist(err) {
		t.Errorf("the finished message's file is still there: %v", err)
	}
}

func TestJournal_SegmentsRecycledUnderSteadyFlow(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, smallJournal(dir))
	body := strings.Repeat("0123456789abcdef", 200) // 3.2 KiB: 20 per segment
	most := 0
	for round := range 40 {
		for range 10 {
			mustEnqueue(t, q, fmt.Sprintf("%d %s\r\n", round, body))
		}
		settleAll(t, q, leaseN(t, q, 10), Delivered)
		// The keeper recycles in the background.
		deadline := time.Now().Add(5 * time.Second)
		for segments(t, dir) > 2 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		most = max(most, segments(t, dir))
	}
	if most > 2 {
		t.Errorf("the journal grew to %d segments with nothing pending", most)
	}
	if n := len(dirNames(t, dir, "msg")); n != 0 {
		t.Errorf("msg/ holds %d files", n)
	}
	q.Close()
	q = openJournalDir(t, smallJournal(dir))
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Errorf("%d delivered messages came back from reused segments", len(ids))
	}
	// And the reopened queue keeps working through more rollovers.
	var kept []ID
	for i := range 60 {
		kept = append(kept, mustEnqueue(t, q, fmt.Sprintf("after %d %s\r\n", i, body)))
	}
	q.Close()
	q = openJournalDir(t, smallJournal(dir))
	for i, id := range kept {
		if got, want := readBody(t, q, id), fmt.Sprintf("after %d %s\r\n", i, body); got != want {
			t.Fatalf("message %d after reopen: %d bytes, want %d", i, len(got), len(want))
		}
	}
}

func TestJournal_LongLivedMessageCopiedOutSoJournalStaysSmall(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, smallJournal(dir))
	env := testEnv("held@example.test")
	env.Held = true
	held, err := q.Enqueue(context.Background(), env, strings.NewReader("held body\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	body := strings.Repeat("x", 3000)
	for range 300 {
		mustEnqueue(t, q, body)
		settleAll(t, q, leaseN(t, q, 1), Delivered)
	}
	deadline := time.Now().Add(5 * time.Second)
	for segments(t, dir) > 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := segments(t, dir); n > 3 {
		t.Errorf("one held message pinned %d segments", n)
	}
	if names := dirNames(t, dir, "msg"); len(names) != 1 || names[0] != string(held) {
		t.Errorf("msg/ = %v, want the held message copied out", names)
	}
	q.Close()
	q = openJournalDir(t, smallJournal(dir))
	m, err := q.Get(context.Background(), held)
	if err != nil || m.State != StateHeld {
		t.Fatalf("held message after reopen: %+v, %v", m, err)
	}
	if got := readBody(t, q, held); got != "held body\r\n" {
		t.Errorf("held body %q", got)
	}
	if ids := listIDs(t, q); len(ids) != 1 {
		t.Errorf("after reopen %d messages, want only the held one", len(ids))
	}
}

func TestJournal_OpenReaderOutlivesRecycling(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, smallJournal(dir))
	want := strings.Repeat("keep me\r\n", 1000)
	id := mustEnqueue(t, q, want)
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	head := make([]byte, 9)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	settleAll(t, q, leaseAll(t, q), Delivered)
	// Enough traffic to recycle the reader's segment many times over.
	for range 200 {
		mustEnqueue(t, q, strings.Repeat("y", 3000))
		settleAll(t, q, leaseN(t, q, 1), Delivered)
	}
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading on: %v", err)
	}
	if got := string(head) + string(rest); got != want {
		t.Errorf("the open body changed under its reader (%d bytes, want %d)", len(got), len(want))
	}
}

func TestJournal_LargeBodyWrittenAsFile(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	big := strings.Repeat("z", journalMaxBody+1)
	id := mustEnqueue(t, q, big)
	small := mustEnqueue(t, q, "small")
	if names := dirNames(t, dir, "msg"); len(names) != 1 || names[0] != string(id) {
		t.Fatalf("msg/ = %v, want only the large message", names)
	}
	if got := readBody(t, q, id); got != big {
		t.Errorf("large body: %d bytes, want %d", len(got), len(big))
	}
	q.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	if ids := listIDs(t, q); len(ids) != 2 || !ids[id] || !ids[small] {
		t.Errorf("after reopen: %v", ids)
	}
}

func TestJournal_AdminOperations(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	ctx := context.Background()
	hold := mustEnqueue(t, q, "to hold")
	del := mustEnqueue(t, q, "to delete")
	if err := q.Hold(ctx, hold); err != nil {
		t.Fatal(err)
	}
	if err := q.Delete(ctx, del); err != nil {
		t.Fatal(err)
	}
	if names := dirNames(t, dir, "msg"); len(names) != 1 || names[0] != string(hold) {
		t.Errorf("msg/ = %v, want the held message copied out", names)
	}
	q.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	ids := listIDs(t, q)
	if len(ids) != 1 || !ids[hold] {
		t.Fatalf("after reopen: %v, want only %s", ids, hold)
	}
	if m, _ := q.Get(ctx, hold); m.State != StateHeld {
		t.Errorf("held message is %v", m.State)
	}
	if err := q.Release(ctx, hold); err != nil {
		t.Fatal(err)
	}
	if got := readBody(t, q, hold); got != "to hold" {
		t.Errorf("body %q", got)
	}
}

func TestJournal_TornTailIgnored(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	id := mustEnqueue(t, q, "acknowledged")
	q.Close()
	var seg string
	for _, n := range dirNames(t, dir, "wal") {
		if strings.HasSuffix(n, ".seg") {
			seg = filepath.Join(dir, "wal", n)
		}
	}
	// A record the crash cut short after the last acknowledged one: a
	// plausible header, half a payload.
	f, err := os.OpenFile(seg, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var end int64
	scanSegment(&jrnSeg{seq: segSeq(t, seg), f: f, size: fileSize(t, seg)}, func(typ byte, p []byte, off int64) error {
		end = off + int64(len(p))
		return nil
	})
	rec := doneRecord(id)
	h := rec.b[:jrnHdrSize]
	h[0] = 200 // longer than what follows
	f.WriteAt(append(rec.b, 'x'), end)
	f.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	if ids := listIDs(t, q); len(ids) != 1 || !ids[id] {
		t.Fatalf("after a torn tail: %v", ids)
	}
	if got := readBody(t, q, id); got != "acknowledged" {
		t.Errorf("body %q", got)
	}
}

func segSeq(t *testing.T, path string) uint64 {
	var seq uint64
	if _, err := fmt.Sscanf(filepath.Base(path), "%016x.seg", &seq); err != nil {
		t.Fatal(err)
	}
	return seq
}

func fileSize(t *testing.T, path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

func TestJournal_DiskFull_ErrNoSpaceThenRecovers(t *testing.T) {
	dir := t.TempDir()
	// Segments are not recycled here (JournalSegments is large), so the
	// failed groups' segments are still read at the reopen.
	cfg := DirConfig{Path: dir, JournalSegmentSize: 64 << 10}
	q := openJournalDir(t, cfg)
	kept := mustEnqueue(t, q, "before the disk filled")
	for _, after := range []int64{0, 1} { // the write, the sync
		q.faults = enospcAfter(after)
		_, err := q.Enqueue(context.Background(), testEnv("r@example.test"), strings.NewReader("refused"))
		q.faults = nil
		if !errors.Is(err, ErrNoSpace) {
			t.Fatalf("Enqueue on a full disk (fault after %d) = %v, want ErrNoSpace", after, err)
		}
	}
	after := mustEnqueue(t, q, "after")
	q.Close()
	q = openJournalDir(t, cfg)
	ids := listIDs(t, q)
	if !ids[kept] || !ids[after] {
		t.Fatalf("after reopen: %v, want %s and %s", ids, kept, after)
	}
	// The refused messages' records were written whole when only the
	// sync failed; they must not come back.
	if len(ids) != 2 {
		t.Errorf("after reopen %d messages, want 2", len(ids))
	}
}

func TestJournal_BacklogCopiedOutInBatches(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, smallJournal(dir))
	want := map[ID]string{}
	for i := range 300 {
		body := fmt.Sprintf("%d %s\r\n", i, strings.Repeat("b", 2000))
		want[mustEnqueue(t, q, body)] = body
	}
	// 300 × 2 KiB is ten 64 KiB segments; the journal may keep two (and
	// the active one), so the keeper copies the rest into files.
	deadline := time.Now().Add(10 * time.Second)
	for segments(t, dir) > 3 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if n := segments(t, dir); n > 3 {
		t.Errorf("a backlog of never-leased messages kept %d segments", n)
	}
	files := len(dirNames(t, dir, "msg"))
	if files == 0 {
		t.Fatal("nothing was copied out of the journal")
	}
	t.Logf("%d of 300 messages copied into files; %d syncs in all", files, q.syncs.Load())
	q.Close()
	q = openJournalDir(t, smallJournal(dir))
	if ids := listIDs(t, q); len(ids) != len(want) {
		t.Fatalf("after reopen %d messages, want %d", len(ids), len(want))
	}
	for id, body := range want {
		if got := readBody(t, q, id); got != body {
			t.Fatalf("message %s: %d bytes, want %d", id, len(got), len(body))
		}
	}
	if n := len(dirNames(t, dir, "tmp")); n != 0 {
		t.Errorf("tmp/ holds %d files", n)
	}
	// They are delivered from wherever they are now.
	settleAll(t, q, leaseN(t, q, len(want)), Delivered)
	q.Close()
	q = openJournalDir(t, smallJournal(dir))
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Errorf("%d delivered messages came back", len(ids))
	}
}

func TestJournal_DoneRecordOfFailedGroupWrittenAgain(t *testing.T) {
	dir := t.TempDir()
	cfg := DirConfig{Path: dir, JournalSegmentSize: 64 << 10}
	q := openJournalDir(t, cfg)
	id := mustEnqueue(t, q, "delivered while the disk fails")
	ls := leaseN(t, q, 1)
	// A message still pending keeps the segment with id's ENQ record from
	// being recycled, so only a DONE record keeps id away.
	pinned := mustEnqueue(t, q, "pending")
	// Every journal write fails until the Settle's DONE record has gone
	// through a failed group.
	var failing atomic.Bool
	failing.Store(true)
	failed := make(chan struct{})
	var once sync.Once
	q.faults = func(op string) error {
		if failing.Load() && op == "write" {
			once.Do(func() { close(failed) })
			return &os.PathError{Op: "write", Path: "injected", Err: syscall.EIO}
		}
		return nil
	}
	settleAll(t, q, ls, Delivered)
	<-failed
	failing.Store(false)
	// The next group carries the DONE record again.
	mustEnqueue(t, q, "after")
	q.Close()
	q = openJournalDir(t, cfg)
	if ids := listIDs(t, q); ids[id] || !ids[pinned] || len(ids) != 2 {
		t.Errorf("after reopen: %v; the delivered message %s came back", ids, id)
	}
}

func TestJournal_DoneOnlyGroupSyncedSoonWithoutWriters(t *testing.T) {
	dir := t.TempDir()
	q := openJournalDir(t, DirConfig{Path: dir})
	id := mustEnqueue(t, q, "x")
	ls := leaseN(t, q, 1)
	s0 := q.syncs.Load()
	settleAll(t, q, ls, Delivered)
	// Nobody waits for the DONE record, and no other group follows: the
	// committer syncs it on its own after lazyDelay.
	deadline := time.Now().Add(5 * time.Second)
	for q.syncs.Load() == s0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if q.syncs.Load() == s0 {
		t.Fatal("the DONE record was never synced")
	}
	q.Close()
	q = openJournalDir(t, DirConfig{Path: dir})
	if ids := listIDs(t, q); ids[id] {
		t.Errorf("the delivered message came back")
	}
}
