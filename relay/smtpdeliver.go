package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// Timeouts bound each stage of an outbound SMTP session. Zero fields take
// the defaults given, which follow RFC 5321 §4.5.3.2 except Connect (RFC
// 5321 names none; a dead host should not hold a delivery for minutes
// before the next MX is tried).
type Timeouts struct {
	// Connect bounds the TCP connection (default 30 seconds).
	Connect time.Duration
	// Greeting bounds the wait for the 220 greeting and for the EHLO (or
	// HELO) reply that follows it (default 5 minutes).
	Greeting time.Duration
	// Command bounds every other command's reply: STARTTLS and the TLS
	// handshake, EHLO after TLS, AUTH, MAIL, RCPT, NOOP, RSET, QUIT (default 5
	// minutes).
	Command time.Duration
	// DataInit bounds the wait for the 354 reply to DATA (default 2
	// minutes).
	DataInit time.Duration
	// DataBlock bounds the sending of each block of the body (up to 32
	// KiB; default 3 minutes).
	DataBlock time.Duration
	// DataEnd bounds the wait for the reply after the final dot (default
	// 10 minutes).
	DataEnd time.Duration
}

func (t Timeouts) withDefaults() Timeouts {
	def := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&t.Connect, 30*time.Second)
	def(&t.Greeting, 5*time.Minute)
	def(&t.Command, 5*time.Minute)
	def(&t.DataInit, 2*time.Minute)
	def(&t.DataBlock, 3*time.Minute)
	def(&t.DataEnd, 10*time.Minute)
	return t
}

// SMTPDelivererConfig configures an SMTPDeliverer. The zero value works.
type SMTPDelivererConfig struct {
	// Hostname is the name given in EHLO; default os.Hostname, else
	// "localhost".
	Hostname string
	// Dial opens TCP connections; nil means a net.Dialer. Tests and host
	// programs use it to pick a source address or a proxy.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// TLSConfig is the base for STARTTLS (root CAs, client certificates,
	// minimum version); nil means the system roots. ServerName is set per
	// host, and certificates are verified by the deliverer itself (against
	// RootCAs) so that opportunistic TLS can record whether the
	// certificate was valid. Without a ClientSessionCache, the deliverer
	// keeps one (1024 sessions) so that new connections resume sessions.
	TLSConfig *tls.Config
	// Timeouts bound each stage of a session.
	Timeouts Timeouts
	// MaxMessagesPerConn is how many transactions (messages, delivered
	// or refused) one connection carries before it is closed (default
	// 100; 1 disables reuse).
	MaxMessagesPerConn int
	// IdleTimeout is how long an idle connection is kept for reuse
	// (default 30 seconds; negative disables reuse).
	IdleTimeout time.Duration
	// MaxConns caps open outbound connections in all (default 200). Keep
	// it at or above the relay's Config.Workers: busy connections never
	// outnumber deliveries in progress, so no stream's share of the
	// workers can then hold every connection (idle ones are closed to
	// make room).
	MaxConns int
	// MaxConnsPerDest caps open connections per route key and stream
	// (default 20). Each stream (queue.Envelope.StreamName) has its own
	// connections and its own cap, as each Postfix transport has its own
	// destination concurrency: bulk mail holding every connection to a
	// destination must not keep transactional mail from it.
	MaxConnsPerDest int
	// Logger receives per-connection logs; nil discards them.
	Logger *slog.Logger
}

