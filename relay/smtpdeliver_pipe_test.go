package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// sdPipeLog is what a sdPipeServer received.
type sdPipeLog struct {
	mu     sync.Mutex
	reads  []string // every Read from the connection, as it arrived
	cmds   []string // command lines, without CRLF
	bodies []string // DATA bodies, dot-stuffed, without the final dot
	conns  int
}

func (l *sdPipeLog) add(f func()) { l.mu.Lock(); f(); l.mu.Unlock() }

// sdPipeReads records each Read.
type sdPipeReads struct {
	r   io.Reader
	log *sdPipeLog
}

func (r sdPipeReads) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if n > 0 {
		r.log.add(func() { r.log.reads = append(r.log.reads, string(p[:n])) })
	}
	return n, err
}

// sdPipeServer is a raw SMTP server on 127.0.0.1 that answers each
// command as it reads it (so pipelined commands are answered in order);
// reply scripts MAIL, RCPT and DATA replies ("" for the default; a reply
// starting with 421 also closes the connection).
func sdPipeServer(t *testing.T, ext []string, reply func(cmd string) string) (netip.AddrPort, *sdPipeLog) {
	log := &sdPipeLog{}
	addr := sdRawPeer(t, func(c net.Conn) {
		log.add(func() { log.conns++ })
		br := bufio.NewReader(sdPipeReads{c, log})
		w := func(s string) { fmt.Fprintf(c, "%s\r\n", s) }
		w("220 pipe.example.test ESMTP")
		inTx, rcpts := false, 0
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			line = strings.TrimRight(line, "\r\n")
			log.add(func() { log.cmds = append(log.cmds, line) })
			cmd := strings.ToUpper(line)
			r := ""
			if reply != nil && (strings.HasPrefix(cmd, "MAIL") || strings.HasPrefix(cmd, "RCPT") || cmd == "DATA") {
				r = reply(line)
			}
			if strings.HasPrefix(r, "421") {
				w(r)
				return
			}
			switch {
			case strings.HasPrefix(cmd, "EHLO"):
				lines := append([]string{"pipe.example.test"}, ext...)
				for i, l := range lines {
					sep := "-"
					if i == len(lines)-1 {
						sep = " "
					}
					w("250" + sep + l)
				}
			case strings.HasPrefix(cmd, "MAIL"):
				if r == "" {
					r = "250 2.1.0 sender ok"
				}
				inTx, rcpts = r[0] == '2', 0
				w(r)
			case strings.HasPrefix(cmd, "RCPT"):
				if !inTx {
					r = "503 5.5.1 no MAIL"
				} else if r == "" {
					r = "250 2.1.5 ok"
				}
				if r[0] == '2' {
					rcpts++
				}
				w(r)
			case cmd == "DATA":
				switch {
				case !inTx && r == "":
					r = "503 5.5.1 no MAIL"
				case r == "" && rcpts == 0:
					r = "503 5.5.1 no valid recipients"
				case r == "":
					r = "354 go ahead"
				}
				w(r)
				if !strings.HasPrefix(r, "354") {
					continue
				}
				var body strings.Builder
				for {
					l, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
					body.WriteString(l)
				}
				log.add(func() { log.bodies = append(log.bodies, body.String()) })
				w("250 2.0.0 queued as 42")
				inTx = false
			case cmd == "RSET":
				inTx, rcpts = false, 0
				w("250 2.0.0 ok")
			case cmd == "NOOP":
				w("250 2.0.0 ok")
			case cmd == "QUIT":
				w("221 2.0.0 bye")
				return
			default:
				w("500 5.5.1 what")
			}
		}
	})
	return addr, log
}

func (l *sdPipeLog) snapshot() (reads, cmds, bodies []string, conns int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.reads...), append([]string(nil), l.cmds...), append([]string(nil), l.bodies...), l.conns
}

// sdPipeDest is a deliverer with default settings and a route to the
// sdPipeServer at addr.
func sdPipeDest(t *testing.T, addr netip.AddrPort) (*SMTPDeliverer, *mx.Route) {
	return newTestDeliverer(t, SMTPDelivererConfig{}), sdRoute("k", mx.TLSOpportunistic, sdHostAt("mx.example.test", addr))
}

