package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

const sdBody = "From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: test\r\n\r\nHello.\r\n"

// newTestDeliverer returns a deliverer for tests, closed at cleanup.
func newTestDeliverer(t testing.TB, cfg SMTPDelivererConfig) *SMTPDeliverer {
	if cfg.Hostname == "" {
		cfg.Hostname = "relay.example.test"
	}
	d := NewSMTPDeliverer(cfg)
	t.Cleanup(func() { d.Close() })
	return d
}

func wantCodes(t *testing.T, res *DeliveryResult, codes ...int) {
	t.Helper()
	if len(res.Replies) != len(codes) {
		t.Fatalf("got %d replies, want %d: %v", len(res.Replies), len(codes), res.Replies)
	}
	for i, c := range codes {
		if res.Replies[i].Code != c {
			t.Errorf("reply %d = %v, want code %d", i, res.Replies[i], c)
		}
	}
}

func wantEnhanced(t *testing.T, res *DeliveryResult, enh string) {
	t.Helper()
	for i, r := range res.Replies {
		if r.Enhanced != enh {
			t.Errorf("reply %d = %v, want enhanced %s", i, r, enh)
		}
	}
}

func TestSMTPDeliver_Delivers(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	env := sdEnv("a@example.test", "b@example.test")
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("mx:example.test", mx.TLSOpportunistic, p.host("mx.example.test")), env, []byte(sdBody)))
	wantCodes(t, res, 250, 250)
	if res.Host != "mx.example.test" || res.TLS.Version != 0 {
		t.Errorf("host %q tls %+v", res.Host, res.TLS)
	}
	if res.Replies[0].Host != "mx.example.test[127.0.0.1]" {
		t.Errorf("reply host %q", res.Replies[0].Host)
	}
	msgs := p.messages()
	if len(msgs) != 1 {
		t.Fatalf("peer got %d messages", len(msgs))
	}
	m := msgs[0]
	if m.From != "sender@example.test" || strings.Join(m.To, ",") != "a@example.test,b@example.test" {
		t.Errorf("envelope %q %q", m.From, m.To)
	}
	if string(m.Body) != sdBody {
		t.Errorf("body %q", m.Body)
	}
	if m.MailOpts.Size != int64(len(sdBody)) {
		t.Errorf("SIZE %d", m.MailOpts.Size)
	}
}

func TestSMTPDeliver_BodyByteForByte(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{MaxLineLength: 4000})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	var b bytes.Buffer
	b.WriteString("Subject: bytes\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
	b.WriteString(".leading dot\r\n..two dots\r\n.\r\n")
	b.WriteString(strings.Repeat("x", 3998) + "\r\n") // the longest line the peer accepts
	for i := range 200_000 {
		c := byte(i*7 + 1)
		if c == '\r' || c == '\n' {
			c = 0xe9
		}
		b.WriteByte(c)
		if i%900 == 899 {
			b.WriteString("\r\n")
		}
	}
	b.WriteString("\r\n")
	body := b.Bytes()
	env := sdEnv("a@example.test")
	env.EightBit = true
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), env, body))
	wantCodes(t, res, 250)
	msgs := p.messages()
	if len(msgs) != 1 || !bytes.Equal(msgs[0].Body, body) {
		t.Fatalf("body differs (%d messages)", len(msgs))
	}
	if msgs[0].MailOpts.Body != smtp.Body8BitMIME {
		t.Errorf("BODY=%q", msgs[0].MailOpts.Body)
	}
}

func TestSMTPDeliver_Reuse_CountsConnections(t *testing.T) {
	for _, tc := range []struct {
		name    string
		cfg     SMTPDelivererConfig
		n, want int
	}{
		{"reuse", SMTPDelivererConfig{}, 20, 1},
		{"cap5", SMTPDelivererConfig{MaxMessagesPerConn: 5}, 20, 4},
		{"disabled", SMTPDelivererConfig{IdleTimeout: -1}, 6, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newSDPeer(t, sdPeerConfig{})
			d := newTestDeliverer(t, tc.cfg)
			route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
			for i := range tc.n {
				res := d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody)))
				wantCodes(t, res, 250)
			}
			conns, _, _ := p.stats()
			if conns != tc.want {
				t.Errorf("%d messages used %d connections, want %d", tc.n, conns, tc.want)
			}
			if got := len(p.messages()); got != tc.n {
				t.Errorf("peer got %d messages", got)
			}
		})
	}
}

func TestSMTPDeliver_Reuse_BrokenPooledConnectionReplaced(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	p.dropAll()
	p.waitOpen(t, 0)
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("b@example.test"), []byte(sdBody))), 250)
	if conns, _, _ := p.stats(); conns != 2 {
		t.Errorf("connections = %d, want 2", conns)
	}
}

func TestSMTPDeliver_Reuse_ConnectionLostAtMAILRetriedOnFreshConnection(t *testing.T) {
	var mu sync.Mutex
	conns := 0
	a := sdRawSMTP(t, sdRawSMTPConfig{
		OnConnect: func() { mu.Lock(); conns++; mu.Unlock() },
		// The connection dies at the MAIL of its second transaction.
		Drop: func(prev, cmd string) bool { return strings.HasPrefix(cmd, "MAIL") && !strings.HasPrefix(prev, "EHLO") },
	})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, sdHostAt("raw.example.test", a))
	for i := range 3 {
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody))), 250)
	}
	mu.Lock()
	defer mu.Unlock()
	if conns != 3 {
		t.Errorf("connections = %d, want 3", conns)
	}
}

