package queue

import (
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// deliverOne leases the next message and settles it as delivered.
func deliverOne(t *testing.T, q *Dir, want ID) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ls, err := q.Lease(ctx, 1, time.Minute)
	if err != nil || len(ls) != 1 || ls[0].Message.ID != want {
		t.Fatalf("Lease = %v, %v; want %s", ls, err, want)
	}
	if _, err := q.Settle(ctx, ls[0], []Outcome{{Rcpt: ls[0].Message.Envelope.To[0].Addr, Result: Delivered, Reply: Reply{Code: 250}}}); err != nil {
		t.Fatal(err)
	}
}

func readBody(t *testing.T, q *Dir, id ID) string {
	t.Helper()
	rc, err := q.Open(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("body of %s: %v", id, err)
	}
	return string(b)
}

func tmpNames(t *testing.T, q *Dir) []string {
	t.Helper()
	ents, err := os.ReadDir(q.tmp)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestDir_Recycle_NextMessageReusesFile checks that a delivered message's
// file is written again for the next message (same inode), that the new
// message reads back whole, and that Close leaves no spare file behind.
func TestDir_Recycle_NextMessageReusesFile(t *testing.T) {
	q, err := OpenDir(DirConfig{NoJournal: true, Path: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	a := mustEnqueue(t, q, strings.Repeat("a long first message\r\n", 500))
	fa, err := os.Stat(q.file(a))
	if err != nil {
		t.Fatal(err)
	}
	deliverOne(t, q, a)
	if _, err := os.Stat(q.file(a)); !os.IsNotExist(err) {
		t.Fatalf("delivered message still in msg/: %v", err)
	}
	if n := tmpNames(t, q); len(n) != 1 || !strings.HasPrefix(n[0], "free.") {
		t.Fatalf("tmp/ = %v, want one spare file", n)
	}
	b := mustEnqueue(t, q, "short\r\n")
	fb, err := os.Stat(q.file(b))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(fa, fb) {
		t.Error("the second message did not reuse the first one's file")
	}
	if got := readBody(t, q, b); got != "short\r\n" {
		t.Errorf("body = %q", got)
	}
	if _, err := q.Get(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	if n := tmpNames(t, q); len(n) != 0 {
		t.Fatalf("tmp/ = %v after reuse", n)
	}
	deliverOne(t, q, b)
	q.Close()
	if n := tmpNames(t, q); len(n) != 0 {
		t.Fatalf("tmp/ = %v after Close", n)
	}
}

// TestDir_Recycle_NotWhileRead checks that a file with an open reader is
// not reused: the reader goes on reading its own message.
func TestDir_Recycle_NotWhileRead(t *testing.T) {
	q := openFileDir(t, t.TempDir())
	body := strings.Repeat("0123456789", 10000)
	a := mustEnqueue(t, q, body)
	rc, err := q.Open(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	head := make([]byte, 100)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	deliverOne(t, q, a)
	mustEnqueue(t, q, strings.Repeat("X", len(body)))
	rest, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading on after delivery: %v", err)
	}
	if string(head)+string(rest) != body {
		t.Fatal("the open reader saw other bytes")
	}
}

// TestDir_Recycle_SpareFileNotRecovered checks that a spare file left in
// tmp/ by a crash (a complete, checksummed old message) is discarded by
// recovery, never taken for a message.
func TestDir_Recycle_SpareFileNotRecovered(t *testing.T) {
	dir := t.TempDir()
	q, err := OpenDir(DirConfig{NoJournal: true, Path: dir})
	if err != nil {
		t.Fatal(err)
	}
	a := mustEnqueue(t, q, "old message\r\n")
	q.Close()
	// The state discard leaves before the next Enqueue takes the file.
	if err := os.Rename(filepath.Join(dir, "msg", string(a)), filepath.Join(dir, "tmp", "free.7")); err != nil {
		t.Fatal(err)
	}
	q = openFileDir(t, dir)
	if ids := listIDs(t, q); len(ids) != 0 {
		t.Fatalf("recovered %v from a spare file", ids)
	}
	if n := tmpNames(t, q); len(n) != 0 {
		t.Fatalf("tmp/ = %v after recovery", n)
	}
}