// SMTPDeliverer is the default Deliverer: an RFC 5321 SMTP client built on
// github.com/emersion/go-smtp, with connection reuse per destination.
//
// For each Delivery it takes an idle connection to the route's destination
// when one fits (probed with NOOP first; a broken one is discarded and the
// delivery goes on over a fresh connection without counting as a failure),
// or else tries the route's hosts in order, and each host's addresses in
// order: connect, greeting, EHLO, STARTTLS as the route's TLS mode and the
// message demand, EHLO again, AUTH for smarthost routes, then MAIL, one
// RCPT per recipient, DATA. A host that cannot be reached, greets with a
// 4xx or 5xx reply, answers 421, or fails the TLS requirement is skipped
// for the next one. When every host fails, each recipient gets the last
// temporary failure (451 4.4.1 for no answer, 4.4.2 for a lost connection,
// 4.7.4 or 4.7.5 for TLS, a 5xx greeting turned into its 4xx form), or,
// when every host failed for a reason that cannot change by retrying, that
// permanent failure (550 5.7.10 for REQUIRETLS, 553 5.6.7 or 554 5.6.9
// for SMTPUTF8).
//
// Replies are per recipient: a RCPT reply decides a rejected recipient; the
// reply after the final dot decides every accepted one. A 421 before MAIL
// was accepted moves on to the next host; later it ends the connection
// and leaves every undecided recipient with it. A connection lost after
// the body was sent is a temporary failure, so the message may arrive
// twice (at-least-once delivery). A reply out of step with the command (a
// 250 to DATA) is treated as a lost connection, never as success.
//
// TLS: TLSOpportunistic uses STARTTLS when offered with any certificate,
// stays in plaintext when it is not offered or refused, and when the
// handshake fails reconnects once to the same address in plaintext.
// TLSRequired needs STARTTLS with any certificate, TLSVerified a
// certificate valid for the host name (mx.Host.Name) under
// TLSConfig.RootCAs; TLSNone never starts TLS. RFC 8689 REQUIRETLS
// messages need verified TLS and a server that advertises REQUIRETLS,
// whatever the route says: a host without STARTTLS, with an invalid
// certificate or without REQUIRETLS is a 5.7.10 policy failure (RFC 8689
// §5), while a handshake that breaks off is temporary. A route in MTA-STS
// testing mode (RFC 8461) is delivered as usual, and a delivery that
// enforce mode would have refused is logged at level Warn.
//
// SMTPUTF8 messages go to servers without SMTPUTF8 only when nothing in
// them needs it (ASCII addresses and header; RFC 6531 §3.2); otherwise the
// failure is 553 5.6.7 for a non-ASCII address and 554 5.6.9 for a
// non-ASCII header (RFC 6533).
//
// Supported: RFC 5321, RFC 3207 STARTTLS, RFC 4954 AUTH (PLAIN, or LOGIN
// when PLAIN is not offered; only over TLS unless the route is TLSNone),
// RFC 1870 SIZE, RFC 6152 8BITMIME (BODY=8BITMIME is sent whenever the
// server offers it; 8-bit bodies to servers without it are sent as they
// are, like sendmail's pass8, and never down-converted), RFC 3461 DSN
// (NOTIFY, ORCPT, RET, ENVID when the server offers DSN), RFC 6531
// SMTPUTF8, RFC 8689 REQUIRETLS, RFC 3463 enhanced status codes, RFC
// 2920 PIPELINING (when the server offers it, MAIL, every RCPT and DATA
// go out in one write and their replies are read in order; otherwise each
// command waits for its reply). Not supported: RFC 3030 CHUNKING
// (go-smtp's client does not offer it to us).
//
// Every network step has a deadline (Timeouts) and Deliver returns as soon
// as ctx is done: the connection in use is closed. An SMTPDeliverer is safe
// for concurrent use; Close it to end its idle connections.
type SMTPDeliverer struct {
	cfg  SMTPDelivererConfig
	log  *slog.Logger
	pool *connPool
	// tlsBase is cfg.TLSConfig (or an empty config) with a session
	// cache, so that new connections to a server resume TLS sessions.
	tlsBase *tls.Config
}

var _ Deliverer = (*SMTPDeliverer)(nil)