// sdPipeFirstReplies is a sdPipeServer advertising PIPELINING that answers
// the first command starting with each key of first (MAIL, RCPT or DATA)
// with its value, and every other command as usual.
func sdPipeFirstReplies(t *testing.T, first map[string]string) (netip.AddrPort, *sdPipeLog) {
	var mu sync.Mutex
	return sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
		mu.Lock()
		defer mu.Unlock()
		for prefix, r := range first {
			if strings.HasPrefix(cmd, prefix) {
				delete(first, prefix)
				return r
			}
		}
		return ""
	})
}

func TestSMTPDeliver_Pipelining_GoSMTPPeerAdvertisesIt(t *testing.T) {
	// The deliverer tests against go-smtp's server run over the pipelined
	// path only because it advertises PIPELINING; check that it does.
	p := newSDPeer(t, sdPeerConfig{})
	c, err := smtp.Dial(p.Addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.example.test"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := c.Extension("PIPELINING"); !ok {
		t.Fatal("go-smtp's server does not advertise PIPELINING")
	}
}

func TestSMTPDeliver_Pipelining_GroupInOneWrite(t *testing.T) {
	addr, log := sdPipeServer(t, []string{"PIPELINING", "8BITMIME", "SIZE 10000000"}, nil)
	d, route := sdPipeDest(t, addr)
	body := sdBody + ".leading dot\r\n"
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(body)))
	wantCodes(t, res, 250, 250)
	if r := res.Replies[0]; r.Enhanced != "2.0.0" || r.Text != "queued as 42" {
		t.Errorf("reply %+v", r)
	}
	reads, _, bodies, _ := log.snapshot()
	group := fmt.Sprintf("MAIL FROM:<sender@example.test> BODY=8BITMIME SIZE=%d\r\nRCPT TO:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n", len(body))
	found := false
	for _, r := range reads {
		if r == group {
			found = true
		}
	}
	if !found {
		t.Errorf("no single read held the command group %q; reads: %q", group, reads)
	}
	if len(bodies) != 1 || bodies[0] != strings.Replace(body, "\r\n.leading", "\r\n..leading", 1) {
		t.Errorf("bodies %q", bodies)
	}

	// A second message goes over the same connection, pipelined again.
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("c@example.test"), []byte(sdBody))), 250)
	reads, _, _, conns := log.snapshot()
	if conns != 1 {
		t.Errorf("connections = %d, want 1", conns)
	}
	second := false
	for _, r := range reads {
		if strings.HasPrefix(r, "MAIL FROM:") && strings.HasSuffix(r, "\r\nRCPT TO:<c@example.test>\r\nDATA\r\n") {
			second = true
		}
	}
	if !second {
		t.Errorf("second transaction not pipelined: %q", reads)
	}
}

func TestSMTPDeliver_Pipelining_NotAdvertisedKeepsLockstep(t *testing.T) {
	addr, log := sdPipeServer(t, []string{"8BITMIME"}, nil)
	d, route := sdPipeDest(t, addr)
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(sdBody))), 250, 250)
	reads, _, _, _ := log.snapshot()
	for _, r := range reads {
		n := 0
		for _, l := range strings.Split(r, "\r\n") {
			if strings.HasPrefix(l, "MAIL ") || strings.HasPrefix(l, "RCPT ") || l == "DATA" {
				n++
			}
		}
		if n > 1 {
			t.Errorf("commands sent together to a server without PIPELINING: %q", r)
		}
	}
}

func TestSMTPDeliver_Pipelining_SomeRcptsRejected(t *testing.T) {
	addr, log := sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
		switch {
		case strings.Contains(cmd, "<nobody@"):
			return "550 5.1.1 no such user"
		case strings.Contains(cmd, "<later@"):
			return "450-4.2.1 mailbox busy\r\n450 4.2.1 try later"
		}
		return ""
	})
	d, route := sdPipeDest(t, addr)
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test", "nobody@example.test", "later@example.test", "ok2@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250, 550, 450, 250)
	if r := res.Replies[1]; r.Enhanced != "5.1.1" || r.Text != "no such user" {
		t.Errorf("reply 1 %+v", r)
	}
	if r := res.Replies[2]; r.Enhanced != "4.2.1" || r.Text != "mailbox busy try later" {
		t.Errorf("reply 2 %+v", r)
	}
	if _, _, bodies, _ := log.snapshot(); len(bodies) != 1 || bodies[0] != sdBody {
		t.Errorf("bodies %q", bodies)
	}
}

