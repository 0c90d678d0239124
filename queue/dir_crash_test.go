package queue

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// crashBody is the body the crash child writes for a message; the parent
// recomputes it to check what survived.
func crashBody(tag string, n int) string {
	return strings.Repeat(tag+"\r\n", n)
}

// TestDir_CrashHelper is the child process of TestDir_KillNine: it enqueues
// from several goroutines and prints each acknowledged ID. It does nothing
// in a normal test run.
func TestDir_CrashHelper(t *testing.T) {
	dir := os.Getenv("BATON_QUEUE_CRASH_DIR")
	if dir == "" {
		t.Skip("helper process for TestDir_KillNine")
	}
	q, err := OpenDir(DirConfig{Path: dir})
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(1)
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				tag := fmt.Sprintf("w%d-%d-%d", w, i, os.Getpid())
				n := rand.IntN(5000)
				id, err := q.Enqueue(context.Background(), testEnv("r@example.test"), strings.NewReader(crashBody(tag, n)))
				if err != nil {
					fmt.Println("ERR", err)
					os.Exit(1)
				}
				// Settle some of them, so that state appends are in flight
				// too when the kill comes, and deliver some, so that their
				// files are recycled into new messages (see Dir.discard).
				if i%3 != 2 {
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					ls, _ := q.Lease(ctx, 1, time.Hour)
					cancel()
					for _, l := range ls {
						o := Outcome{Rcpt: "r@example.test", Result: Retry, Reply: Reply{Code: 451, Text: "later"}}
						if i%3 == 1 {
							// Announced before: once delivered it may be gone.
							mu.Lock()
							fmt.Printf("GONE %s\n", l.Message.ID)
							mu.Unlock()
							o = Outcome{Rcpt: "r@example.test", Result: Delivered, Reply: Reply{Code: 250}}
						}
						q.Settle(context.Background(), l, []Outcome{o})
					}
				}
				mu.Lock()
				fmt.Printf("ACK %s %s %d\n", id, tag, n)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestDir_KillNine kills a process that enqueues under load with SIGKILL
// at random moments and checks that every acknowledged message is there
// afterwards, byte for byte (DESIGN promise 1).
func TestDir_KillNine(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	dir := t.TempDir()
	type acked struct {
		tag string
		n   int
	}
	all := map[ID]acked{}
	gone := map[ID]bool{} // delivered: may or may not be there
	for round := range 3 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestDir_CrashHelper$", "-test.count=1")
		cmd.Env = append(os.Environ(), "BATON_QUEUE_CRASH_DIR="+dir)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		killAt := 50 + rand.IntN(200)
		sc := bufio.NewScanner(out)
		seen := 0
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "ERR") {
				t.Fatalf("child: %s", line)
			}
			var id, tag string
			var n int
			if _, err := fmt.Sscanf(line, "GONE %s", &id); err == nil {
				gone[ID(id)] = true
				continue
			}
			if _, err := fmt.Sscanf(line, "ACK %s %s %d", &id, &tag, &n); err != nil {
				continue
			}
			all[ID(id)] = acked{tag, n}
			if seen++; seen == killAt {
				cmd.Process.Signal(syscall.SIGKILL)
			}
		}
		cmd.Wait()
		if seen < killAt {
			t.Fatalf("round %d: child stopped after %d acknowledgements", round, seen)
		}

		q, err := OpenDir(DirConfig{Path: dir})
		if err != nil {
			t.Fatalf("round %d: OpenDir after kill: %v", round, err)
		}
		delivered := 0
		for id, a := range all {
			rc, err := q.Open(context.Background(), id)
			if err != nil && gone[id] {
				delivered++
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
			if _, err := q.Get(context.Background(), id); err != nil {
				t.Fatalf("round %d: Get(%s): %v", round, id, err)
			}
		}
		if qs, _ := q.Quarantined(context.Background()); len(qs) != 0 {
			t.Errorf("round %d: %d files quarantined after a kill", round, len(qs))
		}
		if left, _ := os.ReadDir(q.tmp); len(left) != 0 {
			t.Errorf("round %d: %d files left in tmp/ after recovery", round, len(left))
		}
		q.Close()
		t.Logf("round %d: killed after %d acks; %d acknowledged messages present, %d delivered and gone", round, killAt, len(all)-delivered, delivered)
	}
}
