package queue

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzReadMessage feeds arbitrary message files to the reader: it must
// never panic, and every failure must be reported as corruption (so that
// recovery quarantines the file) rather than as something else.
func FuzzReadMessage(f *testing.F) {
	dir := f.TempDir()
	q, err := OpenDir(DirConfig{Path: dir, NoJournal: true, NoSync: true})
	if err != nil {
		f.Fatal(err)
	}
	id, err := q.Enqueue(context.Background(), &Envelope{From: "s@example.test", To: []Recipient{{Addr: "a@one.test"}, {Addr: "b@two.test"}}}, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	if err != nil {
		f.Fatal(err)
	}
	ls, _ := q.Lease(context.Background(), 1, 60e9)
	q.Settle(context.Background(), ls[0], []Outcome{{Rcpt: "a@one.test", Result: Retry, Reply: Reply{Code: 451, Text: "later"}}})
	q.Close()
	valid, err := os.ReadFile(filepath.Join(dir, "msg", string(id)))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:len(valid)-3])
	f.Add(valid[:headerSize])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "m")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		fh, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer fh.Close()
		dm, err := readMessage(fh, "FUZZ")
		if err != nil {
			if !errors.Is(err, errCorrupt) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.EOF) {
				t.Fatalf("unexpected error class: %v", err)
			}
			return
		}
		if len(dm.msg.Recipients) == 0 || dm.end > dm.size || dm.hdr.bodyOff+dm.hdr.bodySize > dm.size {
			t.Fatalf("accepted an inconsistent file: %+v", dm)
		}
		if bytes.Equal(data, valid) && dm.msg.Recipients[0].Attempts != 1 {
			t.Fatal("valid file misread")
		}
	})
}