func TestSMTPDeliver_Pipelining_AllRcptsRejected(t *testing.T) {
	for _, tc := range []struct{ name, data string }{
		{"DATA refused 503", ""}, // the server's default without MAIL/RCPT
		{"DATA refused 554", "554 5.5.1 no valid recipients"},
		{"DATA accepted 354", "354 go ahead"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			first := true
			addr, log := sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
				switch {
				case strings.HasPrefix(cmd, "RCPT") && !strings.Contains(cmd, "<ok@"):
					return "550 5.1.1 no such user"
				case cmd == "DATA" && tc.data != "":
					mu.Lock()
					defer mu.Unlock()
					if first {
						first = false
						return tc.data
					}
				}
				return ""
			})
			d, route := sdPipeDest(t, addr)
			res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("x@example.test", "y@example.test"), []byte(sdBody)))
			wantCodes(t, res, 550, 550)
			wantEnhanced(t, res, "5.1.1")
			_, cmds, bodies, _ := log.snapshot()
			if tc.data == "354 go ahead" {
				// The 354 was answered with an empty body.
				if len(bodies) != 1 || bodies[0] != "" {
					t.Errorf("bodies %q, want one empty", bodies)
				}
			} else if len(bodies) != 0 {
				t.Errorf("bodies %q", bodies)
			}
			if cmds[len(cmds)-1] != "RSET" {
				t.Errorf("commands %q, want RSET last", cmds)
			}
			// The connection stays usable.
			wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test"), []byte(sdBody))), 250)
			if _, _, bodies, conns := log.snapshot(); conns != 1 || bodies[len(bodies)-1] != sdBody {
				t.Errorf("connections = %d, bodies %q", conns, bodies)
			}
		})
	}
}

func TestSMTPDeliver_Pipelining_MAILRefused(t *testing.T) {
	addr, log := sdPipeFirstReplies(t, map[string]string{"MAIL": "451 4.3.0 try again later"})
	d, route := sdPipeDest(t, addr)
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451, 451)
	wantEnhanced(t, res, "4.3.0")
	if r := res.Replies[0]; r.Text != "try again later" {
		t.Errorf("reply %+v", r)
	}
	// The refused RCPTs and DATA were read; the session is in step.
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("c@example.test"), []byte(sdBody))), 250)
	if _, _, bodies, conns := log.snapshot(); conns != 1 || len(bodies) != 1 {
		t.Errorf("connections = %d, bodies %q", conns, bodies)
	}
}

func TestSMTPDeliver_Pipelining_MAILRefusedThenDATAAccepted(t *testing.T) {
	// An out-of-step server: no empty message is sent, the connection is
	// dropped.
	addr, log := sdPipeFirstReplies(t, map[string]string{"MAIL": "550 5.7.1 sender refused", "DATA": "354 go ahead"})
	d, route := sdPipeDest(t, addr)
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 550)
	wantEnhanced(t, res, "5.7.1")
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	if _, _, bodies, conns := log.snapshot(); conns != 2 || len(bodies) != 1 || bodies[0] != sdBody {
		t.Errorf("connections = %d, bodies %q", conns, bodies)
	}
}

func TestSMTPDeliver_Pipelining_421(t *testing.T) {
	t.Run("at RCPT", func(t *testing.T) {
		addr, log := sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
			if strings.Contains(cmd, "<stop@") {
				return "421 4.4.5 too busy, closing"
			}
			return ""
		})
		d, route := sdPipeDest(t, addr)
		res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test", "stop@example.test", "after@example.test"), []byte(sdBody)))
		wantCodes(t, res, 421, 421, 421)
		wantEnhanced(t, res, "4.4.5")
		// Not pooled: the next delivery opens a new connection.
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test"), []byte(sdBody))), 250)
		if _, _, bodies, conns := log.snapshot(); conns != 2 || len(bodies) != 1 {
			t.Errorf("connections = %d, bodies %q", conns, bodies)
		}
	})
	t.Run("at DATA", func(t *testing.T) {
		addr, log := sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
			if cmd == "DATA" {
				return "421 4.3.2 shutting down"
			}
			return ""
		})
		d, route := sdPipeDest(t, addr)
		res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(sdBody)))
		wantCodes(t, res, 421, 421)
		wantEnhanced(t, res, "4.3.2")
		if _, _, bodies, _ := log.snapshot(); len(bodies) != 0 {
			t.Errorf("bodies %q", bodies)
		}
	})
	t.Run("at MAIL", func(t *testing.T) {
		// Before anything was decided: a host failure, tried elsewhere.
		addr, _ := sdPipeServer(t, []string{"PIPELINING"}, func(cmd string) string {
			if strings.HasPrefix(cmd, "MAIL") {
				return "421 4.3.2 shutting down"
			}
			return ""
		})
		p := newSDPeer(t, sdPeerConfig{})
		d := newTestDeliverer(t, SMTPDelivererConfig{})
		route := sdRoute("k", mx.TLSOpportunistic, sdHostAt("mx1.example.test", addr), p.host("mx2.example.test"))
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
		if n := len(p.messages()); n != 1 {
			t.Errorf("second host got %d messages", n)
		}
	})
}

