package e2e

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/nats-io/nats-server/v2/server"
)

// TestRelayd_TwoNodesOnNATS_EachMessageDeliveredOnce runs two relayd
// processes with backend = "nats" against one in-process JetStream
// server: mail submitted to either node is delivered exactly once.
func TestRelayd_TwoNodesOnNATS_EachMessageDeliveredOnce(t *testing.T) {
	ns := startNATS(t)

	dest := startSink(t, "sink.test")
	conf := func(node string) string {
		return fmt.Sprintf(`
[auth]
allow = [{ name = "loadgen", cidr = ["127.0.0.1/32"] }]
[queue]
backend = "nats"
[queue.nats]
url = %q
node = %q
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
`, ns.ClientURL(), node, dest.port)
	}
	base := t.TempDir()
	a := newRelayd(t, filepath.Join(base, "a"), conf("node-a"))
	b := newRelayd(t, filepath.Join(base, "b"), conf("node-b"))

	const n = 20
	for i := 0; i < n; i++ {
		addr := a.addr
		if i%2 == 1 {
			addr = b.addr
		}
		body := fmt.Sprintf("From: load@sender.test\r\nTo: rcpt@dest.test\r\nSubject: nats %d\r\nX-Seq: %d\r\n\r\nbody\r\n", i, i)
		if err := sendPlain(addr, "load@sender.test", "rcpt@dest.test", body); err != nil {
			t.Fatalf("submit %d to %s: %v", i, addr, err)
		}
	}
	dest.wait(n, 30*time.Second)
	time.Sleep(500 * time.Millisecond) // room for a wrongful second delivery
	seen := map[string]int{}
	for _, m := range dest.messages() {
		if s := seqRE.FindSubmatch(m.Body); s != nil {
			seen[string(s[1])]++
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct messages delivered, want %d", len(seen), n)
	}
	for k, c := range seen {
		if c != 1 {
			t.Fatalf("message %s delivered %d times", k, c)
		}
	}
	// Either node's queue command sees the same (now empty) shared queue.
	out, err := a.runCmd(t.Context(), nil, "queue", "stats")
	if err != nil || !strings.Contains(out, "messages: 0") {
		t.Fatalf("relayd queue stats on node a: %v\n%s", err, out)
	}
}

// sendPlain submits one message without STARTTLS (allow-listed clients).
func sendPlain(addr, from, to, body string) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SendMail(from, []string{to}, strings.NewReader(body)); err != nil {
		return err
	}
	return c.Quit()
}

// startNATS starts an in-process JetStream server on 127.0.0.1, with file
// storage in a temporary directory, stopped when the test ends.
func startNATS(t *testing.T) *server.Server {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: server.RANDOM_PORT, JetStream: true,
		StoreDir: t.TempDir(), NoLog: true, NoSigs: true, DisableJetStreamBanner: true})
	if err != nil {
		t.Fatal(err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns
}
