package e2e

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

var (
	crashRounds  = flag.Int("crash.rounds", 4, "kill -9 rounds in TestCrash (longer runs: 20)")
	crashClients = flag.Int("crash.clients", 8, "concurrent submitters in TestCrash")
)

var seqRE = regexp.MustCompile(`X-Seq: (\d+)`)

// TestCrash_Kill9UnderLoad_EveryAcceptedMessageDelivered is promise 1: a
// relayd process is killed with SIGKILL at random moments while clients
// submit and it delivers; after each kill it restarts on the same data
// directory. Every message that got a 250 must reach the destination at
// least once. Duplicates are allowed only for deliveries in flight at a
// kill, so their number is bounded by kills × in-flight deliveries.
func TestCrash_Kill9UnderLoad_EveryAcceptedMessageDelivered(t *testing.T) {
	dest := startSink(t, "sink.test")
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[auth]
allow = [{ name = "loadgen", cidr = ["127.0.0.1/32"] }]
[queue]
retry_min = "200ms"
retry_max = "1s"
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[log]
level = "warn"
`, dest.port))

	var (
		mu    sync.Mutex
		acked = map[int]bool{}
		seq   atomic.Int64
		stop  atomic.Bool
		wg    sync.WaitGroup
	)
	for c := 0; c < *crashClients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				cl, err := smtp.Dial(r.addr)
				if err != nil {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				for i := 0; i < 20 && !stop.Load(); i++ {
					n := int(seq.Add(1))
					body := fmt.Sprintf("From: load@sender.test\r\nTo: rcpt@dest.test\r\nSubject: crash %d\r\nX-Seq: %d\r\n\r\n%s\r\n", n, n, strings.Repeat("crash test body line\r\n", 40))
					if err := cl.SendMail("load@sender.test", []string{"rcpt@dest.test"}, strings.NewReader(body)); err != nil {
						break // killed mid-transaction: not acknowledged
					}
					mu.Lock()
					acked[n] = true
					mu.Unlock()
				}
				cl.Close()
			}
		}()
	}

	for round := 0; round < *crashRounds; round++ {
		time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
		r.kill()
		time.Sleep(time.Duration(rand.IntN(100)) * time.Millisecond)
		r.start()
	}
	time.Sleep(300 * time.Millisecond)
	stop.Store(true)
	wg.Wait()

	mu.Lock()
	want := len(acked)
	mu.Unlock()
	if want == 0 {
		t.Fatal("no message was acknowledged")
	}
	// Wait until every acknowledged message has arrived.
	deadline := time.Now().Add(90 * time.Second)
	var missing []int
	var counts map[int]int
	for {
		counts = map[int]int{}
		for _, m := range dest.messages() {
			if s := seqRE.FindSubmatch(m.Body); s != nil {
				var n int
				fmt.Sscan(string(s[1]), &n)
				counts[n]++
			}
		}
		missing = missing[:0]
		for n := range acked {
			if counts[n] == 0 {
				missing = append(missing, n)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	dups := 0
	for _, c := range counts {
		if c > 1 {
			dups += c - 1
		}
	}
	t.Logf("%d rounds: %d messages acknowledged, %d delivered (incl. unacknowledged), %d duplicates", *crashRounds, want, len(counts), dups)
	if len(missing) > 0 {
		t.Fatalf("%d acknowledged messages never delivered, e.g. %v\nrelayd output:\n%s", len(missing), missing[:min(10, len(missing))], r.out.String())
	}
	// In flight at a kill: at most the relay's concurrent deliveries to
	// the destination (20 by default) per kill.
	if limit := *crashRounds * 20; dups > limit {
		t.Fatalf("%d duplicates after %d kills: more than deliveries in flight could explain (%d)", dups, *crashRounds, limit)
	}
}