// sdWireEnv is an envelope using every MAIL and RCPT parameter the
// deliverer sends.
func sdWireEnv() *queue.Envelope {
	env := sdEnv("a@example.test", "b+x@example.test", "c@example.test", "d@example.test", "e@example.test")
	env.From = "sénder@example.test"
	env.SMTPUTF8 = true
	env.EightBit = true
	env.Ret = queue.RetFull
	env.EnvID = "QQ+31=4159"
	env.To[0].Notify = queue.NotifySuccess | queue.NotifyFailure | queue.NotifyDelay
	env.To[0].ORCPT = "rfc822;Original+Rcpt=x@example.test"
	env.To[1].Notify = queue.NotifyNever
	env.To[1].ORCPT = "utf-8;ré ci+p@example.test"
	env.To[2].Notify = queue.NotifyDelay
	env.To[3].ORCPT = "RFC822;plain@example.test"
	return env
}

func TestSMTPDeliver_Pipelining_ParametersOnTheWireAsWithoutPipelining(t *testing.T) {
	base := []string{"8BITMIME", "SIZE 50000000", "DSN", "SMTPUTF8"}
	for _, exts := range [][]string{base, {"8BITMIME"}, {"DSN"}, {}} {
		t.Run(strings.Join(exts, ","), func(t *testing.T) {
			run := func(pipelining bool) []string {
				ext := append([]string(nil), exts...)
				if pipelining {
					ext = append(ext, "PIPELINING")
				}
				addr, log := sdPipeServer(t, ext, nil)
				d, route := sdPipeDest(t, addr)
				env := sdWireEnv()
				if !hasWord(strings.Join(exts, " "), "SMTPUTF8") {
					env.From, env.SMTPUTF8 = "sender@example.test", false
					env.To[1].ORCPT = "utf-8;r ci+p@example.test"
				}
				d.Deliver(t.Context(), sdDelivery(route, env, []byte(sdBody)))
				reads, cmds, _, _ := log.snapshot()
				var tx []string
				for _, c := range cmds {
					if strings.HasPrefix(c, "MAIL") || strings.HasPrefix(c, "RCPT") || c == "DATA" {
						tx = append(tx, c)
					}
				}
				if pipelining && !strings.Contains(strings.Join(reads, "|"), "\r\nDATA\r\n|") {
					t.Errorf("not pipelined: %q", reads)
				}
				return tx
			}
			plain, piped := run(false), run(true)
			t.Logf("wire: %q", piped)
			if len(plain) != 7 || strings.Join(plain, "\n") != strings.Join(piped, "\n") {
				t.Errorf("commands differ:\nlockstep:  %q\npipelined: %q", plain, piped)
			}
		})
	}
}

// sdGoSMTPLines returns the MAIL and RCPT lines go-smtp's client writes
// (with CRLF) for a server advertising ext, or the error of the first
// command it refused to send.
func sdGoSMTPLines(t testing.TB, ext []string, from string, mo *smtp.MailOptions, to string, ro *smtp.RcptOptions) (mail, rcpt string, err error) {
	cc, sc := net.Pipe()
	defer cc.Close()
	var lines []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer sc.Close()
		br := bufio.NewReader(sc)
		fmt.Fprintf(sc, "220 x\r\n")
		for {
			l, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if strings.HasPrefix(l, "EHLO") {
				all := append([]string{"x"}, ext...)
				for i, e := range all {
					sep := "-"
					if i == len(all)-1 {
						sep = " "
					}
					fmt.Fprintf(sc, "250%s%s\r\n", sep, e)
				}
				continue
			}
			lines = append(lines, l)
			fmt.Fprintf(sc, "250 ok\r\n")
		}
	}()
	c := smtp.NewClient(cc)
	if err := c.Hello("h"); err != nil {
		t.Fatal(err)
	}
	if err = c.Mail(from, mo); err == nil {
		err = c.Rcpt(to, ro)
	}
	cc.Close()
	<-done
	if len(lines) > 0 {
		mail = lines[0]
	}
	if len(lines) > 1 {
		rcpt = lines[1]
	}
	return mail, rcpt, err
}

