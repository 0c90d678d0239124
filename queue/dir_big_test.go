package queue

import (
	"context"
	"flag"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var bigQueue = flag.Bool("queue.big", false, "run the 100,000-message memory test of Dir")

// rss returns the resident set size of this process in bytes (Linux).
func rss(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status")
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func heapInuse() int64 {
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

// TestDir_100k_MemoryStaysSmall enqueues 100,000 messages and reports the
// heap and RSS they cost, while running and after a reopen (recovery).
// Run with: go test -run 100k -queue.big -v ./queue
func TestDir_100k_MemoryStaysSmall(t *testing.T) {
	if !*bigQueue {
		t.Skip("run with -queue.big")
	}
	const n = 100_000
	dir := t.TempDir()
	// NoSync: syncing does not change memory use, and 100k real syncs
	// would take minutes.
	q, err := OpenDir(DirConfig{Path: dir, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	heap0, rss0 := heapInuse(), rss(t)
	body := strings.Repeat("x", 2000)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < n; i += 8 {
				to := "r@d" + strconv.Itoa(i%500) + ".example.test"
				if _, err := q.Enqueue(context.Background(), testEnv(to), strings.NewReader(body)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	enq := time.Since(start)
	heap1, rss1 := heapInuse(), rss(t)
	t.Logf("enqueued %d messages in %v; heap in use %+.1f MB (%.0f B/message), RSS %.1f -> %.1f MB",
		n, enq, float64(heap1-heap0)/1e6, float64(heap1-heap0)/n, float64(rss0)/1e6, float64(rss1)/1e6)
	s, err := q.Stats(context.Background())
	if err != nil || s.ByState[StateQueued] != n || len(s.ByDomain) != 500 {
		t.Fatalf("Stats: %v %v", s.ByState, err)
	}
	q.Close()
	q = nil
	heap2 := heapInuse()

	start = time.Now()
	q, err = OpenDir(DirConfig{Path: dir, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	rec := time.Since(start)
	heap3, rss3 := heapInuse(), rss(t)
	t.Logf("reopened in %v; heap in use %+.1f MB (%.0f B/message); RSS %.1f MB", rec, float64(heap3-heap2)/1e6, float64(heap3-heap2)/n, float64(rss3)/1e6)
	if per := (heap3 - heap2) / n; per > 400 {
		t.Errorf("%d heap bytes per queued message; the index should stay near 200", per)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start = time.Now()
	ls, err := q.Lease(ctx, 100, time.Minute)
	if err != nil || len(ls) != 100 {
		t.Fatalf("Lease: %d, %v", len(ls), err)
	}
	t.Logf("leased 100 of %d in %v", n, time.Since(start))
}
