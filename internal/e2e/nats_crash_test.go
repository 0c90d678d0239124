package e2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats.go"
)

// The tests in this file are promise 1 (once relayd answered 250, the
// message survives a kill -9 and is delivered) for the NATS JetStream
// backend: several relayd nodes share one queue in JetStream's file
// storage, and the processes die with SIGKILL under load.

// natsLoad submits messages concurrently to a set of relayd nodes and
// remembers every body that got a 250, so that the sink's copies can be
// checked byte for byte.
type natsLoad struct {
	nodes []*relayd
	// timeout, when set, is how long a submitter waits for each reply
	// (go-smtp's default is minutes).
	timeout time.Duration

	mu     sync.Mutex
	acked  map[int][]byte // X-Seq → body as submitted
	seq    atomic.Int64
	failed atomic.Int64 // submissions that got no 250
	stop   atomic.Bool
	wg     sync.WaitGroup
}

// natsCrashBody is message n: a unique header (with Date and Message-ID,
// so that relayd adds only its trace header), then lines of random
// printable text (some starting with a dot, which SMTP must stuff and
// unstuff), now and then more than one 128 KiB JetStream chunk.
func natsCrashBody(n int) []byte {
	rng := rand.New(rand.NewPCG(uint64(n), 0x6261746f6e))
	var b bytes.Buffer
	fmt.Fprintf(&b, "From: load@sender.test\r\nTo: rcpt@dest.test\r\nDate: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <%d@sender.test>\r\nSubject: nats crash %d\r\nX-Seq: %d\r\n\r\n", n, n, n)
	lines := 20 + rng.IntN(60)
	if n%40 == 0 {
		lines = 3000 // ~230 KiB: two chunks
	}
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_=+!?()<>"
	for i := 0; i < lines; i++ {
		if rng.IntN(10) == 0 {
			b.WriteByte('.')
		}
		for j := 0; j < 10+rng.IntN(66); j++ {
			b.WriteByte(alphabet[rng.IntN(len(alphabet))])
		}
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// start runs clients submitters until stopAndWait; each connection goes to
// a random node and gives up (for another) when that node dies.
func (l *natsLoad) start(clients int) {
	l.acked = map[int][]byte{}
	for c := 0; c < clients; c++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for !l.stop.Load() {
				cl, err := smtp.Dial(l.nodes[rand.IntN(len(l.nodes))].addr)
				if err != nil {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				if l.timeout > 0 {
					cl.CommandTimeout, cl.SubmissionTimeout = l.timeout, l.timeout
				}
				for i := 0; i < 20 && !l.stop.Load(); i++ {
					n := int(l.seq.Add(1))
					body := natsCrashBody(n)
					if err := cl.SendMail("load@sender.test", []string{"rcpt@dest.test"}, bytes.NewReader(body)); err != nil {
						// Killed (or NATS down) mid-transaction:
						// not acknowledged.
						l.failed.Add(1)
						break
					}
					l.mu.Lock()
					l.acked[n] = body
					l.mu.Unlock()
				}
				cl.Close()
			}
		}()
	}
}

// stopAndWait stops the submitters and waits for them. A submission that
// relayd leaves unanswered for d fails the test, with the nodes' goroutine
// dumps (SIGQUIT) to show where they wait.
func (l *natsLoad) stopAndWait(t *testing.T, d time.Duration) {
	t.Helper()
	l.stop.Store(true)
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
		return
	case <-time.After(d):
	}
	var dumps strings.Builder
	for i, r := range l.nodes {
		r.cmd.Process.Signal(syscall.SIGQUIT)
		select {
		case <-r.done:
		case <-time.After(5 * time.Second):
		}
		fmt.Fprintf(&dumps, "node %d:\n%s\n", i, r.out.String())
	}
	t.Fatalf("submissions still unanswered %v after the load stopped\n%s", d, dumps.String())
}

// natsCheck is what the sink holds compared with what was acknowledged.
type natsCheck struct {
	missing   []int // acknowledged, never delivered
	corrupt   []int // delivered with a body other than the one submitted
	delivered int   // distinct messages delivered
	dups      int   // deliveries beyond the first
}

// check compares the sink's messages with the acknowledged bodies. A
// delivered body must be the submitted one with relayd's Received header
// in front, and nothing else changed.
func (l *natsLoad) check(dest *sink) natsCheck {
	l.mu.Lock()
	defer l.mu.Unlock()
	var c natsCheck
	counts := map[int]int{}
	for _, m := range dest.messages() {
		s := seqRE.FindSubmatch(m.Body)
		if s == nil {
			continue
		}
		n, _ := strconv.Atoi(string(s[1]))
		counts[n]++
		want, ok := l.acked[n]
		if !ok {
			want = natsCrashBody(n) // accepted but its 250 was lost
		}
		if !bytes.Equal(stripReceived(m.Body), want) {
			c.corrupt = append(c.corrupt, n)
		}
	}
	for n := range l.acked {
		if counts[n] == 0 {
			c.missing = append(c.missing, n)
		}
	}
	for _, k := range counts {
		c.dups += k - 1
	}
	c.delivered = len(counts)
	return c
}