func sdExtOf(ext []string) sdExt {
	s := " " + strings.Join(ext, " ") + " "
	has := func(w string) bool { return strings.Contains(s, " "+w+" ") }
	return sdExt{eightBit: has("8BITMIME"), size: has("SIZE"), dsn: has("DSN"), smtputf8: has("SMTPUTF8"), requireTLS: has("REQUIRETLS"), pipelining: true}
}

// sdCheckFormat compares sdMailCmd and sdRcptCmd with go-smtp's client.
func sdCheckFormat(t *testing.T, ext []string, from string, mo *smtp.MailOptions, to string, ro *smtp.RcptOptions) {
	t.Helper()
	gm, gr, gerr := sdGoSMTPLines(t, ext, from, mo, to, ro)
	x := sdExtOf(ext)
	m, merr := sdMailCmd(nil, from, mo, x)
	if merr != nil {
		if gerr == nil || gm != "" {
			t.Errorf("MAIL %q %+v: we refuse (%v), go-smtp sent %q (err %v)", from, mo, merr, gm, gerr)
		}
		return
	}
	if string(m) != gm {
		t.Errorf("MAIL %q %+v ext %v:\n ours    %q\n go-smtp %q (err %v)", from, mo, ext, m, gm, gerr)
		return
	}
	r, rerr := sdRcptCmd(nil, to, ro, x)
	if rerr != nil {
		if gerr == nil || gr != "" {
			t.Errorf("RCPT %q %+v: we refuse (%v), go-smtp sent %q", to, ro, rerr, gr)
		}
		return
	}
	if string(r) != gr || gerr != nil {
		t.Errorf("RCPT %q %+v ext %v:\n ours    %q\n go-smtp %q (err %v)", to, ro, ext, r, gr, gerr)
	}
}

var sdFormatExts = [][]string{
	{},
	{"8BITMIME", "SIZE 1000", "DSN", "SMTPUTF8", "REQUIRETLS"},
	{"SIZE", "DSN"},
	{"DSN", "SMTPUTF8"},
	{"8BITMIME", "REQUIRETLS"},
}

func TestSDPipeCmds_FormatAsGoSMTP(t *testing.T) {
	env := sdWireEnv()
	var rcptOpts []*smtp.RcptOptions
	var tos []string
	for _, rc := range env.To {
		rcptOpts = append(rcptOpts, rcptOptions(rc))
		tos = append(tos, rc.Addr)
	}
	rcptOpts = append(rcptOpts,
		&smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever, smtp.DSNNotifySuccess}},
		&smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyFailure}},
		&smtp.RcptOptions{OriginalRecipientType: "x-foo", OriginalRecipient: "a@b"},
		&smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "ü@b"},
		&smtp.RcptOptions{OriginalRecipientType: smtp.DSNAddressTypeUTF8, OriginalRecipient: "\x01 ü=+\xff@b"},
		nil,
	)
	tos = append(tos, "n@x", "f@x", "t@x", "r@x", "u@x", "bad\r\nRSET")
	mailOpts := []*smtp.MailOptions{
		nil,
		{},
		{Size: 12345, Body: smtp.Body8BitMIME, RequireTLS: true, UTF8: true, Return: smtp.DSNReturnHeaders, EnvelopeID: "a+b=c\x7f"},
		{Size: -1, Return: smtp.DSNReturnFull, EnvelopeID: "with space"},
		{Return: "BOGUS"},
		{EnvelopeID: "ünï"},
		{RequireTLS: true},
		{UTF8: true},
	}
	froms := []string{"sender@example.test", "", "sénder@example.test", "bad\rfrom"}
	for _, ext := range sdFormatExts {
		for _, mo := range mailOpts {
			for _, from := range froms {
				for i, ro := range rcptOpts {
					sdCheckFormat(t, ext, from, mo, tos[i], ro)
				}
			}
		}
	}
}