func TestSMTPDeliver_Reuse_421AtMAILRetriedOnFreshConnection(t *testing.T) {
	var mu sync.Mutex
	conns := 0
	a := sdRawSMTP(t, sdRawSMTPConfig{
		OnConnect: func() { mu.Lock(); conns++; mu.Unlock() },
		Override: func(prev, cmd string) string {
			// A second transaction on one connection (MAIL not right
			// after EHLO): the server has given up on the session.
			if strings.HasPrefix(cmd, "MAIL") && !strings.HasPrefix(prev, "EHLO") {
				return "421 4.4.2 session expired"
			}
			return ""
		},
	})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, sdHostAt("raw.example.test", a))
	for i := range 2 {
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody))), 250)
	}
	mu.Lock()
	defer mu.Unlock()
	if conns != 2 {
		t.Errorf("connections = %d, want 2", conns)
	}
}

func TestSMTPDeliver_Reuse_AfterRefusedMAIL(t *testing.T) {
	refuse := true
	var mu sync.Mutex
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Mail: func(string, *smtp.MailOptions) error {
		mu.Lock()
		defer mu.Unlock()
		if refuse {
			refuse = false
			return sdErr(550, [3]int{5, 7, 1}, "sender refused")
		}
		return nil
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 550)
	p.dropAll()
	p.waitOpen(t, 0)
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	if conns, _, _ := p.stats(); conns != 2 {
		t.Errorf("connections = %d, want 2", conns)
	}
}

func TestSMTPDeliver_Reuse_IdleTimeoutClosesConnection(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{IdleTimeout: 50 * time.Millisecond})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	p.waitOpen(t, 0) // the idle connection is closed by the deliverer
	sdWaitPoolEmpty(t, d)
}

func TestSMTPDeliver_Reuse_OnlyWhenTLSFits(t *testing.T) {
	pki := newSDPKI(t, "mx.example.test")
	p := newSDPeer(t, sdPeerConfig{TLS: pki.Server})
	d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: &tls.Config{RootCAs: pki.Roots}})
	// The certificate does not match "other.example.test": opportunistic
	// TLS takes it unverified and pools the connection.
	h := p.host("other.example.test")
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, h), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250)
	if res.TLS.Version == 0 || res.TLS.Verified {
		t.Fatalf("TLS %+v, want unverified TLS", res.TLS)
	}
	// Same destination, now requiring verification: the pooled
	// connection must not be used, and a new one fails verification.
	res = d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSVerified, h), sdEnv("b@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
	wantEnhanced(t, res, "4.7.5")
	if conns, _, _ := p.stats(); conns != 2 {
		t.Errorf("connections = %d, want 2", conns)
	}
	if n := len(p.messages()); n != 1 {
		t.Errorf("peer got %d messages, want 1", n)
	}
}

// sdGate holds deliveries inside the peer's DATA until want of them are
// there at once, so a test can observe the highest concurrency reached.
type sdGate struct {
	mu      sync.Mutex
	in      int
	want    int
	release chan struct{}
	once    sync.Once
}

func (g *sdGate) enter() {
	g.mu.Lock()
	g.in++
	if g.in >= g.want {
		g.once.Do(func() { close(g.release) })
	}
	g.mu.Unlock()
	<-g.release
}

func TestSMTPDeliver_PerDestinationCap(t *testing.T) {
	const limit, n = 3, 24
	gate := &sdGate{want: limit, release: make(chan struct{})}
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(*sdMsg) error { gate.enter(); return nil }}})
	d := newTestDeliverer(t, SMTPDelivererConfig{MaxConnsPerDest: limit})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	var wg sync.WaitGroup
	results := make([]*DeliveryResult, n)
	for i := range n {
		wg.Go(func() {
			results[i] = d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody)))
		})
	}
	wg.Wait()
	for _, r := range results {
		wantCodes(t, r, 250)
	}
	conns, maxOpen, _ := p.stats()
	if maxOpen != limit {
		t.Errorf("at most %d connections open at once, want %d", maxOpen, limit)
	}
	if conns > limit {
		t.Errorf("%d connections for %d messages, want at most %d (reuse)", conns, n, limit)
	}
}

func TestSMTPDeliver_GlobalCapEvictsIdle(t *testing.T) {
	pa := newSDPeer(t, sdPeerConfig{})
	pb := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{MaxConns: 1})
	ra := sdRoute("a", mx.TLSOpportunistic, pa.host("mx.a.example.test"))
	rb := sdRoute("b", mx.TLSOpportunistic, pb.host("mx.b.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(ra, sdEnv("x@a.example.test"), []byte(sdBody))), 250)
	if pa.openConns() != 1 {
		t.Fatalf("destination a should hold an idle connection")
	}
	if st := d.Stats(); st.Open != 1 || st.Idle != 1 {
		t.Errorf("Stats = %+v, want one open idle connection", st)
	}
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(rb, sdEnv("x@b.example.test"), []byte(sdBody))), 250)
	pa.waitOpen(t, 0) // evicted to make room for b
	if all, _, _ := d.pool.counts("b"); all != 1 {
		t.Errorf("pool counts %d connections, want 1", all)
	}
}