// NewSMTPDeliverer returns a deliverer configured by cfg; zero fields take
// their defaults.
func NewSMTPDeliverer(cfg SMTPDelivererConfig) *SMTPDeliverer {
	if cfg.Hostname == "" {
		if h, err := os.Hostname(); err == nil && h != "" {
			cfg.Hostname = h
		} else {
			cfg.Hostname = "localhost"
		}
	}
	if cfg.Dial == nil {
		var nd net.Dialer
		cfg.Dial = nd.DialContext
	}
	cfg.Timeouts = cfg.Timeouts.withDefaults()
	if cfg.MaxMessagesPerConn <= 0 {
		cfg.MaxMessagesPerConn = 100
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 30 * time.Second
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = 200
	}
	if cfg.MaxConnsPerDest <= 0 {
		cfg.MaxConnsPerDest = 20
	}
	if cfg.MaxConnsPerDest > cfg.MaxConns {
		cfg.MaxConnsPerDest = cfg.MaxConns
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	d := &SMTPDeliverer{cfg: cfg, log: log, tlsBase: &tls.Config{}}
	if cfg.TLSConfig != nil {
		d.tlsBase = cfg.TLSConfig.Clone()
	}
	if d.tlsBase.ClientSessionCache == nil {
		d.tlsBase.ClientSessionCache = tls.NewLRUClientSessionCache(1024)
	}
	d.pool = newConnPool(cfg.MaxConns, cfg.MaxConnsPerDest, cfg.IdleTimeout, d.discard)
	return d
}

// Close ends every idle connection (QUIT, then close) and makes later
// deliveries fail temporarily; connections in use are closed when their
// delivery ends. Close waits for the QUITs, each bounded by a few seconds.
// Calling Close again does no harm.
func (d *SMTPDeliverer) Close() error {
	var wg sync.WaitGroup
	for _, it := range d.pool.close() {
		wg.Go(func() {
			it.c.quit(min(quitTimeout, d.cfg.Timeouts.Command))
			d.pool.release(it.key, it.c)
		})
	}
	wg.Wait()
	return nil
}

// SMTPDelivererStats counts an SMTPDeliverer's outbound connections.
type SMTPDelivererStats struct {
	// Open counts connections open now, busy or idle (including those
	// being closed).
	Open int
	// Idle counts connections kept for reuse.
	Idle int
}

// Stats reports the deliverer's connections, for metrics and status
// pages.
func (d *SMTPDeliverer) Stats() SMTPDelivererStats {
	open, idle := d.pool.totals()
	return SMTPDelivererStats{Open: open, Idle: idle}
}

// quitTimeout bounds the polite QUIT sent before closing a connection.
const quitTimeout = 5 * time.Second

// discard closes a connection that is no longer wanted, sending QUIT first
// in the background (bounded by quitTimeout) so that no delivery waits
// for it, and then gives its slot back.
func (d *SMTPDeliverer) discard(key string, c *sdConn) {
	go func() {
		c.quit(min(quitTimeout, d.cfg.Timeouts.Command))
		d.pool.release(key, c)
	}()
}

// sdReq is what one delivery demands of a connection.
type sdReq struct {
	mode       mx.TLSMode
	requireTLS bool
	utf8       bool
	authUser   string
	hosts      map[string]bool
}

// fits reports whether an idle connection may carry a delivery with
// requirement r.
func (r *sdReq) fits(c *sdConn) bool {
	if !r.hosts[c.hostName] || c.authUser != r.authUser {
		return false
	}
	switch r.mode {
	case mx.TLSRequired:
		if c.tls.Version == 0 {
			return false
		}
	case mx.TLSVerified:
		if !c.tls.Verified {
			return false
		}
	}
	if r.requireTLS && !(c.tls.Verified && c.ext.requireTLS) {
		return false
	}
	if r.utf8 && !c.ext.smtputf8 {
		return false
	}
	return true
}

// sdFail is why one host (or address) could not take a transaction.
type sdFail struct {
	reply queue.Reply
	// permanent marks failures that retrying cannot fix (the server
	// lacks REQUIRETLS or SMTPUTF8); they decide the result only when
	// every host failed that way.
	permanent bool
	// plainRetry asks for one more connection to the same address
	// without STARTTLS (opportunistic TLS whose handshake failed).
	plainRetry bool
}

// Deliver implements Deliverer.
func (d *SMTPDeliverer) Deliver(ctx context.Context, del *Delivery) *DeliveryResult {
	res := &DeliveryResult{}
	if del == nil {
		return res
	}
	n := len(del.Rcpts)
	res.Replies = make([]queue.Reply, n)
	if n == 0 {
		return res
	}
	if del.Envelope == nil || del.Route == nil || len(del.Route.Hosts) == 0 || del.Open == nil {
		fillReplies(res.Replies, queue.Reply{Code: 451, Enhanced: "4.4.4", Text: "no route to destination"})
		return res
	}
	route := del.Route
	req := &sdReq{mode: route.TLS, requireTLS: del.Envelope.RequireTLS, hosts: make(map[string]bool)}
	if del.Envelope.SMTPUTF8 {
		req.utf8 = needsSMTPUTF8(ctx, del)
	}
	if req.requireTLS {
		req.mode = mx.TLSVerified
	}
	if route.Auth != nil {
		req.authUser = route.Auth.Username
	}
	for _, h := range route.Hosts {
		req.hosts[h.Name] = true
	}
	if sts := route.MTASTS; sts != nil && sts.Mode == "testing" {
		// RFC 8461 testing mode: deliver as usual, report what enforce
		// mode would have refused.
		defer func() {
			if res.Host != "" && (!res.TLS.Verified || slices.Contains(sts.Mismatched, res.Host)) {
				d.log.Warn("MTA-STS testing: delivery would fail under enforce", "id", string(del.ID), "dest", route.Key, "host", res.Host, "policy", sts.ID, "tls", res.TLS.Version != 0, "verified", res.TLS.Verified)
			}
		}()
	}
	log := d.log.With("id", string(del.ID), "dest", route.Key)

	key := poolKey(del)
	c, err := d.pool.acquire(ctx, key, req.fits)
	if err != nil {
		text := "delivery postponed: " + err.Error()
		if errors.Is(err, errPoolClosed) {
			fillReplies(res.Replies, queue.Reply{Code: 451, Enhanced: "4.3.2", Text: "deliverer shut down"})
		} else {
			fillReplies(res.Replies, queue.Reply{Code: 451, Enhanced: "4.4.5", Text: text})
		}
		return res
	}
	if c != nil {
		// A reused connection: probe it (see reuse); a broken one is
		// replaced by a fresh connection with the same slot.
		c.reused = true
		stop := c.watch(ctx)
		out, ok := d.reuse(ctx, c, del, req, log)
		alive := stop()
		if ok {
			d.finish(key, c, out, alive, res)
			return res
		}
		c.close()
		log.Debug("pooled connection unusable; opening a new one", "host", c.hostName)
	}
	d.deliverFresh(ctx, del, key, req, log, res)
	return res
}

// poolKey is the connection pool's key for a delivery: the route key, and
// the stream for streams other than the default one, so that each stream
// has connections and a per-destination cap of its own.
func poolKey(del *Delivery) string {
	if s := del.Envelope.StreamName(); s != queue.DefaultStream {
		return del.Route.Key + "|stream:" + s
	}
	return del.Route.Key
}

// sdProbeIdle is how long a pooled connection may have been idle before
// it is probed with NOOP ahead of reuse.
const sdProbeIdle = 2 * time.Second

// reuse runs a delivery over an idle connection. ok is false when the
// connection turned out broken before anything was decided.
//
// A connection idle longer than sdProbeIdle is probed with NOOP first,
// so that a server that timed the session out (a 421 waiting in the
// socket, or a closed connection) costs a new connection rather than a
// failed delivery. NOOP rather than
// RSET: connections are only pooled with no transaction open (after the
// reply to the final dot, a refused MAIL, or an explicit RSET), and
// go-smtp's Reset forces a new EHLO before the next command, a round trip
// that cut reuse throughput by about a third in BenchmarkSMTPDeliver.
func (d *SMTPDeliverer) reuse(ctx context.Context, c *sdConn, del *Delivery, req *sdReq, log *slog.Logger) (*sdOutcome, bool) {
	c.client.CommandTimeout = d.cfg.Timeouts.Command
	// A connection that was busy a moment ago is used at once: if it died
	// meanwhile, transact finds out before anything is decided and the
	// delivery moves to a fresh connection. Only longer-idle ones are
	// probed first, saving a round trip per message under load.
	if time.Since(c.idleSince) > sdProbeIdle {
		if err := c.client.Noop(); err != nil {
			return nil, false
		}
	}
	out := d.transact(ctx, c, del, req, log)
	if out.fresh || out.hostFail != nil {
		// Lost, or a 421 to MAIL, before anything was decided: go on
		// over a fresh connection (through the hosts in order).
		return nil, false
	}
	return out, true
}

// deliverFresh opens connections to the route's hosts in order, with the
// slot acquire reserved under key, until one takes the transaction.
func (d *SMTPDeliverer) deliverFresh(ctx context.Context, del *Delivery, key string, req *sdReq, log *slog.Logger, res *DeliveryResult) {
	route := del.Route
	var fails []*sdFail
	record := func(f *sdFail, host string) {
		fails = append(fails, f)
		log.Info("host failed", "host", host, "reply", f.reply.String(), "permanent", f.permanent)
	}
	for _, h := range route.Hosts {
		if h.Name == "" && len(h.Addrs) == 0 {
			continue
		}
		for _, addr := range hostAddrs(h) {
			if ctx.Err() != nil {
				break
			}
			plain := false
			for {
				c, f := d.connect(ctx, route, h, addr, req, plain)
				if f != nil {
					record(f, h.Name)
					if f.plainRetry && !plain {
						plain = true
						continue
					}
					break
				}
				out := d.transact(ctx, c, del, req, log)
				alive := c.stopWatch()
				if out.hostFail != nil {
					c.close()
					record(out.hostFail, h.Name)
					break
				}
				d.finish(key, c, out, alive, res)
				return
			}
		}
	}
	d.pool.release(key, nil)
	fillReplies(res.Replies, allFailed(ctx, fails))
}

// allFailed builds the reply every recipient gets when no host took the
// transaction.
func allFailed(ctx context.Context, fails []*sdFail) queue.Reply {
	if ctx.Err() != nil {
		return queue.Reply{Code: 451, Enhanced: "4.4.7", Text: "delivery abandoned: " + ctx.Err().Error()}
	}
	if len(fails) == 0 {
		return queue.Reply{Code: 451, Enhanced: "4.4.4", Text: "no usable address for destination"}
	}
	for i := len(fails) - 1; i >= 0; i-- {
		if !fails[i].permanent {
			return fails[i].reply
		}
	}
	return fails[len(fails)-1].reply
}

// finish records a transaction's outcome and returns the connection to the
// pool or closes it.
func (d *SMTPDeliverer) finish(key string, c *sdConn, out *sdOutcome, alive bool, res *DeliveryResult) {
	copy(res.Replies, out.replies)
	res.Host = c.hostName
	res.TLS = c.tls
	res.RemoteDSN = c.ext.dsn
	if !alive {
		// ctx ended the connection; anything not decided by a reply is
		// a lost connection.
		for i, r := range res.Replies {
			if r.Code == 0 {
				res.Replies[i] = queue.Reply{Code: 451, Enhanced: "4.4.7", Text: "delivery abandoned (deadline or shutdown)"}
			}
		}
		out.broken = true
	}
	for i, r := range res.Replies {
		if r.Code == 0 {
			// Never leave a recipient without a reply.
			res.Replies[i] = queue.Reply{Code: 451, Enhanced: "4.4.2", Text: "no reply for recipient", Host: c.label()}
		}
	}
	c.uses++
	if out.broken || c.uses >= d.cfg.MaxMessagesPerConn || d.cfg.IdleTimeout < 0 {
		if out.broken {
			c.close()
			d.pool.release(key, c)
		} else {
			d.discard(key, c)
		}
		return
	}
	d.pool.put(key, c)
}

// hostAddrs lists the dial addresses of a host: its resolved addresses,
// or its name when it has none (static routes resolved at dial time).
func hostAddrs(h mx.Host) []string {
	port := h.Port
	if port == 0 {
		port = 25
	}
	p := fmt.Sprint(port)
	if len(h.Addrs) == 0 {
		return []string{net.JoinHostPort(h.Name, p)}
	}
	out := make([]string, 0, len(h.Addrs))
	for _, a := range h.Addrs {
		out = append(out, net.JoinHostPort(a.Unmap().String(), p))
	}
	return out
}

func fillReplies(rs []queue.Reply, r queue.Reply) {
	for i := range rs {
		rs[i] = r
	}
}

// replyFrom turns a server's error reply into a queue.Reply from host.
func replyFrom(e *smtp.SMTPError, host string) queue.Reply {
	r := queue.Reply{Code: e.Code, Text: oneLineText(e.Message), Host: host}
	if e.EnhancedCode != (smtp.EnhancedCode{}) && e.EnhancedCode != smtp.NoEnhancedCode && e.EnhancedCode[0] == e.Code/100 {
		r.Enhanced = fmt.Sprintf("%d.%d.%d", e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2])
	}
	return r
}

