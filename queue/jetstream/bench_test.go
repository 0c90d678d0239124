package jetstream_test

import (
	"bytes"
	"context"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
)

// body5K is a 5 KB message, the size the benchmarks use.
var body5K = bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.\r\n"), 100)[:5000]

// benchQueue opens a queue for a benchmark: on an in-process server, or
// on the deployment named by -nats.url (then deleted afterwards).
func benchQueue(b *testing.B) *jetstream.Queue {
	b.Helper()
	if *extURL == "" {
		return openQueue(b, startNATS(b), jetstream.Config{Prefix: uniquePrefix()})
	}
	q := openQueue(b, *extURL, jetstream.Config{User: *extUser, Password: *extPassword, Replicas: *extReplicas, Prefix: "bench" + uniquePrefix()})
	b.Cleanup(func() { q.Destroy(context.Background()) })
	return q
}

// BenchmarkEnqueue_5KB measures Enqueue against an in-process server:
// Serial is one caller at a time (latency bound), Parallel is 16 callers.
func BenchmarkEnqueue_5KB(b *testing.B) {
	for _, par := range []int{1, 16} {
		name := "Serial"
		if par > 1 {
			name = "Parallel16"
		}
		b.Run(name, func(b *testing.B) {
			q := benchQueue(b)
			ctx := context.Background()
			b.SetBytes(int64(len(body5K)))
			b.ResetTimer()
			start := time.Now()
			if par == 1 {
				for range b.N {
					if _, err := q.Enqueue(ctx, env("r@example.test"), bytes.NewReader(body5K)); err != nil {
						b.Fatal(err)
					}
				}
			} else {
				b.SetParallelism((par + 1) / 2) // × GOMAXPROCS (2 here)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						if _, err := q.Enqueue(ctx, env("r@example.test"), bytes.NewReader(body5K)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
		})
	}
}

// BenchmarkLeaseSettle_5KB measures leasing queued 5 KB messages in
// batches of 16 and settling each as delivered (which removes the message
// and its body), with 4 workers each settling its batch concurrently, as a
// relay would.
func BenchmarkLeaseSettle_5KB(b *testing.B) {
	q := benchQueue(b)
	ctx := context.Background()
	// Enqueue in parallel so that setup does not dominate.
	var wg sync.WaitGroup
	const fill = 16
	for w := range fill {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < b.N; i += fill {
				if _, err := q.Enqueue(ctx, env("r@example.test"), bytes.NewReader(body5K)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ResetTimer()
	start := time.Now()
	var mu sync.Mutex
	left := b.N
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				if left == 0 {
					mu.Unlock()
					return
				}
				mu.Unlock()
				lctx, cancel := context.WithTimeout(ctx, time.Second)
				ls, err := q.Lease(lctx, 16, time.Minute)
				cancel()
				if err != nil && lctx.Err() == nil {
					b.Error(err)
					return
				}
				// Settle concurrently, as the relay does (one goroutine
				// per leased message).
				var sg sync.WaitGroup
				for _, l := range ls {
					sg.Add(1)
					go func() {
						defer sg.Done()
						if _, err := q.Settle(ctx, l, []queue.Outcome{{Rcpt: "r@example.test", Result: queue.Delivered}}); err != nil {
							b.Error(err)
						}
					}()
				}
				sg.Wait()
				mu.Lock()
				left -= len(ls)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
}