func TestSMTPDeliver_GlobalCapWaitHonoursContext(t *testing.T) {
	gate := make(chan struct{})
	t.Cleanup(func() { close(gate) })
	entered := make(chan struct{}, 1)
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(*sdMsg) error {
		entered <- struct{}{}
		<-gate
		return nil
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{MaxConns: 1, Timeouts: Timeouts{DataEnd: time.Minute}})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	go d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody)))
	<-entered
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	res := d.Deliver(ctx, sdDelivery(route, sdEnv("b@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
	if conns, _, _ := p.stats(); conns != 1 {
		t.Errorf("connections = %d, want 1", conns)
	}
}

// sdGreeter answers every connection with a fixed greeting line and closes
// after the first command.
func sdGreeter(t *testing.T, greeting string) mx.Host {
	a := sdRawPeer(t, func(c net.Conn) {
		fmt.Fprintf(c, "%s\r\n", greeting)
		bufio.NewReader(c).ReadString('\n')
	})
	return sdHostAt("greeter.example.test", a)
}

func TestSMTPDeliver_NextHost(t *testing.T) {
	for _, tc := range []struct {
		name  string
		first func(t *testing.T) mx.Host
	}{
		{"refused", func(t *testing.T) mx.Host { return sdHostAt("down.example.test", sdClosedPort(t)) }},
		{"closes", func(t *testing.T) mx.Host {
			return sdHostAt("closer.example.test", sdRawPeer(t, func(net.Conn) {}))
		}},
		{"greeting421", func(t *testing.T) mx.Host { return sdGreeter(t, "421 4.3.2 busy") }},
		{"greeting450", func(t *testing.T) mx.Host { return sdGreeter(t, "450 4.7.1 try later") }},
		{"greeting554", func(t *testing.T) mx.Host { return sdGreeter(t, "554 5.7.1 no service") }},
		{"ehlo421", func(t *testing.T) mx.Host {
			return sdHostAt("ehlo.example.test", sdRawPeer(t, func(c net.Conn) {
				fmt.Fprintf(c, "220 hi\r\n")
				br := bufio.NewReader(c)
				br.ReadString('\n')
				fmt.Fprintf(c, "421 4.3.0 going down\r\n")
			}))
		}},
		{"mail421", func(t *testing.T) mx.Host {
			p := newSDPeer(t, sdPeerConfig{Script: sdScript{Mail: func(string, *smtp.MailOptions) error {
				return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "bye"}
			}}})
			return p.host("mail421.example.test")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			good := newSDPeer(t, sdPeerConfig{})
			d := newTestDeliverer(t, SMTPDelivererConfig{})
			route := sdRoute("k", mx.TLSOpportunistic, tc.first(t), good.host("good.example.test"))
			res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(sdBody)))
			wantCodes(t, res, 250, 250)
			if res.Host != "good.example.test" {
				t.Errorf("delivered by %q", res.Host)
			}
			if len(good.messages()) != 1 {
				t.Errorf("good host got %d messages", len(good.messages()))
			}
		})
	}
}

func TestSMTPDeliver_NextAddressOfHost(t *testing.T) {
	good := newSDPeer(t, sdPeerConfig{})
	dead := sdClosedPort(t)
	// Both addresses use port 25 as a real MX would; Dial maps them to
	// the loopback test ports: the first refuses, the second answers.
	d := newTestDeliverer(t, SMTPDelivererConfig{Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		switch addr {
		case "127.0.0.2:25":
			addr = dead.String()
		case "127.0.0.1:25":
			addr = good.Addr.String()
		default:
			return nil, fmt.Errorf("unexpected address %s", addr)
		}
		var nd net.Dialer
		return nd.DialContext(ctx, network, addr)
	}})
	h := mx.Host{Name: "mx.example.test", Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.2"), netip.MustParseAddr("127.0.0.1")}}
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, h), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250)
	if r := res.Replies[0]; r.Host != "mx.example.test[127.0.0.1]" {
		t.Errorf("reply host %q", r.Host)
	}
}

func TestSMTPDeliver_AllHostsFail_Temporary(t *testing.T) {
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic,
		sdHostAt("a.example.test", sdClosedPort(t)),
		sdGreeter(t, "554 5.7.1 go away"))
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "b@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451, 451)
	if !strings.Contains(res.Replies[0].Text, "554 5.7.1 go away") {
		t.Errorf("reply %v should carry the last host's answer", res.Replies[0])
	}
	if res.Replies[0].Enhanced != "4.7.1" {
		t.Errorf("enhanced %q, want the temporary form 4.7.1", res.Replies[0].Enhanced)
	}
	route = sdRoute("k2", mx.TLSOpportunistic, sdHostAt("a.example.test", sdClosedPort(t)))
	res = d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
	wantEnhanced(t, res, "4.4.1")
	if res.Host != "" {
		t.Errorf("host %q for a failed delivery", res.Host)
	}
}

func TestSMTPDeliver_NoRoute(t *testing.T) {
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	res := d.Deliver(t.Context(), sdDelivery(&mx.Route{Key: "k"}, sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
}

func sdErr(code int, enh [3]int, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: smtp.EnhancedCode(enh), Message: msg}
}

func TestSMTPDeliver_MixedRecipients(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Rcpt: func(to string, _ *smtp.RcptOptions) error {
		switch {
		case strings.HasPrefix(to, "later"):
			return sdErr(450, [3]int{4, 2, 1}, "mailbox busy")
		case strings.HasPrefix(to, "nobody"):
			return sdErr(550, [3]int{5, 1, 1}, "no such user")
		}
		return nil
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test", "later@example.test", "nobody@example.test", "ok2@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250, 450, 550, 250)
	if r := res.Replies[2]; r.Enhanced != "5.1.1" || r.Text != "no such user" {
		t.Errorf("reply %+v", r)
	}
	msgs := p.messages()
	if len(msgs) != 1 || strings.Join(msgs[0].To, ",") != "ok@example.test,ok2@example.test" {
		t.Fatalf("peer got %d messages: %+v", len(msgs), msgs)
	}
}

func TestSMTPDeliver_NoRecipientAccepted_NoData(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Rcpt: func(to string, _ *smtp.RcptOptions) error {
		if strings.HasPrefix(to, "ok") {
			return nil
		}
		return sdErr(550, [3]int{5, 1, 1}, "no such user")
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("x@example.test", "y@example.test"), []byte(sdBody))), 550, 550)
	if n := len(p.messages()); n != 0 {
		t.Fatalf("peer got %d messages", n)
	}
	// The connection stays usable for the next message.
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test"), []byte(sdBody))), 250)
	if conns, _, _ := p.stats(); conns != 1 {
		t.Errorf("connections = %d, want 1", conns)
	}
}