// replyOK turns the text of a 250 reply into a queue.Reply, splitting off
// an enhanced code when the text starts with one.
func replyOK(text, host string) queue.Reply {
	r := queue.Reply{Code: 250, Text: oneLineText(text), Host: host}
	if sp := strings.IndexByte(r.Text, ' '); sp > 0 && isEnhanced(r.Text[:sp], '2') {
		r.Enhanced, r.Text = r.Text[:sp], r.Text[sp+1:]
	} else if isEnhanced(r.Text, '2') {
		r.Enhanced, r.Text = r.Text, ""
	}
	return r
}

// isEnhanced reports whether s looks like an RFC 3463 code of class c.
func isEnhanced(s string, c byte) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || len(parts[0]) != 1 || parts[0][0] != c {
		return false
	}
	for _, p := range parts[1:] {
		if p == "" || len(p) > 3 {
			return false
		}
		for i := 0; i < len(p); i++ {
			if p[i] < '0' || p[i] > '9' {
				return false
			}
		}
	}
	return true
}

// temporaryOf turns a remote reply that made a host unusable (a 5xx
// greeting, say) into the temporary local failure recorded when no other
// host does better.
func temporaryOf(r queue.Reply, what string) queue.Reply {
	t := queue.Reply{Code: 451, Enhanced: "4.4.0", Host: r.Host}
	if r.Code/100 == 4 {
		t.Code = r.Code
	}
	if r.Enhanced != "" {
		t.Enhanced = "4" + r.Enhanced[1:]
	}
	orig := fmt.Sprint(r.Code)
	if r.Enhanced != "" {
		orig += " " + r.Enhanced
	}
	t.Text = what + ": " + orig + " " + r.Text
	return t
}