// stripReceived removes the Received header field relayd puts in front of
// a message (RFC 5321 section 4.4), with its continuation lines; what it
// returns must be the message as submitted.
func stripReceived(b []byte) []byte {
	if !bytes.HasPrefix(b, []byte("Received: ")) {
		return b
	}
	for {
		i := bytes.Index(b, []byte("\r\n"))
		if i < 0 {
			return b
		}
		b = b[i+2:]
		if len(b) == 0 || (b[0] != ' ' && b[0] != '\t') {
			return b
		}
	}
}

// waitDelivered polls the sink until every acknowledged message arrived or
// d passes, and returns the last comparison. Corruption fails at once.
func (l *natsLoad) waitDelivered(t *testing.T, dest *sink, d time.Duration) natsCheck {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		c := l.check(dest)
		if len(c.corrupt) > 0 {
			t.Fatalf("%d messages delivered with a body other than the one submitted, e.g. X-Seq %v", len(c.corrupt), c.corrupt[:min(10, len(c.corrupt))])
		}
		if len(c.missing) == 0 || time.Now().After(deadline) {
			return c
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (l *natsLoad) ackedCount() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.acked)
}

// natsNodeConf is a relayd configuration on the shared NATS queue.
func natsNodeConf(url, node string, sinkPort int) string {
	return fmt.Sprintf(`
[auth]
allow = [{ name = "loadgen", cidr = ["127.0.0.1/32"] }]
[queue]
backend = "nats"
retry_min = "200ms"
retry_max = "1s"
[queue.nats]
url = %q
node = %q
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[log]
level = "warn"
`, url, node, sinkPort)
}

// TestCrash_NATS_Kill9NodesUnderLoad_EveryAcceptedMessageDelivered runs two
// relayd nodes on one JetStream server (file storage, as relayd creates
// the bucket and stream) while clients submit to both. In a first phase
// node a is killed with SIGKILL at random moments and restarted under the
// same node name; in a second phase node b is. Every message that got a
// 250 must reach the destination, byte for byte; duplicates (deliveries in
// flight at a kill) are allowed and counted.
func TestCrash_NATS_Kill9NodesUnderLoad_EveryAcceptedMessageDelivered(t *testing.T) {
	start := time.Now()
	ns := startNATS(t)

	dest := startSink(t, "sink.test")
	base := t.TempDir()
	a := newRelayd(t, filepath.Join(base, "a"), natsNodeConf(ns.ClientURL(), "node-a", dest.port))
	b := newRelayd(t, filepath.Join(base, "b"), natsNodeConf(ns.ClientURL(), "node-b", dest.port))

	load := &natsLoad{nodes: []*relayd{a, b}}
	load.start(*crashClients)
	kills := 0
	for _, victim := range []*relayd{a, b} {
		for round := 0; round < *crashRounds; round++ {
			time.Sleep(time.Duration(200+rand.IntN(600)) * time.Millisecond)
			victim.kill()
			kills++
			time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
			victim.start()
		}
	}
	time.Sleep(300 * time.Millisecond)
	load.stopAndWait(t, 30*time.Second)

	want := load.ackedCount()
	if want == 0 {
		t.Fatal("no message was acknowledged")
	}
	c := load.waitDelivered(t, dest, 60*time.Second)
	t.Logf("%d kills of relayd nodes: %d messages acknowledged, %d submissions without 250, %d delivered (incl. unacknowledged), %d duplicates; %v",
		kills, want, load.failed.Load(), c.delivered, c.dups, time.Since(start).Round(time.Millisecond))
	if len(c.missing) > 0 {
		t.Fatalf("%d acknowledged messages never delivered, e.g. X-Seq %v\nnode a output:\n%s\nnode b output:\n%s",
			len(c.missing), c.missing[:min(10, len(c.missing))], a.out.String(), b.out.String())
	}
}

// natsProc is a nats-server child process with JetStream, storing in dir,
// that can be killed with SIGKILL and restarted on the same store.
type natsProc struct {
	t    *testing.T
	bin  string
	addr string
	dir  string
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan struct{}
}

var (
	natsBinOnce sync.Once
	natsBinPath string
	natsBinErr  error
)