func TestSMTPDeliver_421AtRcpt(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Rcpt: func(to string, _ *smtp.RcptOptions) error {
		switch {
		case strings.HasPrefix(to, "nobody"):
			return sdErr(550, [3]int{5, 1, 1}, "no such user")
		case strings.HasPrefix(to, "stop"):
			return sdErr(421, [3]int{4, 4, 5}, "too busy, closing")
		}
		return nil
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test", "nobody@example.test", "stop@example.test", "after@example.test"), []byte(sdBody)))
	wantCodes(t, res, 421, 550, 421, 421)
	if n := len(p.messages()); n != 0 {
		t.Fatalf("peer got %d messages", n)
	}
	// The connection was not pooled.
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("ok@example.test"), []byte(sdBody))), 250)
	if conns, _, _ := p.stats(); conns != 2 {
		t.Errorf("connections = %d, want 2", conns)
	}
}

func TestSMTPDeliver_ReplyAfterData(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  *smtp.SMTPError
		want int
	}{
		{"permanent", sdErr(554, [3]int{5, 6, 0}, "content rejected"), 554},
		{"temporary", sdErr(451, [3]int{4, 3, 0}, "try again"), 451},
		{"closing", sdErr(421, [3]int{4, 3, 2}, "shutting down"), 421},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newSDPeer(t, sdPeerConfig{Script: sdScript{
				Rcpt: func(to string, _ *smtp.RcptOptions) error {
					if strings.HasPrefix(to, "nobody") {
						return sdErr(550, [3]int{5, 1, 1}, "no such user")
					}
					return nil
				},
				Data: func(*sdMsg) error { return tc.err },
			}})
			d := newTestDeliverer(t, SMTPDelivererConfig{})
			route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
			res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test", "nobody@example.test", "b@example.test"), []byte(sdBody)))
			wantCodes(t, res, tc.want, 550, tc.want)
			if r := res.Replies[0]; r.Text != tc.err.Message {
				t.Errorf("reply %+v", r)
			}
		})
	}
}

func TestSMTPDeliver_MailRejected(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{Script: sdScript{Mail: func(string, *smtp.MailOptions) error {
		return sdErr(553, [3]int{5, 7, 1}, "sender rejected")
	}}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), sdEnv("a@example.test", "b@example.test"), []byte(sdBody)))
	wantCodes(t, res, 553, 553)
	wantEnhanced(t, res, "5.7.1")
}

func TestSMTPDeliver_Timeouts(t *testing.T) {
	short := Timeouts{Connect: time.Second, Greeting: 100 * time.Millisecond, Command: 100 * time.Millisecond,
		DataInit: 100 * time.Millisecond, DataBlock: 100 * time.Millisecond, DataEnd: 100 * time.Millisecond}
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	stall := func() error { <-release; return errSDStall }
	for _, tc := range []struct {
		name string
		host func(t *testing.T) mx.Host
		env  *queue.Envelope
		// size, when set, streams a body of that many bytes instead of
		// sdBody (more than the socket buffers hold).
		size int64
		text string
	}{
		{"greeting", func(t *testing.T) mx.Host {
			return sdHostAt("stall.example.test", sdRawPeer(t, func(c net.Conn) { io.Copy(io.Discard, c) }))
		}, nil, 0, "timeout"},
		{"afterMAIL", func(t *testing.T) mx.Host {
			return newSDPeer(t, sdPeerConfig{Script: sdScript{Mail: func(string, *smtp.MailOptions) error { return stall() }}}).host("stall.example.test")
		}, nil, 0, "timeout"},
		{"afterRCPT", func(t *testing.T) mx.Host {
			return newSDPeer(t, sdPeerConfig{Script: sdScript{Rcpt: func(string, *smtp.RcptOptions) error { return stall() }}}).host("stall.example.test")
		}, nil, 0, "timeout"},
		{"duringDATA", func(t *testing.T) mx.Host {
			// The peer stops reading the body: the client's writes block.
			return newSDPeer(t, sdPeerConfig{Script: sdScript{DataRaw: func(io.Reader) error { return stall() }}}).host("stall.example.test")
		}, nil, 32 << 20, "timeout"},
		{"afterDATA", func(t *testing.T) mx.Host {
			return sdHostAt("stall.example.test", sdRawSMTP(t, sdRawSMTPConfig{Override: func(_, cmd string) string {
				if cmd == "DATA" {
					return "stall"
				}
				return ""
			}}))
		}, nil, 0, "timeout"},
		{"afterDot", func(t *testing.T) mx.Host {
			return newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(*sdMsg) error { return stall() }}}).host("stall.example.test")
		}, nil, 0, "delivered twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newTestDeliverer(t, SMTPDelivererConfig{Timeouts: short})
			del := sdDelivery(sdRoute("k", mx.TLSOpportunistic, tc.host(t)), sdEnv("a@example.test"), []byte(sdBody))
			if tc.size > 0 {
				line := []byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n")
				del.Size = tc.size
				del.Open = func(context.Context) (io.ReadCloser, error) {
					return io.NopCloser(io.LimitReader(&sdRepeatReader{line: line}, tc.size)), nil
				}
			}
			res := d.Deliver(t.Context(), del)
			wantCodes(t, res, 451)
			wantEnhanced(t, res, "4.4.2")
			if !strings.Contains(res.Replies[0].Text, tc.text) {
				t.Errorf("reply %v, want %q in it", res.Replies[0], tc.text)
			}
		})
	}
}

func TestSMTPDeliver_ContextCancelEndsDelivery(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	entered := make(chan struct{}, 4)
	for _, tc := range []struct {
		name string
		host func(t *testing.T) mx.Host
	}{
		{"greeting", func(t *testing.T) mx.Host {
			return sdHostAt("stall.example.test", sdRawPeer(t, func(c net.Conn) { entered <- struct{}{}; io.Copy(io.Discard, c) }))
		}},
		{"afterDot", func(t *testing.T) mx.Host {
			return newSDPeer(t, sdPeerConfig{Script: sdScript{Data: func(*sdMsg) error { entered <- struct{}{}; <-release; return errSDStall }}}).host("stall.example.test")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Default timeouts (minutes): only ctx can end this delivery.
			d := newTestDeliverer(t, SMTPDelivererConfig{})
			ctx, cancel := context.WithCancel(t.Context())
			go func() { <-entered; cancel() }()
			res := d.Deliver(ctx, sdDelivery(sdRoute("k", mx.TLSOpportunistic, tc.host(t)), sdEnv("a@example.test"), []byte(sdBody)))
			wantCodes(t, res, 451)
			if all, _, _ := d.pool.counts("k"); all != 0 {
				t.Errorf("pool still counts %d connections", all)
			}
		})
	}
}