func FuzzSDPipeCmds(f *testing.F) {
	f.Add("s@x", "r@x", "ENV+ID", "rfc822;o@x", uint8(3), int64(100), uint8(0xff), uint8(7))
	f.Add("ü@x", "r\n@x", "", "utf-8;ö @x", uint8(9), int64(0), uint8(0), uint8(1))
	f.Fuzz(func(t *testing.T, from, to, envid, orcpt string, notify uint8, size int64, flags, extBits uint8) {
		mo := &smtp.MailOptions{Size: size, RequireTLS: flags&1 != 0, UTF8: flags&2 != 0, EnvelopeID: envid}
		switch flags >> 2 & 3 {
		case 1:
			mo.Return = smtp.DSNReturnFull
		case 2:
			mo.Return = smtp.DSNReturnHeaders
		}
		ro := rcptOptions(queue.Recipient{Addr: to, Notify: queue.Notify(notify & 0xf), ORCPT: orcpt})
		ext := sdFormatExts[int(extBits)%len(sdFormatExts)]
		sdCheckFormat(t, ext, from, mo, to, ro)
	})
}

// sdWriteCounter counts the writes on the connections it dials.
type sdWriteCounter struct {
	mu     sync.Mutex
	writes int
}

func (wc *sdWriteCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &sdCountingConn{Conn: c, wc: wc}, nil
}

func (wc *sdWriteCounter) n() int { wc.mu.Lock(); defer wc.mu.Unlock(); return wc.writes }

type sdCountingConn struct {
	net.Conn
	wc *sdWriteCounter
}

func (c *sdCountingConn) Write(p []byte) (int, error) {
	c.wc.mu.Lock()
	c.wc.writes++
	c.wc.mu.Unlock()
	return c.Conn.Write(p)
}

func TestSMTPDeliver_Pipelining_OverGoSMTPPeer(t *testing.T) {
	// A transaction with two recipients over a reused connection: MAIL,
	// RCPT, RCPT and DATA in one write, then the body with the final dot
	// in another (2 writes), where go-smtp's lockstep client takes 6.
	// With STARTTLS each write is one TLS record on the TCP connection.
	pki := newSDPKI(t, "mx.example.test")
	for _, tlsOn := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%v", tlsOn), func(t *testing.T) {
			cfg := sdPeerConfig{}
			if tlsOn {
				cfg.TLS = pki.Server
			}
			p := newSDPeer(t, cfg)
			wc := &sdWriteCounter{}
			d := newTestDeliverer(t, SMTPDelivererConfig{Dial: wc.dial, TLSConfig: &tls.Config{RootCAs: pki.Roots}})
			route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
			env := sdEnv("a@example.test", "b@example.test")
			wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, env, []byte(sdBody))), 250, 250)
			before := wc.n()
			res := d.Deliver(t.Context(), sdDelivery(route, env, []byte(sdBody)))
			wantCodes(t, res, 250, 250)
			if (res.TLS.Version != 0) != tlsOn {
				t.Errorf("TLS %+v", res.TLS)
			}
			if n := wc.n() - before; n != 2 {
				t.Errorf("%d writes for a reused transaction, want 2 (pipelined)", n)
			}
			msgs := p.messages()
			if len(msgs) != 2 || string(msgs[1].Body) != sdBody || strings.Join(msgs[1].To, ",") != "a@example.test,b@example.test" {
				t.Errorf("peer messages %+v", msgs)
			}
			if conns, _, _ := p.stats(); conns != 1 {
				t.Errorf("connections = %d", conns)
			}
		})
	}
}

// sdChunkConn serves reads from fixed chunks.
type sdChunkConn struct {
	net.Conn
	chunks []string
}

func (c *sdChunkConn) Read(p []byte) (int, error) {
	if len(c.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, c.chunks[0])
	c.chunks = c.chunks[1:]
	return n, nil
}

