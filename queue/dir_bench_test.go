package queue

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// BenchmarkRawFsync measures this machine's fsync rate: overwrite 4 KB of
// a file and fsync it, one at a time. Compare Dir's msgs/s with it.
func BenchmarkRawFsync(b *testing.B) {
	f, err := os.Create(filepath.Join(b.TempDir(), "f"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := bytes.Repeat([]byte{'x'}, 4096)
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := f.WriteAt(buf, 0); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "fsyncs/s")
}

// BenchmarkRawCreateFsync is the naive per-message cost Dir avoids:
// create a 5 KB file, fsync it, rename it, fsync the directory.
func BenchmarkRawCreateFsync(b *testing.B) {
	dir := b.TempDir()
	d, err := os.Open(dir)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	buf := bytes.Repeat([]byte{'x'}, 5000)
	b.ResetTimer()
	start := time.Now()
	for i := range b.N {
		p := filepath.Join(dir, fmt.Sprint("t", i))
		f, err := os.Create(p)
		if err != nil {
			b.Fatal(err)
		}
		f.Write(buf)
		f.Sync()
		f.Close()
		os.Rename(p, p+".m")
		d.Sync()
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}

// BenchmarkDirEnqueue measures durable enqueues with real syncs: into the
// journal, and (NoJournal) into files with either sync strategy; 1 and 32
// concurrent submitters, 5 KB and 100 KB bodies. It reports messages per
// second and syncs (fdatasync, fsync or syncfs calls) per message.
func BenchmarkDirEnqueue(b *testing.B) {
	modes := []struct {
		name      string
		mode      syncMode
		noJournal bool
	}{{"journal", syncFS, false}, {"syncfs", syncFS, true}, {"fsync", syncFile, true}}
	for _, m := range modes {
		for _, conc := range []int{1, 32} {
			for _, size := range []int{5 << 10, 100 << 10} {
				b.Run(fmt.Sprintf("%s/submitters=%d/body=%dKB", m.name, conc, size>>10), func(b *testing.B) {
					benchEnqueue(b, DirConfig{Path: b.TempDir(), NoJournal: m.noJournal}, m.mode, conc, size)
				})
			}
		}
	}
}

func benchEnqueue(b *testing.B, cfg DirConfig, mode syncMode, conc, size int) {
	q, err := openDir(cfg, mode)
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyz\r\n"), size/38+1)[:size]
	env := &Envelope{From: "s@example.test", To: []Recipient{{Addr: "r@example.test"}}}
	ctx := context.Background()
	syncs0, groups0 := q.syncs.Load(), q.groups.Load()
	b.SetBytes(int64(size))
	b.ResetTimer()
	start := time.Now()
	var wg sync.WaitGroup
	var next sync.Mutex
	n := 0
	for range conc {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				next.Lock()
				if n >= b.N {
					next.Unlock()
					return
				}
				n++
				next.Unlock()
				if _, err := q.Enqueue(ctx, env, bytes.NewReader(body)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	b.ReportMetric(float64(b.N)/el.Seconds(), "msgs/s")
	b.ReportMetric(float64(q.syncs.Load()-syncs0)/float64(b.N), "syncs/msg")
	b.ReportMetric(float64(b.N)/float64(max(1, q.groups.Load()-groups0)), "msgs/group")
}

// BenchmarkDirOpen measures recovery: OpenDir on a directory of 10,000
// messages (each with a state record), per message.
func BenchmarkDirOpen(b *testing.B) {
	const n = 10_000
	dir := b.TempDir()
	q, err := OpenDir(DirConfig{Path: dir, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	body := bytes.Repeat([]byte("x"), 2000)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 4 {
				env := &Envelope{From: "s@example.test", To: []Recipient{{Addr: fmt.Sprintf("r@d%d.example.test", i%100)}}}
				if _, err := q.Enqueue(context.Background(), env, bytes.NewReader(body)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	q.Close()
	b.ResetTimer()
	for range b.N {
		q, err := OpenDir(DirConfig{Path: dir, NoSync: true})
		if err != nil {
			b.Fatal(err)
		}
		q.Close()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/message")
}

// BenchmarkDirSettle measures durable settles (a retry outcome appended
// and synced) from 32 concurrent workers, with group commit.
func BenchmarkDirSettle(b *testing.B) {
	dir := b.TempDir()
	q, err := OpenDir(DirConfig{Path: dir, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	env := &Envelope{From: "s@example.test", To: []Recipient{{Addr: "r@example.test"}}}
	for range b.N {
		if _, err := q.Enqueue(context.Background(), env, bytes.NewReader([]byte("body"))); err != nil {
			b.Fatal(err)
		}
	}
	q.Close()
	if q, err = OpenDir(DirConfig{Path: dir}); err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	ctx := context.Background()
	syncs0 := q.syncs.Load()
	b.ResetTimer()
	var wg sync.WaitGroup
	var left sync.Mutex
	remaining := b.N
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				left.Lock()
				if remaining == 0 {
					left.Unlock()
					return
				}
				remaining--
				left.Unlock()
				ls, err := q.Lease(ctx, 1, time.Hour)
				if err != nil {
					b.Error(err)
					return
				}
				if _, err := q.Settle(ctx, ls[0], []Outcome{{Rcpt: "r@example.test", Result: Retry, Reply: Reply{Code: 451, Text: "later"}}}); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "settles/s")
	b.ReportMetric(float64(q.syncs.Load()-syncs0)/float64(b.N), "syncs/settle")
}

// BenchmarkDirCycle measures a message's whole way through the queue as
// the relay drives it: Enqueue, Lease, Open and read the body, Settle as
// delivered (the file is removed). NoSync, one goroutine: the figure is
// the queue's own CPU and file system calls per message, without fsync,
// with the journal and without.
func BenchmarkDirCycle(b *testing.B) {
	b.Run("journal", func(b *testing.B) { benchCycle(b, false) })
	b.Run("nojournal", func(b *testing.B) { benchCycle(b, true) })
}

func benchCycle(b *testing.B, noJournal bool) {
	q, err := OpenDir(DirConfig{Path: b.TempDir(), NoSync: true, NoJournal: noJournal})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	ctx := context.Background()
	env := &Envelope{From: "s@example.test", To: []Recipient{{Addr: "r@example.test"}}}
	body := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz..\r\n"), 5120/76)
	buf := make([]byte, 32<<10)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := q.Enqueue(ctx, env, bytes.NewReader(body)); err != nil {
			b.Fatal(err)
		}
		ls, err := q.Lease(ctx, 1, time.Hour)
		if err != nil || len(ls) != 1 {
			b.Fatal(ls, err)
		}
		rc, err := q.Open(ctx, ls[0].Message.ID)
		if err != nil {
			b.Fatal(err)
		}
		for {
			if _, err := rc.Read(buf); err != nil {
				break
			}
		}
		rc.Close()
		if _, err := q.Settle(ctx, ls[0], []Outcome{{Rcpt: "r@example.test", Result: Delivered, Reply: Reply{Code: 250}}}); err != nil {
			b.Fatal(err)
		}
	}
}