func TestSMTPDeliver_STARTTLS(t *testing.T) {
	pki := newSDPKI(t, "mx.example.test")
	clientTLS := &tls.Config{RootCAs: pki.Roots}
	for _, tc := range []struct {
		name       string
		serverTLS  bool
		hostName   string
		mode       mx.TLSMode
		code       int
		enhanced   string
		tls        bool
		verified   bool
		peerSawTLS bool
	}{
		{"opportunistic/offered", true, "mx.example.test", mx.TLSOpportunistic, 250, "", true, true, true},
		{"opportunistic/wrongName", true, "other.example.test", mx.TLSOpportunistic, 250, "", true, false, true},
		{"opportunistic/absent", false, "mx.example.test", mx.TLSOpportunistic, 250, "", false, false, false},
		{"none/offered", true, "mx.example.test", mx.TLSNone, 250, "", false, false, false},
		{"required/offered", true, "other.example.test", mx.TLSRequired, 250, "", true, false, true},
		{"required/absent", false, "mx.example.test", mx.TLSRequired, 451, "4.7.4", false, false, false},
		{"verified/ok", true, "mx.example.test", mx.TLSVerified, 250, "", true, true, true},
		{"verified/wrongName", true, "other.example.test", mx.TLSVerified, 451, "4.7.5", false, false, false},
		{"verified/absent", false, "mx.example.test", mx.TLSVerified, 451, "4.7.4", false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := sdPeerConfig{}
			if tc.serverTLS {
				cfg.TLS = pki.Server
			}
			p := newSDPeer(t, cfg)
			d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: clientTLS})
			res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", tc.mode, p.host(tc.hostName)), sdEnv("a@example.test"), []byte(sdBody)))
			wantCodes(t, res, tc.code)
			if tc.enhanced != "" {
				wantEnhanced(t, res, tc.enhanced)
			}
			if (res.TLS.Version != 0) != tc.tls || res.TLS.Verified != tc.verified {
				t.Errorf("TLS %+v, want tls=%v verified=%v", res.TLS, tc.tls, tc.verified)
			}
			msgs := p.messages()
			if tc.code == 250 {
				if len(msgs) != 1 || msgs[0].TLS != tc.peerSawTLS {
					t.Errorf("peer messages %+v", msgs)
				}
			} else if len(msgs) != 0 {
				t.Errorf("peer got %d messages", len(msgs))
			}
		})
	}
}

func TestSMTPDeliver_STARTTLS_SessionsResumedAcrossConnections(t *testing.T) {
	pki := newSDPKI(t, "mx.example.test")
	p := newSDPeer(t, sdPeerConfig{TLS: pki.Server})
	d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: &tls.Config{RootCAs: pki.Roots}, IdleTimeout: -1})
	route := sdRoute("k", mx.TLSVerified, p.host("mx.example.test"))
	for i := range 3 {
		res := d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody)))
		wantCodes(t, res, 250)
		if !res.TLS.Verified {
			t.Errorf("delivery %d: TLS %+v, want verified (resumed sessions too)", i, res.TLS)
		}
	}
	msgs := p.messages()
	if len(msgs) != 3 || msgs[0].Resumed || !msgs[1].Resumed || !msgs[2].Resumed {
		t.Errorf("want a full handshake, then resumed sessions: %+v", msgs)
	}
}