func TestSDReadTracker_Drained(t *testing.T) {
	for _, tc := range []struct {
		chunks []string
		want   bool
	}{
		{[]string{"250 ok\r\n"}, true},
		{[]string{"250\r\n"}, true},
		{[]string{"250-a\r\n250-b\r\n", "250 c\r\n"}, true},
		{[]string{"250-a\r\n25", "0 c\r\n"}, true},
		{[]string{"250-a\r\n250 c\r\n"}, true},
		{[]string{"250 a\r\n250 b\r\n"}, false}, // a second reply is buffered
		{[]string{"250 a\r\n250-b\r\n"}, false},
		{[]string{"250 a\r\n25"}, false},
		{[]string{"250-a\r\n"}, false},
		{[]string{"250 a\r\n", "250-b\r\n"}, false},
		{nil, false},
	} {
		tr := &sdReadTracker{Conn: &sdChunkConn{chunks: tc.chunks}}
		buf := make([]byte, 64)
		for range tc.chunks {
			tr.Read(buf)
		}
		if got := tr.drained(); got != tc.want {
			t.Errorf("%q: drained = %v, want %v", tc.chunks, got, tc.want)
		}
	}
}

func TestSMTPDeliver_Pipelining_StageTimeouts(t *testing.T) {
	// Each reply of a pipelined group is bounded by its own stage's
	// timeout: only that one is short here, so the delivery ends with a
	// timeout only if it is the one applied (the context bounds the test
	// otherwise, and its cancellation is not reported as a timeout).
	const short, long = 100 * time.Millisecond, time.Hour
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	rawStall := func(at string) func(t *testing.T) mx.Host {
		return func(t *testing.T) mx.Host {
			return sdHostAt("stall.example.test", sdRawSMTP(t, sdRawSMTPConfig{Ext: []string{"PIPELINING"}, Override: func(_, cmd string) string {
				if strings.HasPrefix(cmd, at) {
					return "stall"
				}
				return ""
			}}))
		}
	}
	for _, tc := range []struct {
		name string
		tm   Timeouts
		host func(t *testing.T) mx.Host
		text string
	}{
		{"RCPT/Command", Timeouts{Command: short}, rawStall("RCPT"), "lost after RCPT: timeout:"},
		{"DATA/DataInit", Timeouts{DataInit: short}, rawStall("DATA"), "lost after DATA: timeout:"},
		{"dot/DataEnd", Timeouts{DataEnd: short}, func(t *testing.T) mx.Host {
			return newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(*sdMsg) error { <-release; return errSDStall }}}).host("stall.example.test")
		}, "(it may be delivered twice): timeout:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tm := Timeouts{Connect: long, Greeting: long, Command: long, DataInit: long, DataBlock: long, DataEnd: long}
			switch {
			case tc.tm.Command != 0:
				tm.Command = tc.tm.Command
			case tc.tm.DataInit != 0:
				tm.DataInit = tc.tm.DataInit
			case tc.tm.DataEnd != 0:
				tm.DataEnd = tc.tm.DataEnd
			}
			d := newTestDeliverer(t, SMTPDelivererConfig{Timeouts: tm})
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			defer cancel()
			start := time.Now()
			res := d.Deliver(ctx, sdDelivery(sdRoute("k", mx.TLSOpportunistic, tc.host(t)), sdEnv("a@example.test"), []byte(sdBody)))
			t.Logf("ended after %v: %v", time.Since(start), res.Replies[0])
			wantCodes(t, res, 451)
			if !strings.Contains(res.Replies[0].Text, tc.text) {
				t.Errorf("reply %v, want %q in it", res.Replies[0], tc.text)
			}
		})
	}
}

func TestSMTPDeliver_Pipelining_IdleSessionClosedByServerWith421(t *testing.T) {
	// The 421 arrives after the final reply (in the same read or later):
	// either the connection is not pooled (bytes left unread) or the
	// next pipelined group reads the 421 as the reply to MAIL, before
	// anything is decided, and the delivery moves to a fresh connection.
	sdIdleSessionClosedWith421(t, []string{"PIPELINING"})
}

func TestSMTPDeliver_Pipelining_MAILRefusedThenStrayReplyDropsConnection(t *testing.T) {
	// A server that sends one reply more than the pipelined group had
	// commands is out of step: after a refused MAIL, as after a
	// delivered message, the connection is not pooled.
	addr, log := sdPipeFirstReplies(t, map[string]string{"MAIL": "550 5.7.1 sender refused", "DATA": "503 5.5.1 no MAIL\r\n250 2.0.0 stray"})
	d, route := sdPipeDest(t, addr)
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 550)
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	if _, _, bodies, conns := log.snapshot(); conns != 2 || len(bodies) != 1 {
		t.Errorf("connections = %d (want 2: the out-of-step one is dropped), bodies %q", conns, bodies)
	}
}
