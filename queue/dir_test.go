package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func openTestDir(t *testing.T, path string) *Dir {
	t.Helper()
	q, err := OpenDir(DirConfig{Path: path})
	if err != nil {
		t.Fatalf("OpenDir: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

// openFileDir opens a Dir without a journal, for tests of the message
// files themselves.
func openFileDir(t *testing.T, path string) *Dir {
	t.Helper()
	q, err := OpenDir(DirConfig{Path: path, NoJournal: true})
	if err != nil {
		t.Fatalf("OpenDir: %v", err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func testEnv(to ...string) *Envelope {
	e := &Envelope{From: "s@example.test"}
	for _, a := range to {
		e.To = append(e.To, Recipient{Addr: a})
	}
	return e
}

func mustEnqueue(t *testing.T, q *Dir, body string, to ...string) ID {
	t.Helper()
	if len(to) == 0 {
		to = []string{"r@example.test"}
	}
	id, err := q.Enqueue(context.Background(), testEnv(to...), strings.NewReader(body))
	if err != nil {
		t.Fatalf("Enqueue: %v", err)
	}
	return id
}

func listIDs(t *testing.T, q *Dir) map[ID]bool {
	t.Helper()
	ids := map[ID]bool{}
	if err := q.List(context.Background(), Filter{}, func(m *Message) error { ids[m.ID] = true; return nil }); err != nil {
		t.Fatal(err)
	}
	return ids
}

func TestDir_SecondOpen_ErrLocked(t *testing.T) {
	dir := t.TempDir()
	q := openTestDir(t, dir)
	if _, err := OpenDir(DirConfig{Path: dir}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second OpenDir = %v, want ErrLocked", err)
	}
	q.Close()
	q2, err := OpenDir(DirConfig{Path: dir})
	if err != nil {
		t.Fatalf("OpenDir after Close: %v", err)
	}
	q2.Close()
}

// corruptions damage a committed message file in different ways; each
// must be quarantined on open while the other messages stay.
var corruptions = []struct {
	name   string
	damage func(t *testing.T, path string)
}{
	{"truncated body", func(t *testing.T, p string) {
		st, _ := os.Stat(p)
		os.Truncate(p, st.Size()-200)
	}},
	{"truncated to header", func(t *testing.T, p string) { os.Truncate(p, 20) }},
	{"empty file", func(t *testing.T, p string) { os.Truncate(p, 0) }},
	{"bad magic", func(t *testing.T, p string) { patch(t, p, 0, []byte("XXXX")) }},
	{"header bit flip", func(t *testing.T, p string) { patch(t, p, 17, []byte{0xff}) }},
	{"envelope bit flip", func(t *testing.T, p string) { patch(t, p, headerSize+recHdrSize+3, []byte{'#'}) }},
	{"garbage", func(t *testing.T, p string) { os.WriteFile(p, bytes.Repeat([]byte("garbage"), 100), 0o600) }},
	{"directory in place of the file", func(t *testing.T, p string) { os.Remove(p); os.Mkdir(p, 0o700) }},
	{"state record not JSON", func(t *testing.T, p string) {
		f, _ := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		f.Write(appendRecord(nil, []byte("{not json")))
		f.Close()
	}},
}

func patch(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestDir_CorruptFile_QuarantinedOthersKept(t *testing.T) {
	for _, c := range corruptions {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			q, err := OpenDir(DirConfig{Path: dir, NoJournal: true})
			if err != nil {
				t.Fatal(err)
			}
			good := mustEnqueue(t, q, strings.Repeat("good body\r\n", 100))
			bad := mustEnqueue(t, q, strings.Repeat("bad body\r\n", 100))
			good2 := mustEnqueue(t, q, "another\r\n")
			q.Close()
			c.damage(t, filepath.Join(dir, "msg", string(bad)))

			var logBuf bytes.Buffer
			q, err = OpenDir(DirConfig{Path: dir, NoJournal: true, Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
			if err != nil {
				t.Fatalf("OpenDir with a damaged file: %v", err)
			}
			defer q.Close()
			ids := listIDs(t, q)
			if !ids[good] || !ids[good2] || ids[bad] || len(ids) != 2 {
				t.Fatalf("after open listed %v, want %s and %s only", ids, good, good2)
			}
			qs, err := q.Quarantined(context.Background())
			if err != nil || len(qs) != 1 || qs[0].Name != string(bad) {
				t.Fatalf("Quarantined = %+v, %v; want the damaged file", qs, err)
			}
			if s, _ := q.Stats(context.Background()); s.Quarantined != 1 {
				t.Errorf("Stats.Quarantined = %d, want 1", s.Quarantined)
			}
			if !strings.Contains(logBuf.String(), string(bad)) || !strings.Contains(logBuf.String(), "quarantined") {
				t.Errorf("quarantine not logged:\n%s", logBuf.String())
			}
			if _, err := os.Stat(filepath.Join(dir, "msg", string(bad))); !errors.Is(err, os.ErrNotExist) {
				t.Error("damaged file left in msg/")
			}
		})
	}
}

func TestDir_BodyBitFlip_DetectedOnRead(t *testing.T) {
	dir := t.TempDir()
	q := openFileDir(t, dir)
	id := mustEnqueue(t, q, strings.Repeat("body line\r\n", 50))
	dm, err := q.readFile(id, false)
	if err != nil {
		t.Fatal(err)
	}
	patch(t, q.file(id), dm.hdr.bodyOff+10, []byte{'#'})
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	if _, err := io.ReadAll(rc); !errors.Is(err, errCorrupt) {
		t.Fatalf("reading a damaged body = %v, want a checksum error", err)
	}
}

func TestDir_CorruptFileAtRuntime_QuarantinedOnLease(t *testing.T) {
	dir := t.TempDir()
	q := openFileDir(t, dir)
	bad := mustEnqueue(t, q, "bad")
	good := mustEnqueue(t, q, "good")
	os.Truncate(q.file(bad), 10)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ls, err := q.Lease(ctx, 10, time.Minute)
	if err != nil || len(ls) != 1 || ls[0].Message.ID != good {
		t.Fatalf("Lease = %v, %v; want only the good message", ls, err)
	}
	if qs, _ := q.Quarantined(ctx); len(qs) != 1 {
		t.Fatalf("quarantined %d files, want 1", len(qs))
	}
	if _, err := q.Get(ctx, bad); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get of the quarantined message = %v", err)
	}
}

func TestDir_HalfWrittenTmp_DiscardedCompletePromoted(t *testing.T) {
	dir := t.TempDir()
	q, err := OpenDir(DirConfig{Path: dir, NoJournal: true})
	if err != nil {
		t.Fatal(err)
	}
	id := mustEnqueue(t, q, "complete body\r\n")
	q.Close()
	// A crash after the sync but before the rename leaves a complete file
	// in tmp/; a crash while writing leaves a partial one.
	complete := filepath.Join(dir, "tmp", string(id))
	if err := os.Rename(filepath.Join(dir, "msg", string(id)), complete); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(complete)
	partial := filepath.Join(dir, "tmp", "PARTIALMESSAGE00")
	os.WriteFile(partial, data[:len(data)-5], 0o600)
	noHeader := filepath.Join(dir, "tmp", "NOHEADERMESSAGE0")
	os.WriteFile(noHeader, append(make([]byte, headerSize), data[headerSize:]...), 0o600)

	q = openFileDir(t, dir)
	ids := listIDs(t, q)
	if len(ids) != 1 || !ids[id] {
		t.Fatalf("after recovery listed %v, want only %s", ids, id)
	}
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	if string(b) != "complete body\r\n" {
		t.Errorf("promoted body %q", b)
	}
	left, _ := os.ReadDir(filepath.Join(dir, "tmp"))
	if len(left) != 0 {
		t.Errorf("tmp/ still holds %d files", len(left))
	}
	if qs, _ := q.Quarantined(context.Background()); len(qs) != 0 {
		t.Errorf("half-written files were quarantined instead of discarded: %v", qs)
	}
}

func TestDir_TornStateRecord_CutOnOpen(t *testing.T) {
	dir := t.TempDir()
	clock := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	now := func() time.Time { return clock }
	q, err := OpenDir(DirConfig{Path: dir, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	id := mustEnqueue(t, q, "x", "a@one.test", "b@two.test")
	ls, err := q.Lease(context.Background(), 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := q.Settle(context.Background(), ls[0], []Outcome{{Rcpt: "a@one.test", Result: Retry, Reply: Reply{Code: 451, Enhanced: "4.0.0", Text: "later"}}}); err != nil {
		t.Fatal(err)
	}
	q.Close()
	// A crash in the middle of the next append.
	p := filepath.Join(dir, "msg", string(id))
	st, _ := os.Stat(p)
	f, _ := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(appendRecord(nil, []byte(`{"r":[{"i":1,"s":1}]}`))[:15])
	f.Close()

	q = openTestDir(t, dir)
	m, err := q.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Recipients[0].Attempts != 1 || m.Recipients[1].State != RcptPending {
		t.Errorf("state after a torn append: %+v", m.Recipients)
	}
	if st2, _ := os.Stat(p); st2.Size() != st.Size() {
		t.Errorf("torn record not cut: size %d, want %d", st2.Size(), st.Size())
	}
	if qs, _ := q.Quarantined(context.Background()); len(qs) != 0 {
		t.Errorf("a torn last record quarantined the message")
	}
}

func enospcAfter(n int64) func(op string) error {
	var calls atomic.Int64
	return func(op string) error {
		if calls.Add(1) > n {
			return &os.PathError{Op: "write", Path: "injected", Err: syscall.ENOSPC}
		}
		return nil
	}
}

func TestDir_DiskFull_ErrNoSpace_NothingStored(t *testing.T) {
	for _, after := range []int64{0, 1, 2, 3, 5} {
		t.Run(fmt.Sprint("fault after ", after, " ops"), func(t *testing.T) {
			dir := t.TempDir()
			q := openFileDir(t, dir)
			kept := mustEnqueue(t, q, "before the disk filled")
			q.faults = enospcAfter(after)
			body := strings.Repeat("x", 300<<10) // several buffered writes
			_, err := q.Enqueue(context.Background(), testEnv("r@example.test"), strings.NewReader(body))
			if !errors.Is(err, ErrNoSpace) {
				t.Fatalf("Enqueue on a full disk = %v, want ErrNoSpace", err)
			}
			q.faults = nil
			if ids := listIDs(t, q); len(ids) != 1 || !ids[kept] {
				t.Fatalf("listed %v, want only the earlier message", ids)
			}
			for _, d := range []string{"tmp", "msg"} {
				ents, _ := os.ReadDir(filepath.Join(dir, d))
				if want := map[string]int{"tmp": 0, "msg": 1}[d]; len(ents) != want {
					t.Errorf("%s/ holds %d files, want %d", d, len(ents), want)
				}
			}
			// The queue works again once space is back.
			mustEnqueue(t, q, "after")
		})
	}
}

func TestDir_DiskFull_SettleKeepsFileIntact(t *testing.T) {
	dir := t.TempDir()
	q := openTestDir(t, dir)
	id := mustEnqueue(t, q, "x")
	ctx := context.Background()
	ls, err := q.Lease(ctx, 1, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	q.faults = enospcAfter(0)
	_, err = q.Settle(ctx, ls[0], []Outcome{{Rcpt: "r@example.test", Result: Retry, Reply: Reply{Code: 451, Text: "later"}}})
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Settle on a full disk = %v, want ErrNoSpace", err)
	}
	q.faults = nil
	// The lease is still held and can be settled once space is back.
	if _, err := q.Settle(ctx, ls[0], []Outcome{{Rcpt: "r@example.test", Result: Retry, Reply: Reply{Code: 451, Text: "later"}}}); err != nil {
		t.Fatalf("Settle after space came back: %v", err)
	}
	q.Close()
	q = openTestDir(t, dir)
	m, err := q.Get(ctx, id)
	if err != nil || m.Recipients[0].Attempts != 1 {
		t.Fatalf("after reopen: %+v, %v; want one recorded attempt", m, err)
	}
}

func TestDir_GroupCommit_SharesSyncs(t *testing.T) {
	if defaultSyncMode != syncFS {
		t.Skip("group commit of data needs syncfs (Linux)")
	}
	q := openTestDir(t, t.TempDir())
	const n = 64
	// A first message holds the committer inside its sync, so that the
	// next n writers all queue up behind it and share one group.
	entered, block := make(chan struct{}), make(chan struct{})
	var once sync.Once
	q.faults = func(op string) error {
		if op == "sync" {
			once.Do(func() { close(entered); <-block })
		}
		return nil
	}
	first := make(chan struct{})
	go func() {
		defer close(first)
		mustEnqueue(t, q, "first")
	}()
	<-entered
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			mustEnqueue(t, q, "x")
		}()
	}
	for len(q.commitCh) < n {
		time.Sleep(time.Millisecond)
	}
	s0, g0 := q.syncs.Load(), q.groups.Load()
	close(block)
	wg.Wait()
	<-first
	if syncs, groups := q.syncs.Load()-s0, q.groups.Load()-g0; syncs != 2 || groups != 2 {
		t.Errorf("the first message and %d queued behind it took %d syncs in %d groups, want 2 and 2", n, syncs, groups)
	}
	if len(listIDs(t, q)) != n+1 {
		t.Errorf("not all messages stored")
	}
}

func TestDir_NoSync_NeverSyncs(t *testing.T) {
	q, err := OpenDir(DirConfig{Path: t.TempDir(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	for range 5 {
		mustEnqueue(t, q, "x")
	}
	if q.syncs.Load() != 0 {
		t.Errorf("NoSync queue synced %d times", q.syncs.Load())
	}
}

func TestDir_SyncFileMode_Conformant(t *testing.T) {
	// The fsync-per-file strategy (the default off Linux) must also keep
	// messages across a reopen.
	dir := t.TempDir()
	q, err := OpenDir(DirConfig{Path: dir, FileSync: true, NoJournal: true})
	if err != nil {
		t.Fatal(err)
	}
	if q.mode != syncFile {
		t.Fatalf("FileSync: mode %v", q.mode)
	}
	id := mustEnqueue(t, q, "body")
	if q.syncs.Load() < 2 {
		t.Errorf("FileSync enqueue synced %d times, want the file and tmp/", q.syncs.Load())
	}
	q.Close()
	q = openTestDir(t, dir)
	if ids := listIDs(t, q); !ids[id] {
		t.Fatal("message lost")
	}
}

// zeroReader yields n bytes without allocating.
type zeroReader struct{ n int64 }

func (z *zeroReader) Read(p []byte) (int, error) {
	if z.n <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > z.n {
		p = p[:z.n]
	}
	clear(p)
	z.n -= int64(len(p))
	return len(p), nil
}

func TestDir_LargeBody_StreamedNotBuffered(t *testing.T) {
	q, err := OpenDir(DirConfig{Path: t.TempDir(), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	const size = 64 << 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	id, err := q.Enqueue(context.Background(), testEnv("r@example.test"), &zeroReader{n: size})
	if err != nil {
		t.Fatal(err)
	}
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	n, err := io.CopyBuffer(io.Discard, rc, make([]byte, 32<<10))
	rc.Close()
	runtime.ReadMemStats(&after)
	if err != nil || n != size {
		t.Fatalf("read back %d bytes, %v", n, err)
	}
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 4<<20 {
		t.Errorf("enqueue and read of a %d MB body allocated %d KB; bodies must be streamed", size>>20, alloc>>10)
	}
}