func TestSMTPDeliver_STARTTLS_HandshakeFailureFallsBackToPlaintext(t *testing.T) {
	pki := newSDPKI(t, "mx.example.test")
	srv := pki.Server.Clone()
	srv.MinVersion = tls.VersionTLS13
	p := newSDPeer(t, sdPeerConfig{TLS: srv})
	d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: &tls.Config{RootCAs: pki.Roots, MaxVersion: tls.VersionTLS12}})
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250)
	if res.TLS.Version != 0 {
		t.Errorf("TLS %+v, want plaintext", res.TLS)
	}
	if conns, _, _ := p.stats(); conns != 2 {
		t.Errorf("connections = %d, want 2 (TLS, then plaintext)", conns)
	}
	// Required TLS does not fall back.
	res = d.Deliver(t.Context(), sdDelivery(sdRoute("k2", mx.TLSRequired, p.host("mx.example.test")), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
	wantEnhanced(t, res, "4.7.5")
}

func TestSMTPDeliver_STARTTLSRefusedOpportunisticContinuesPlain(t *testing.T) {
	a := sdRawSMTP(t, sdRawSMTPConfig{Ext: []string{"STARTTLS", "8BITMIME"}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, sdHostAt("raw.example.test", a)), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 250)
	if r := res.Replies[0]; r.Enhanced != "2.0.0" || r.Text != "queued as 42" {
		t.Errorf("reply %+v", r)
	}
	res = d.Deliver(t.Context(), sdDelivery(sdRoute("k2", mx.TLSRequired, sdHostAt("raw.example.test", a)), sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 454)
}

func TestSMTPDeliver_Reuse_IdleSessionClosedByServerWith421(t *testing.T) {
	sdIdleSessionClosedWith421(t, nil)
}

// sdIdleSessionClosedWith421 delivers three messages to a server
// advertising ext that times the session out with a 421 right after each
// message, and checks that each is delivered, over a connection of its
// own.
func sdIdleSessionClosedWith421(t *testing.T, ext []string) {
	var mu sync.Mutex
	conns := 0
	a := sdRawSMTP(t, sdRawSMTPConfig{
		Ext:       ext,
		OnConnect: func() { mu.Lock(); conns++; mu.Unlock() },
		// After each message the server times the session out at once,
		// as a busy MX does with idle clients.
		AfterData: func(c net.Conn) bool { fmt.Fprintf(c, "421 4.4.2 idle timeout\r\n"); return false },
	})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	route := sdRoute("k", mx.TLSOpportunistic, sdHostAt("raw.example.test", a))
	for i := range 3 {
		res := d.Deliver(t.Context(), sdDelivery(route, sdEnv(fmt.Sprintf("r%d@example.test", i)), []byte(sdBody)))
		wantCodes(t, res, 250)
	}
	mu.Lock()
	defer mu.Unlock()
	if conns != 3 {
		t.Errorf("connections = %d, want 3", conns)
	}
}

func TestSMTPDeliver_RequireTLS(t *testing.T) {
	pki := newSDPKI(t, "mx.example.test")
	for _, tc := range []struct {
		name      string
		serverTLS bool
		advertise bool
		hostName  string
		routeMode mx.TLSMode
		code      int
	}{
		{"plaintext", false, true, "mx.example.test", mx.TLSOpportunistic, 550},
		{"routeNone", false, true, "mx.example.test", mx.TLSNone, 550},
		{"unverified", true, true, "other.example.test", mx.TLSOpportunistic, 550},
		{"notAdvertised", true, false, "mx.example.test", mx.TLSOpportunistic, 550},
		{"ok", true, true, "mx.example.test", mx.TLSOpportunistic, 250},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := sdPeerConfig{REQUIRETLS: tc.advertise}
			if tc.serverTLS {
				cfg.TLS = pki.Server
			}
			p := newSDPeer(t, cfg)
			d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: &tls.Config{RootCAs: pki.Roots}})
			env := sdEnv("a@example.test")
			env.RequireTLS = true
			res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", tc.routeMode, p.host(tc.hostName)), env, []byte(sdBody)))
			wantCodes(t, res, tc.code)
			msgs := p.messages()
			if tc.code == 250 {
				if len(msgs) != 1 || !msgs[0].MailOpts.RequireTLS || !msgs[0].TLS {
					t.Errorf("peer messages %+v", msgs)
				}
				return
			}
			wantEnhanced(t, res, "5.7.10")
			if len(msgs) != 0 {
				t.Errorf("peer got %d messages", len(msgs))
			}
		})
	}
}

func TestSMTPDeliver_RequireTLS_TemporaryWhenAnotherHostFailedTemporarily(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	env := sdEnv("a@example.test")
	env.RequireTLS = true
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"), sdHostAt("down.example.test", sdClosedPort(t)))
	res := d.Deliver(t.Context(), sdDelivery(route, env, []byte(sdBody)))
	wantCodes(t, res, 451)
}

func TestSMTPDeliver_SMTPUTF8(t *testing.T) {
	utf8Header := "From: Jöran <sender@example.test>\r\nSubject: grüße\r\n\r\nhi\r\n"
	asciiHeader8BitBody := "From: sender@example.test\r\nSubject: x\r\n\r\ngrüße\r\n"
	for _, tc := range []struct {
		name      string
		advertise bool
		rcpt      string
		body      string
		code      int
		enhanced  string
		utf8Param bool
	}{
		{"notSupported/nonASCIIAddress", false, "jöran@example.test", sdBody, 553, "5.6.7", false},
		{"notSupported/nonASCIIHeader", false, "a@example.test", utf8Header, 554, "5.6.9", false},
		// Declared SMTPUTF8 but nothing needs it: delivered without it.
		{"notSupported/notNeeded", false, "a@example.test", asciiHeader8BitBody, 250, "", false},
		{"supported", true, "jöran@example.test", utf8Header, 250, "", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newSDPeer(t, sdPeerConfig{SMTPUTF8: tc.advertise})
			d := newTestDeliverer(t, SMTPDelivererConfig{})
			env := sdEnv(tc.rcpt)
			env.SMTPUTF8 = true
			res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), env, []byte(tc.body)))
			wantCodes(t, res, tc.code)
			if tc.enhanced != "" {
				wantEnhanced(t, res, tc.enhanced)
			}
			msgs := p.messages()
			if tc.code == 250 {
				if len(msgs) != 1 || msgs[0].MailOpts.UTF8 != tc.utf8Param || msgs[0].To[0] != tc.rcpt || string(msgs[0].Body) != tc.body {
					t.Errorf("peer messages %+v", msgs)
				}
			} else if len(msgs) != 0 {
				t.Errorf("peer got %d messages", len(msgs))
			}
		})
	}
}

func TestNeedsSMTPUTF8_HeaderScan(t *testing.T) {
	long := "X-Long: " + strings.Repeat("a", 5000) + "\r\n"
	for _, tc := range []struct {
		name, body string
		want       bool
	}{
		{"ascii", "Subject: x\r\n\r\nbödy\r\n", false},
		{"utf8Header", "Subject: ü\r\n\r\nbody\r\n", true},
		{"headerOnly", "Subject: x\r\n", false},
		{"longLineThenUTF8", long + "Subject: ü\r\n\r\n", true},
		{"longLineEndingAtBuffer", "X: " + strings.Repeat("a", 4096-5) + "\r\nSubject: ü\r\n\r\n", true},
		{"tooLongToScan", "X: " + strings.Repeat("a\r\n ", maxHeaderScan/4), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			del := sdDelivery(nil, sdEnv("a@example.test"), []byte(tc.body))
			if got := needsSMTPUTF8(t.Context(), del); got != tc.want {
				t.Errorf("needsSMTPUTF8 = %v, want %v", got, tc.want)
			}
		})
	}
}