// buildNATSServer builds nats-server from the module this module depends
// on, once per test binary (TestMain removes it).
func buildNATSServer(t *testing.T) string {
	t.Helper()
	natsBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "baton-e2e-nats-")
		if err != nil {
			natsBinErr = err
			return
		}
		natsBinPath = filepath.Join(dir, "nats-server")
		out, err := exec.Command("go", "build", "-o", natsBinPath, "github.com/nats-io/nats-server/v2").CombinedOutput()
		if err != nil {
			natsBinErr = fmt.Errorf("go build nats-server: %v\n%s", err, out)
		}
	})
	if natsBinErr != nil {
		t.Fatal(natsBinErr)
	}
	return natsBinPath
}

func (p *natsProc) start() {
	p.t.Helper()
	host, port, _ := net.SplitHostPort(p.addr)
	p.out = &lockedBuffer{}
	p.cmd = exec.Command(p.bin, "-a", host, "-p", port, "-js", "-sd", p.dir, "-n", "e2e-nats")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		p.t.Fatal(err)
	}
	p.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(p.cmd, p.done)
	// Ready when JetStream answers (it recovers the store first).
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			p.t.Fatalf("nats-server exited at start:\n%s", p.out.String())
		default:
		}
		if nc, err := nats.Connect("nats://"+p.addr, nats.Timeout(time.Second)); err == nil {
			js, err := nc.JetStream()
			if err == nil {
				_, err = js.AccountInfo()
			}
			nc.Close()
			if err == nil {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.t.Fatalf("nats-server not ready on %s:\n%s", p.addr, p.out.String())
}

func (p *natsProc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

func (p *natsProc) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(20 * time.Second):
		p.kill()
	}
}

// TestCrash_NATS_Kill9Server_AcceptedMessagesSurvive kills the JetStream
// server itself (a child nats-server with file storage, default sync
// settings) with SIGKILL while two relayd nodes accept and deliver, and
// restarts it on the same store directory: every message that got a 250
// must still be delivered, byte for byte.
func TestCrash_NATS_Kill9Server_AcceptedMessagesSurvive(t *testing.T) {
	if testing.Short() {
		t.Skip("builds nats-server")
	}
	start := time.Now()
	p := &natsProc{t: t, bin: buildNATSServer(t), addr: freeAddr(t), dir: t.TempDir()}
	p.start()
	t.Cleanup(p.stop)
	t.Logf("nats-server built and started in %v", time.Since(start).Round(time.Millisecond))

	dest := startSink(t, "sink.test")
	base := t.TempDir()
	url := "nats://" + p.addr
	a := newRelayd(t, filepath.Join(base, "a"), natsNodeConf(url, "node-a", dest.port))
	b := newRelayd(t, filepath.Join(base, "b"), natsNodeConf(url, "node-b", dest.port))

	// Requests to NATS in flight at the kill get no reply until the
	// queue's Timeout (5 s) ends them; the submitters give up after as
	// long, unacknowledged.
	load := &natsLoad{nodes: []*relayd{a, b}, timeout: 5 * time.Second}
	load.start(*crashClients)
	rounds := max(1, *crashRounds/4)
	for round := 0; round < rounds; round++ {
		time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond)
		p.kill()
		time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
		p.start()
	}
	// Let the nodes reconnect and take mail again before stopping.
	time.Sleep(time.Second)
	load.stopAndWait(t, 30*time.Second)

	want := load.ackedCount()
	if want == 0 {
		t.Fatal("no message was acknowledged")
	}
	c := load.waitDelivered(t, dest, 10*time.Second)
	stuck := len(c.missing)
	if stuck > 0 {
		// Requests lost with the server end after the queue's
		// Timeout (5 s), but a Settle that fails while the server is
		// down leaves its message leased until the lease expires (15
		// minutes); a node restarted under its name ends its own
		// leases at once. (SIGKILL, since SIGTERM would wait for
		// deliveries in progress.)
		t.Logf("%d acknowledged messages not delivered after NATS came back (e.g. X-Seq %v); restarting both nodes", stuck, c.missing[:min(10, len(c.missing))])
		a.kill()
		a.start()
		b.kill()
		b.start()
		c = load.waitDelivered(t, dest, 30*time.Second)
	}
	t.Logf("%d kills of nats-server: %d messages acknowledged, %d submissions without 250, %d delivered (incl. unacknowledged), %d duplicates, %d delivered only after the nodes restarted; %v",
		rounds, want, load.failed.Load(), c.delivered, c.dups, stuck-len(c.missing), time.Since(start).Round(time.Millisecond))
	if len(c.missing) > 0 {
		t.Fatalf("%d acknowledged messages never delivered, e.g. X-Seq %v\nnode a output:\n%s\nnode b output:\n%s\nnats-server output:\n%s",
			len(c.missing), c.missing[:min(10, len(c.missing))], a.out.String(), b.out.String(), p.out.String())
	}
}
