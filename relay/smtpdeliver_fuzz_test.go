package relay

import (
	"bufio"
	"bytes"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/mx"
)

// FuzzSMTPDeliver_ServerReplies drives whole sessions against a peer whose
// replies come from the fuzzer: the first line is the greeting, and each
// command (and the end of the body) is answered with the next line. Deliver
// must never panic or hang, must give one reply per recipient with a
// consistent class, and may report a recipient delivered only when the
// peer answered the final dot with 2xx.
//
// go test runs the seeds; go test -fuzz FuzzSMTPDeliver_ServerReplies
// explores further.
func FuzzSMTPDeliver_ServerReplies(f *testing.F) {
	for _, seed := range []string{
		"220 hi\n250 ok\n250 ok\n250 ok\n250 ok\n354 go\n250 2.0.0 queued\n221 bye",
		"220 hi\n250-x\n250 8BITMIME\n250 ok\n550 5.1.1 no\n250 ok\n354 go\n550 5.7.1 spam\n",
		"220 hi\n250 ok\n250 ok\n421 4.3.0 bye\n",
		"554 no\n",
		"220 hi\n250-x\n250 STARTTLS\n220 go ahead\n",
		"220 hi\n250 ok\n250 ok\n250 ok\n250 ok\n354 go\n",
		"220 hi\n250 ok\n250 ok\n250 2.1.5 ok\n250 ok\n250 ok\n451 4.3.0 later\n",
		"220-a\n220 b\n250 x\n251 y\n252 z\n250 w\n354 d\n250\n",
		"220 hi\n250 ok\n250 ok\n250 ok\n250 ok\n354\n2x0 bad\n",
		"220 hi\n500 what\n250 helo ok\n250 ok\n250 ok\n250 ok\n250 ok\n354 go\n250 ok\n",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, script string) {
		lines := strings.Split(script, "\n")
		var mu sync.Mutex
		dotAnswer := "" // the reply to the final dot, if one was given
		a := sdRawPeer(t, func(c net.Conn) {
			br := bufio.NewReader(c)
			next := 0
			reply := func() bool {
				if next >= len(lines) {
					return false
				}
				l := strings.TrimRight(lines[next], "\r")
				next++
				c.Write([]byte(l + "\r\n"))
				return true
			}
			if !reply() {
				return
			}
			inData := false
			for {
				l, err := br.ReadString('\n')
				if err != nil {
					return
				}
				cmd := strings.ToUpper(strings.TrimSpace(l))
				if inData {
					if l != ".\r\n" {
						continue
					}
					inData = false
					if next < len(lines) {
						mu.Lock()
						dotAnswer = strings.TrimRight(lines[next], "\r")
						mu.Unlock()
					}
				} else if cmd == "DATA" && next < len(lines) && strings.HasPrefix(lines[next], "354") {
					inData = true
				}
				// STARTTLS gets a scripted reply like any command; there
				// is no TLS here, so a handshake after a 220 fails.
				if !reply() {
					return
				}
			}
		})
		short := Timeouts{Connect: time.Second, Greeting: time.Second, Command: time.Second,
			DataInit: time.Second, DataBlock: time.Second, DataEnd: time.Second}
		d := newTestDeliverer(t, SMTPDelivererConfig{Timeouts: short})
		env := sdEnv("a@example.test", "b@example.test", "c@example.test")
		res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, sdHostAt("fuzz.example.test", a)), env, []byte(sdBody)))
		if len(res.Replies) != 3 {
			t.Fatalf("%d replies", len(res.Replies))
		}
		mu.Lock()
		dot := dotAnswer
		mu.Unlock()
		for i, r := range res.Replies {
			class := r.Code / 100
			if class != 2 && class != 4 && class != 5 {
				t.Fatalf("reply %d has code %d: %v", i, r.Code, r)
			}
			if r.Enhanced != "" && r.Enhanced[0] != byte('0'+class) {
				t.Fatalf("reply %d mixes classes: %v", i, r)
			}
			if class == 2 && !strings.HasPrefix(dot, "2") {
				t.Fatalf("recipient %d reported delivered, but the final dot was answered %q", i, dot)
			}
			if bytes.ContainsAny([]byte(r.Text), "\r\n") {
				t.Fatalf("reply %d text has a line break: %q", i, r.Text)
			}
		}
	})
}