func TestSMTPDeliver_8BitToServerWithout8BITMIME(t *testing.T) {
	var mu sync.Mutex
	var mail string
	a := sdRawSMTP(t, sdRawSMTPConfig{OnCommand: func(line string) {
		if strings.HasPrefix(line, "MAIL") {
			mu.Lock()
			mail = line
			mu.Unlock()
		}
	}})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	env := sdEnv("a@example.test")
	env.EightBit = true
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, sdHostAt("raw.example.test", a)), env, []byte("Subject: x\r\n\r\ngrüße\r\n")))
	wantCodes(t, res, 250)
	mu.Lock()
	defer mu.Unlock()
	if mail != "MAIL FROM:<sender@example.test> SIZE=26" && mail != "MAIL FROM:<sender@example.test>" {
		t.Errorf("MAIL line %q: BODY=8BITMIME sent to a server without 8BITMIME", mail)
	}
}

func TestSMTPDeliver_SizeExceeded(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{MaxMessageBytes: 100})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	res := d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), sdEnv("a@example.test"), sdBenchBody(5<<10)))
	wantCodes(t, res, 552)
}

func TestSMTPDeliver_MTASTSTestingReported(t *testing.T) {
	var logs bytes.Buffer
	var mu sync.Mutex
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{Logger: slog.New(slog.NewTextHandler(&sdLockedWriter{mu: &mu, w: &logs}, nil))})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	route.MTASTS = &mx.MTASTSStatus{Mode: "testing", ID: "20260101"}
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(logs.String(), "MTA-STS testing") || !strings.Contains(logs.String(), "policy=20260101") {
		t.Errorf("no MTA-STS testing report in logs:\n%s", logs.String())
	}
}

type sdLockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *sdLockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

func TestSMTPDeliver_DSNParameters(t *testing.T) {
	env := sdEnv("a@example.test", "b@example.test", "c@example.test")
	env.Ret = queue.RetHeaders
	env.EnvID = "QQ314159"
	env.To[0].Notify = queue.NotifySuccess | queue.NotifyFailure
	env.To[0].ORCPT = "rfc822;Original+Rcpt@example.test"
	env.To[1].Notify = queue.NotifyNever

	t.Run("offered", func(t *testing.T) {
		p := newSDPeer(t, sdPeerConfig{DSN: true})
		d := newTestDeliverer(t, SMTPDelivererConfig{})
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), env, []byte(sdBody))), 250, 250, 250)
		m := p.messages()[0]
		if m.MailOpts.Return != smtp.DSNReturnHeaders || m.MailOpts.EnvelopeID != "QQ314159" {
			t.Errorf("MAIL options %+v", m.MailOpts)
		}
		o := m.RcptOpts[0]
		if fmt.Sprint(o.Notify) != "[SUCCESS FAILURE]" || o.OriginalRecipientType != smtp.DSNAddressTypeRFC822 || o.OriginalRecipient != "Original+Rcpt@example.test" {
			t.Errorf("RCPT 0 options %+v", o)
		}
		if fmt.Sprint(m.RcptOpts[1].Notify) != "[NEVER]" {
			t.Errorf("RCPT 1 options %+v", m.RcptOpts[1])
		}
		if len(m.RcptOpts[2].Notify) != 0 || m.RcptOpts[2].OriginalRecipient != "" {
			t.Errorf("RCPT 2 options %+v", m.RcptOpts[2])
		}
	})
	t.Run("notOffered", func(t *testing.T) {
		p := newSDPeer(t, sdPeerConfig{})
		d := newTestDeliverer(t, SMTPDelivererConfig{})
		wantCodes(t, d.Deliver(t.Context(), sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), env, []byte(sdBody))), 250, 250, 250)
		m := p.messages()[0]
		if m.MailOpts.Return != "" || m.MailOpts.EnvelopeID != "" || len(m.RcptOpts[0].Notify) != 0 {
			t.Errorf("DSN parameters sent to a server without DSN: %+v %+v", m.MailOpts, m.RcptOpts[0])
		}
	})
}

func TestSMTPDeliver_SmarthostAuth(t *testing.T) {
	pki := newSDPKI(t, "smarthost.example.test")
	users := map[string]string{"relay": "s3cret"}
	clientTLS := &tls.Config{RootCAs: pki.Roots}
	for _, tc := range []struct {
		name      string
		serverTLS bool
		insecure  bool
		mode      mx.TLSMode
		password  string
		code      int
		authed    bool
	}{
		{"tls", true, false, mx.TLSOpportunistic, "s3cret", 250, true},
		{"wrongPassword", true, false, mx.TLSOpportunistic, "nope", 454, false},
		{"plaintextRefused", false, true, mx.TLSOpportunistic, "s3cret", 451, false},
		{"plaintextWhenRouteIsNone", false, true, mx.TLSNone, "s3cret", 250, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := sdPeerConfig{Users: users, InsecureAuth: tc.insecure}
			if tc.serverTLS {
				cfg.TLS = pki.Server
			}
			p := newSDPeer(t, cfg)
			d := newTestDeliverer(t, SMTPDelivererConfig{TLSConfig: clientTLS})
			route := sdRoute("route:smarthost", tc.mode, p.host("smarthost.example.test"))
			route.Auth = &mx.Credentials{Username: "relay", Password: tc.password}
			res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody)))
			if tc.code == 454 {
				// A refused login is retried, never bounced.
				if res.Replies[0].Code/100 != 4 {
					t.Errorf("reply %v, want a temporary failure", res.Replies[0])
				}
			} else {
				wantCodes(t, res, tc.code)
			}
			msgs := p.messages()
			if tc.authed {
				if len(msgs) != 1 || msgs[0].AuthUser != "relay" {
					t.Errorf("peer messages %+v", msgs)
				}
			} else if len(msgs) != 0 {
				t.Errorf("peer got %d messages", len(msgs))
			}
		})
	}
}