// oneLineText flattens a multi-line reply text and bounds its length, so
// replies stored in the queue and shown in DSNs stay one readable line.
func oneLineText(s string) string {
	s = strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", " ")), " ")
	const max = 512
	if len(s) > max {
		// Cut on a character boundary: the text must stay valid UTF-8.
		n := max
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		s = s[:n]
	}
	return s
}

// errText is an error as reply text: one line, bounded.
func errText(err error) string {
	if errors.Is(err, io.EOF) {
		return "connection closed by peer"
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return "timeout: " + oneLineText(err.Error())
	}
	return oneLineText(err.Error())
}

// maxHeaderScan bounds how much of a message needsSMTPUTF8 reads.
const maxHeaderScan = 256 << 10

// needsSMTPUTF8 reports whether a message declared SMTPUTF8 really needs
// it: a non-ASCII address, or a non-ASCII byte in the header section.
// Otherwise it can go to servers without SMTPUTF8 (RFC 6531 §3.2; Postfix
// calls this smtputf8_autodetect). When the header cannot be read, it
// assumes the message needs SMTPUTF8.
func needsSMTPUTF8(ctx context.Context, del *Delivery) bool {
	if envelopeNonASCII(del.Envelope.From, del.Rcpts) {
		return true
	}
	rc, err := del.Open(ctx)
	if err != nil {
		return true
	}
	defer rc.Close()
	br := bufio.NewReader(io.LimitReader(rc, maxHeaderScan))
	read := 0
	partial := false // inside a line longer than the buffer
	for {
		line, err := br.ReadSlice('\n')
		read += len(line)
		for _, b := range line {
			if b >= 0x80 {
				return true
			}
		}
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			partial = true // a long line: keep scanning it
		case err == nil && !partial && len(bytes.TrimRight(line, "\r\n")) == 0:
			return false // the blank line that ends the header section
		case err == nil:
			partial = false
		case errors.Is(err, io.EOF):
			// A message that is all header is fine; a header longer
			// than the scan is assumed to need SMTPUTF8.
			return read >= maxHeaderScan
		case err != nil:
			return true
		}
	}
}