func TestSMTPDeliver_BodyReadErrorNeverSendsDot(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := newTestDeliverer(t, SMTPDelivererConfig{})
	del := sdDelivery(sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test")), sdEnv("a@example.test"), nil)
	del.Open = func(context.Context) (io.ReadCloser, error) {
		return io.NopCloser(io.MultiReader(strings.NewReader("Subject: half\r\n\r\n"), sdFailingReader{})), nil
	}
	res := d.Deliver(t.Context(), del)
	wantCodes(t, res, 451)
	wantEnhanced(t, res, "4.3.0")
	if strings.Contains(res.Replies[0].Text, "disk") {
		t.Errorf("reply %v carries the internal error", res.Replies[0])
	}
	p.waitOpen(t, 0)
	if n := len(p.messages()); n != 0 {
		t.Fatalf("a truncated message was delivered")
	}
}

type sdFailingReader struct{}

func (sdFailingReader) Read([]byte) (int, error) { return 0, fmt.Errorf("disk on fire") }

func TestSMTPDeliver_CloseQuitsIdleAndRefusesNewDeliveries(t *testing.T) {
	p := newSDPeer(t, sdPeerConfig{})
	d := NewSMTPDeliverer(SMTPDelivererConfig{Hostname: "relay.example.test"})
	route := sdRoute("k", mx.TLSOpportunistic, p.host("mx.example.test"))
	wantCodes(t, d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody))), 250)
	if p.openConns() != 1 {
		t.Fatalf("no idle connection kept")
	}
	d.Close()
	p.waitOpen(t, 0)
	res := d.Deliver(t.Context(), sdDelivery(route, sdEnv("a@example.test"), []byte(sdBody)))
	wantCodes(t, res, 451)
}

// sdRepeatReader repeats line forever.
type sdRepeatReader struct {
	line []byte
	off  int
}

func (r *sdRepeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		c := copy(p[n:], r.line[r.off:])
		n += c
		r.off = (r.off + c) % len(r.line)
	}
	return n, nil
}

// sdDialCounter wraps dialled connections to count those open at once on
// the client side.
type sdDialCounter struct {
	mu        sync.Mutex
	open, max int
}

func (dc *sdDialCounter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var nd net.Dialer
	c, err := nd.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	dc.mu.Lock()
	dc.open++
	dc.max = max(dc.max, dc.open)
	dc.mu.Unlock()
	return &sdCountedClientConn{Conn: c, dc: dc}, nil
}

type sdCountedClientConn struct {
	net.Conn
	dc   *sdDialCounter
	once sync.Once
}

func (c *sdCountedClientConn) Close() error {
	c.once.Do(func() {
		c.dc.mu.Lock()
		c.dc.open--
		c.dc.mu.Unlock()
	})
	return c.Conn.Close()
}

func TestSMTPDeliver_ConcurrentDestinationsRespectCaps(t *testing.T) {
	const perDest, global, n = 2, 4, 90
	rcpt := func(to string, _ *smtp.RcptOptions) error {
		if strings.HasPrefix(to, "nobody") {
			return sdErr(550, [3]int{5, 1, 1}, "no such user")
		}
		return nil
	}
	var peers []*sdPeer
	var routes []*mx.Route
	for i := range 3 {
		p := newSDPeer(t, sdPeerConfig{Script: sdScript{Rcpt: rcpt}})
		peers = append(peers, p)
		routes = append(routes, sdRoute(fmt.Sprintf("mx:d%d.example.test", i), mx.TLSOpportunistic, p.host(fmt.Sprintf("mx.d%d.example.test", i))))
	}
	dc := &sdDialCounter{}
	d := newTestDeliverer(t, SMTPDelivererConfig{MaxConns: global, MaxConnsPerDest: perDest, Dial: dc.dial})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			env := sdEnv(fmt.Sprintf("r%d@example.test", i), fmt.Sprintf("nobody%d@example.test", i))
			res := d.Deliver(t.Context(), sdDelivery(routes[i%3], env, []byte(sdBody)))
			wantCodes(t, res, 250, 550)
		})
	}
	wg.Wait()
	dc.mu.Lock()
	if dc.max > global {
		t.Errorf("%d connections open at once, cap %d", dc.max, global)
	}
	dc.mu.Unlock()
	total := 0
	for _, p := range peers {
		_, maxOpen, _ := p.stats()
		if maxOpen > perDest {
			t.Errorf("a destination saw %d connections at once, cap %d", maxOpen, perDest)
		}
		total += len(p.messages())
	}
	if total != n {
		t.Errorf("peers got %d messages, want %d", total, n)
	}
	if all, _, _ := d.pool.counts(""); all > global {
		t.Errorf("pool counts %d open connections", all)
	}
}

// sdWaitPoolEmpty waits until the deliverer counts no open connection.
func sdWaitPoolEmpty(t *testing.T, d *SMTPDeliverer) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		d.pool.mu.Lock()
		open, wake := d.pool.open, d.pool.wake
		d.pool.mu.Unlock()
		if open == 0 {
			return
		}
		select {
		case <-wake:
		case <-timeout:
			t.Fatalf("pool still counts %d connections", open)
		}
	}
}

// A reply text cut to its bound stays valid UTF-8: a multi-byte character
// that would straddle the bound is left out whole (the text is stored in
// the queue and shown in DSNs).
func TestOneLineTextCutsOnRuneBoundary(t *testing.T) {
	long := strings.Repeat("a", 511) + "é and more"
	got := oneLineText(long)
	if !utf8.ValidString(got) {
		t.Fatalf("oneLineText cut inside a character: ends with %q", got[len(got)-3:])
	}
	if got != strings.Repeat("a", 511) {
		t.Fatalf("oneLineText = ...%q (%d bytes); want the 511 a's", got[len(got)-3:], len(got))
	}
	if short := oneLineText("550 5.1.1 ünknown\r\n user"); short != "550 5.1.1 ünknown user" {
		t.Fatalf("oneLineText(short) = %q", short)
	}
}
