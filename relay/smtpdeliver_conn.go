package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/textproto"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// sdExt is what a server advertised in its (last) EHLO reply.
type sdExt struct {
	starttls, requireTLS, smtputf8, dsn, eightBit bool
	pipelining, size                              bool
	auth                                          string
}

// sdConn is one outbound SMTP connection.
type sdConn struct {
	client *smtp.Client
	raw    net.Conn // the TCP connection: deadlines and close
	// wconn is the connection go-smtp's client writes to (raw, or the
	// TLS connection above it): copyBody writes the stuffed body there
	// itself, between the client's DATA and its end of data.
	wconn net.Conn
	// rt watches what go-smtp's client reads; pbr (and ptr over it) reads
	// the replies of pipelined transactions, whose commands are built in
	// pbuf (smtpdeliver_pipe.go).
	rt       *sdReadTracker
	pbr      *bufio.Reader
	ptr      *textproto.Reader
	pbuf     []byte
	hostName string // mx.Host.Name
	addr     string // dialled ip:port
	tls      TLSInfo
	ext      sdExt
	authUser string
	// uses counts transactions over the connection; reused is set once
	// it is taken from the pool.
	uses   int
	reused bool

	// Pool bookkeeping, guarded by the pool's mutex.
	idleSince time.Time
	idleTimer *time.Timer
	evicted   int // evictDest or evictGlobal while being closed to make room

	stopFn    func() bool
	closeOnce sync.Once
}

// label names the connection's peer as "name[ip]" for replies and logs.
func (c *sdConn) label() string {
	ip, _, err := net.SplitHostPort(c.addr)
	if err != nil || ip == c.hostName {
		return c.hostName
	}
	return c.hostName + "[" + ip + "]"
}

// watch closes the connection when ctx is done (go-smtp's client has no
// context) and returns a function that stops watching and reports whether
// the connection is still open.
func (c *sdConn) watch(ctx context.Context) func() bool {
	c.stopFn = context.AfterFunc(ctx, c.close)
	return c.stopWatch
}

// stopWatch ends watch; it reports false when ctx already closed the
// connection.
func (c *sdConn) stopWatch() bool {
	if c.stopFn == nil {
		return true
	}
	ok := c.stopFn()
	c.stopFn = nil
	return ok
}

// close closes the connection at once.
func (c *sdConn) close() {
	c.closeOnce.Do(func() { c.raw.Close() })
}

// quit sends QUIT, waiting at most timeout for the reply, and closes.
func (c *sdConn) quit(timeout time.Duration) {
	if c.client != nil {
		c.client.CommandTimeout = timeout
		c.client.Quit()
	}
	c.close()
}

// sdGreetConn replays a greeting to go-smtp's client after STARTTLS. The
// client has no exported STARTTLS (and NewClientStartTLS closes the
// connection when STARTTLS is not offered), so the deliverer negotiates
// TLS itself and then starts a new client on the TLS connection; that
// client first reads a greeting, which this wrapper supplies.
type sdGreetConn struct {
	net.Conn
	pending []byte
}

func (g *sdGreetConn) Read(p []byte) (int, error) {
	if len(g.pending) > 0 {
		n := copy(p, g.pending)
		g.pending = g.pending[n:]
		return n, nil
	}
	return g.Conn.Read(p)
}

// readExt records the extensions of the last EHLO reply.
func (c *sdConn) readExt() {
	has := func(name string) bool { ok, _ := c.client.Extension(name); return ok }
	c.ext = sdExt{
		starttls:   has("STARTTLS"),
		requireTLS: has("REQUIRETLS"),
		smtputf8:   has("SMTPUTF8"),
		dsn:        has("DSN"),
		eightBit:   has("8BITMIME"),
		pipelining: has("PIPELINING"),
		size:       has("SIZE"),
	}
	if ok, mechs := c.client.Extension("AUTH"); ok {
		c.ext.auth = strings.ToUpper(mechs)
	}
}

// connect opens a session to one address of a host, with TLS and AUTH as
// required, and returns it ready for MAIL, watched by ctx. plain skips
// STARTTLS (the retry after a failed opportunistic handshake).
func (d *SMTPDeliverer) connect(ctx context.Context, route *mx.Route, h mx.Host, addr string, req *sdReq, plain bool) (*sdConn, *sdFail) {
	t := d.cfg.Timeouts
	dctx, cancel := context.WithTimeout(ctx, t.Connect)
	raw, err := d.cfg.Dial(dctx, "tcp", addr)
	cancel()
	c := &sdConn{hostName: h.Name, addr: addr}
	if err != nil {
		return nil, &sdFail{reply: queue.Reply{Code: 451, Enhanced: "4.4.1", Text: "connect to " + c.label() + ": " + errText(err)}}
	}
	c.raw = raw
	c.watch(ctx)
	fail := func(f *sdFail) (*sdConn, *sdFail) {
		c.stopWatch()
		c.close()
		return nil, f
	}
	lost := func(stage string, err error) (*sdConn, *sdFail) {
		return fail(&sdFail{reply: queue.Reply{Code: 451, Enhanced: "4.4.2", Text: "connection to " + c.label() + " lost " + stage + ": " + errText(err)}})
	}

	c.rt = &sdReadTracker{Conn: raw}
	c.client = smtp.NewClient(c.rt)
	c.wconn = raw
	c.client.CommandTimeout = t.Greeting
	if err := c.client.Hello(d.cfg.Hostname); err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return fail(&sdFail{reply: temporaryOf(replyFrom(se, c.label()), "greeting or EHLO refused")})
		}
		return lost("at greeting", err)
	}
	c.readExt()

	mode := req.mode
	wantTLS := mode != mx.TLSNone && !plain
	needTLS := mode == mx.TLSRequired || mode == mx.TLSVerified
	// tlsFail reports a TLS requirement the host did not meet: 4.7.4 when
	// it lacks STARTTLS, 4.7.5 when TLS failed; for REQUIRETLS messages a
	// policy failure (no STARTTLS, an invalid certificate) is 5.7.10.
	tlsFail := func(text, enh string, policy bool) (*sdConn, *sdFail) {
		if req.requireTLS && policy {
			return fail(&sdFail{permanent: true, reply: queue.Reply{Code: 550, Enhanced: "5.7.10", Text: "REQUIRETLS: " + text, Host: c.label()}})
		}
		return fail(&sdFail{reply: queue.Reply{Code: 451, Enhanced: enh, Text: text, Host: c.label()}})
	}
	if wantTLS && !c.ext.starttls && needTLS {
		return tlsFail("STARTTLS not offered by "+c.label(), "4.7.4", true)
	}
	if wantTLS && c.ext.starttls {
		refused, err := d.startTLS(c)
		switch {
		case refused != nil && needTLS:
			return fail(&sdFail{reply: temporaryOf(*refused, "STARTTLS refused")})
		case refused != nil:
			// Opportunistic: carry on in plaintext over the same session,
			// as RFC 3207 allows.
		case err != nil && !needTLS:
			c.stopWatch()
			c.close()
			d.log.Info("opportunistic TLS failed; retrying in plaintext", "host", c.label(), "err", err)
			return nil, &sdFail{plainRetry: true, reply: queue.Reply{Code: 451, Enhanced: "4.7.5", Text: "TLS handshake with " + c.label() + " failed: " + errText(err)}}
		case err != nil:
			return tlsFail("TLS with "+c.label()+" failed: "+errText(err), "4.7.5", false)
		}
	}
	if mode == mx.TLSVerified && !c.tls.Verified {
		text := "no TLS with " + c.label()
		if c.tls.Version != 0 {
			text = "certificate of " + c.label() + " not valid for its name"
		}
		return tlsFail(text, "4.7.5", true)
	}
	if req.requireTLS && !c.ext.requireTLS {
		return fail(&sdFail{permanent: true, reply: queue.Reply{Code: 550, Enhanced: "5.7.10", Text: "REQUIRETLS not supported by " + c.label(), Host: c.label()}})
	}

	if route.Auth != nil {
		if c.tls.Version == 0 && route.TLS != mx.TLSNone {
			return fail(&sdFail{reply: queue.Reply{Code: 451, Enhanced: "4.7.0", Text: "refusing to send credentials to " + c.label() + " without TLS", Host: c.label()}})
		}
		var mech sasl.Client
		switch {
		case hasWord(c.ext.auth, "PLAIN"):
			mech = sasl.NewPlainClient("", route.Auth.Username, route.Auth.Password)
		case hasWord(c.ext.auth, "LOGIN"):
			mech = sasl.NewLoginClient(route.Auth.Username, route.Auth.Password)
		default:
			return fail(&sdFail{reply: queue.Reply{Code: 451, Enhanced: "4.7.0", Text: c.label() + " offers no supported AUTH mechanism", Host: c.label()}})
		}
		c.client.CommandTimeout = t.Command
		if err := c.client.Auth(mech); err != nil {
			var se *smtp.SMTPError
			if errors.As(err, &se) {
				// Credentials are configuration: a refusal is retried (a
				// soft bounce, as Postfix does by default), never bounced.
				return fail(&sdFail{reply: temporaryOf(replyFrom(se, c.label()), "authentication failed")})
			}
			return lost("during AUTH", err)
		}
		c.authUser = route.Auth.Username
	}
	d.log.Debug("connected", "host", c.label(), "tls", c.tls.Version != 0, "verified", c.tls.Verified)
	return c, nil
}

// hasWord reports whether the space-separated list s contains w.
func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// startTLS sends STARTTLS on c's plaintext session, negotiates TLS and
// replaces c's client with one over TLS (after a new EHLO). refused is
// the server's reply when it answered STARTTLS with an error; err is a
// failure of the exchange or the handshake (the connection is then
// unusable).
func (d *SMTPDeliverer) startTLS(c *sdConn) (refused *queue.Reply, err error) {
	t := d.cfg.Timeouts
	c.raw.SetDeadline(time.Now().Add(t.Command))
	if _, err := c.raw.Write([]byte("STARTTLS\r\n")); err != nil {
		return nil, err
	}
	br := bufio.NewReader(c.raw)
	code, msg, err := textproto.NewReader(br).ReadResponse(220)
	if err != nil {
		var pe *textproto.Error
		if errors.As(err, &pe) && (code/100 == 4 || code/100 == 5) {
			r := replyFrom(&smtp.SMTPError{Code: code, Message: msg}, c.label())
			if se := parseReplyText(code, msg); se != nil {
				r = replyFrom(se, c.label())
			}
			c.raw.SetDeadline(time.Time{})
			return &r, nil
		}
		return nil, err
	}
	if br.Buffered() > 0 {
		// Plaintext sent after the 220 would be taken as TLS-protected
		// (the STARTTLS command injection of CVE-2011-0411 in reverse).
		return nil, errors.New("data after STARTTLS reply")
	}
	cfg := d.tlsBase.Clone()
	cfg.ServerName = strings.TrimSuffix(c.hostName, ".")
	// Verification is done below so that opportunistic sessions can
	// record whether the certificate was valid.
	cfg.InsecureSkipVerify = true
	tc := tls.Client(c.raw, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, err
	}
	cs := tc.ConnectionState()
	c.tls = TLSInfo{Version: cs.Version, Verified: verifyPeer(cs, d.cfg.TLSConfig, c.hostName) == nil}
	c.raw.SetDeadline(time.Time{})

	c.rt = &sdReadTracker{Conn: &sdGreetConn{Conn: tc, pending: []byte("220 TLS\r\n")}}
	c.client = smtp.NewClient(c.rt)
	c.wconn = tc
	c.client.CommandTimeout = t.Command
	if err := c.client.Hello(d.cfg.Hostname); err != nil {
		return nil, err
	}
	c.readExt()
	return nil, nil
}

// parseReplyText builds an SMTPError from a reply, splitting off the
// enhanced code (as go-smtp does for the replies it reads itself).
func parseReplyText(code int, msg string) *smtp.SMTPError {
	e := &smtp.SMTPError{Code: code, Message: msg}
	if sp := strings.IndexByte(msg, ' '); sp > 0 && isEnhanced(msg[:sp], byte('0'+code/100)) {
		var a, b, x int
		if _, err := fmt.Sscanf(msg[:sp], "%d.%d.%d", &a, &b, &x); err == nil {
			e.EnhancedCode = smtp.EnhancedCode{a, b, x}
			e.Message = msg[sp+1:]
		}
	}
	return e
}

// verifyPeer verifies the server's certificate chain for name against the
// roots of base (the system roots when base or its RootCAs is nil).
func verifyPeer(cs tls.ConnectionState, base *tls.Config, name string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("no certificate")
	}
	opts := x509.VerifyOptions{DNSName: strings.TrimSuffix(name, "."), Intermediates: x509.NewCertPool()}
	if base != nil {
		opts.Roots = base.RootCAs
		if base.Time != nil {
			opts.CurrentTime = base.Time()
		}
	}
	for _, ic := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(ic)
	}
	_, err := cs.PeerCertificates[0].Verify(opts)
	return err
}

// sdOutcome is what a transaction over one connection decided.
type sdOutcome struct {
	replies []queue.Reply
	// hostFail is set when the host could not take the transaction at
	// all (421 or a lost connection before any recipient was decided,
	// or a missing capability); replies are then empty.
	hostFail *sdFail
	// fresh is set when a reused connection broke before anything was
	// decided: the delivery should go on over a new connection.
	fresh bool
	// broken marks a connection that must not be reused.
	broken bool
}

// settleAccepted gives r to every recipient the server accepted (and, with
// undecided, to those it has not answered yet): the one reply to DATA or
// to the final dot decides them all.
func (o *sdOutcome) settleAccepted(r queue.Reply, undecided bool) {
	for i, rep := range o.replies {
		if rep.Code/100 == 2 || undecided && rep.Code == 0 {
			o.replies[i] = r
		}
	}
}

// transact runs MAIL, RCPT and DATA for del over c: pipelined (RFC 2920,
// transactPipelined) when the server offers it, else through go-smtp's
// client one command at a time.
func (d *SMTPDeliverer) transact(ctx context.Context, c *sdConn, del *Delivery, req *sdReq, log *slog.Logger) *sdOutcome {
	t := d.cfg.Timeouts
	env := del.Envelope
	out := &sdOutcome{replies: make([]queue.Reply, len(del.Rcpts))}
	host := c.label()

	if req.requireTLS && !(c.tls.Verified && c.ext.requireTLS) {
		out.hostFail = &sdFail{permanent: true, reply: queue.Reply{Code: 550, Enhanced: "5.7.10", Text: "REQUIRETLS not supported by " + host, Host: host}}
		return out
	}
	if req.utf8 && !c.ext.smtputf8 {
		r := queue.Reply{Code: 553, Enhanced: "5.6.7", Text: "non-ASCII addresses need SMTPUTF8, which " + host + " does not support", Host: host}
		if !envelopeNonASCII(env.From, del.Rcpts) {
			r = queue.Reply{Code: 554, Enhanced: "5.6.9", Text: "message needs SMTPUTF8, which " + host + " does not support", Host: host}
		}
		out.hostFail = &sdFail{permanent: true, reply: r}
		return out
	}

	tx := &sdTx{out: out, c: c, host: host}
	mo := &smtp.MailOptions{Size: del.Size, RequireTLS: env.RequireTLS, UTF8: env.SMTPUTF8 && c.ext.smtputf8}
	if env.EightBit {
		mo.Body = smtp.Body8BitMIME
	}
	switch env.Ret {
	case queue.RetFull:
		mo.Return = smtp.DSNReturnFull
	case queue.RetHeaders:
		mo.Return = smtp.DSNReturnHeaders
	}
	if isPrintableASCII(env.EnvID) {
		mo.EnvelopeID = env.EnvID
	}
	if c.canPipeline() {
		cmds, err := sdPipeCmds(c.pbuf[:0], env.From, mo, del.Rcpts, c.ext)
		if cap(cmds) <= 16<<10 {
			c.pbuf = cmds[:0]
		}
		if err == nil {
			return d.transactPipelined(ctx, tx, del, cmds, log)
		}
		// Not formattable (a CR or LF in an address, an option go-smtp
		// refuses): go-smtp refuses it below, as before pipelining.
	}
	c.client.CommandTimeout = t.Command
	if err := c.client.Mail(env.From, mo); err != nil {
		return tx.mailRefused(err)
	}
	tx.decided = true

	for i, rc := range del.Rcpts {
		if done := tx.rcpt(i, c.client.Rcpt(rc.Addr, rcptOptions(rc))); done != nil {
			return done
		}
	}
	if tx.accepted == 0 {
		if err := c.client.Reset(); err != nil {
			out.broken = true
		}
		return out
	}

	c.client.CommandTimeout = t.DataInit
	w, err := c.client.Data()
	if err != nil {
		rep, done := tx.refused("after DATA", err)
		if done != nil {
			return done
		}
		out.settleAccepted(rep, false)
		c.client.CommandTimeout = t.Command
		if err := c.client.Reset(); err != nil {
			out.broken = true
		}
		return out
	}

	body, err := del.Open(ctx)
	if err == nil {
		err = d.copyBody(c, body, "")
		body.Close()
	}
	if err != nil {
		return tx.bodyFailed(err, log)
	}

	c.raw.SetWriteDeadline(time.Now().Add(t.DataBlock))
	c.client.SubmissionTimeout = t.DataEnd
	resp, err := w.CloseWithResponse()
	if err != nil {
		return tx.final(queue.Reply{}, err)
	}
	return tx.final(replyOK(resp.StatusText, host), nil)
}

// sdTx is one transaction's outcome in the making: the steps the lockstep
// (transact) and pipelined (transactPipelined) paths share, so that both
// decide every reply the same way.
type sdTx struct {
	out  *sdOutcome
	c    *sdConn
	host string
	// decided is set once MAIL is accepted: from then on a failure
	// settles the recipients instead of trying another connection.
	decided  bool
	accepted int // recipients accepted so far
}

// lost handles a network error: before anything was decided it asks for
// another connection (reused) or host (fresh); afterwards every undecided
// recipient gets a temporary failure.
func (x *sdTx) lost(stage string, err error) *sdOutcome {
	x.out.broken = true
	r := queue.Reply{Code: 451, Enhanced: "4.4.2", Text: "connection to " + x.host + " lost " + stage + ": " + errText(err)}
	switch {
	case x.decided:
		x.out.settleAccepted(r, true)
	case x.c.reused:
		x.out.fresh = true
	default:
		x.out.hostFail = &sdFail{reply: r}
	}
	return x.out
}

// closing handles a 421: the server is closing the connection.
func (x *sdTx) closing(r queue.Reply) *sdOutcome {
	x.out.broken = true
	if !x.decided {
		x.out.hostFail = &sdFail{reply: r}
		return x.out
	}
	x.out.settleAccepted(r, true)
	return x.out
}

// refused sorts the error of a command: a lost connection or a 421 end
// the transaction (done is the outcome to return); any other 4xx or 5xx
// is rep, the reply to record.
func (x *sdTx) refused(stage string, err error) (rep queue.Reply, done *sdOutcome) {
	se := remoteError(err)
	if se == nil {
		return queue.Reply{}, x.lost(stage, err)
	}
	rep = replyFrom(se, x.host)
	if se.Code == 421 {
		return rep, x.closing(rep)
	}
	return rep, nil
}

// mailRefused records a refused MAIL: its reply is every recipient's.
func (x *sdTx) mailRefused(err error) *sdOutcome {
	rep, done := x.refused("after MAIL", err)
	if done != nil {
		return done
	}
	fillReplies(x.out.replies, rep)
	return x.out
}

// rcpt records the result of the i-th RCPT; a non-nil outcome ends the
// transaction.
func (x *sdTx) rcpt(i int, err error) *sdOutcome {
	if err == nil {
		x.out.replies[i] = queue.Reply{Code: 250, Enhanced: "2.1.5", Text: "recipient ok", Host: x.host}
		x.accepted++
		return nil
	}
	se := remoteError(err)
	if se == nil {
		if x.accepted == 0 && i == 0 {
			// Nothing was decided by a reply to a recipient yet.
			x.decided = false
		}
		return x.lost("after RCPT", err)
	}
	rep := replyFrom(se, x.host)
	if se.Code == 421 {
		for j := i; j < len(x.out.replies); j++ {
			x.out.replies[j] = rep
		}
		return x.closing(rep)
	}
	x.out.replies[i] = rep
	return nil
}

// bodyFailed ends a transaction whose body could not be sent: a write
// error is a lost connection (after the final dot, one that may have
// delivered); a read error never sends the final dot (that would deliver
// a truncated message) and drops the connection.
func (x *sdTx) bodyFailed(err error, log *slog.Logger) *sdOutcome {
	x.out.broken = true
	var we *sdWriteError
	if errors.As(err, &we) {
		if we.dot {
			return x.lost("after sending the message (it may be delivered twice)", we.err)
		}
		return x.lost("while sending the message", we.err)
	}
	log.Error("cannot read message body", "err", err)
	x.out.settleAccepted(queue.Reply{Code: 451, Enhanced: "4.3.0", Text: "local error reading the message"}, false)
	return x.out
}

// final records the reply to the final dot: ok when the server accepted
// the message, else the error err.
func (x *sdTx) final(ok queue.Reply, err error) *sdOutcome {
	if err != nil {
		rep, done := x.refused("after sending the message (it may be delivered twice)", err)
		if done != nil {
			return done
		}
		ok = rep
	}
	x.out.settleAccepted(ok, false)
	return x.out
}

// remoteError returns the server's reply when err is a 4xx or 5xx reply.
// Other replies where go-smtp expected a different code (a 250 to DATA, a
// 354 to RCPT) mean the session is out of step: they are treated like a
// lost connection, never as success.
func remoteError(err error) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) && (se.Code/100 == 4 || se.Code/100 == 5) {
		return se
	}
	return nil
}

// sdCopyBufs holds body copy buffers, so a delivery allocates none.
var sdCopyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// sdWriteError marks a failure to send the body (as opposed to reading
// it); dot is set when the failed write carried the end of data, which
// the server may then have received.
type sdWriteError struct {
	err error
	dot bool
}

func (e *sdWriteError) Error() string { return e.err.Error() }
func (e *sdWriteError) Unwrap() error { return e.err }

// sdOutBufs holds the buffers copyBody stuffs a body into.
var sdOutBufs = sync.Pool{New: func() any { b := make([]byte, 0, 36<<10); return &b }}

// copyBody streams the body into the DATA transaction, one deadline per
// block.
//
// go-smtp's DataCommand dot-stuffs through net/textproto's DotWriter one
// byte at a time. copyBody instead stuffs blocks with a dotStuffer, which
// writes the same bytes, and writes them to the connection under the
// client itself: Data has flushed the client's buffer (it read the 354
// reply), and nothing goes through the DataCommand until
// CloseWithResponse, whose untouched DotWriter then ends the data with
// "\r\n.\r\n". The body's own final CRLF (or CR) is held back for that
// (see closeTrim), so the bytes on the wire are exactly those of
// w.Write(body) and w.Close.
//
// A pipelined transaction (which has no DataCommand) passes that end of
// data, "\r\n.\r\n", as end, and it goes out with the last block.
func (d *SMTPDeliverer) copyBody(c *sdConn, body io.Reader, end string) error {
	bp := sdCopyBufs.Get().(*[]byte)
	defer sdCopyBufs.Put(bp)
	op := sdOutBufs.Get().(*[]byte)
	buf, out := *bp, (*op)[:0]
	defer func() {
		// out may have grown: pool what it is now, unless it grew large.
		if cap(out) <= 64<<10 {
			*op = out[:0]
			sdOutBufs.Put(op)
		}
	}()
	var st dotStuffer
	write := func(b []byte, dot bool) error {
		c.raw.SetWriteDeadline(time.Now().Add(d.cfg.Timeouts.DataBlock))
		if _, err := c.wconn.Write(b); err != nil {
			return &sdWriteError{err: err, dot: dot}
		}
		return nil
	}
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			out = st.stuff(out, buf[:n])
			if len(out) >= len(buf) {
				// Keep the last two bytes: they may be the CRLF the end
				// of data writes again.
				k := len(out) - 2
				if err := write(out[:k], false); err != nil {
					return err
				}
				out = append(out[:0], out[k:]...)
			}
		}
		if rerr != nil {
			if !errors.Is(rerr, io.EOF) {
				return rerr
			}
			out = append(out[:len(out)-st.closeTrim()], end...)
			if len(out) > 0 {
				return write(out, end != "")
			}
			return nil
		}
	}
}

// rcptOptions carries a recipient's RFC 3461 parameters; go-smtp sends
// them only to servers that advertise DSN.
func rcptOptions(rc queue.Recipient) *smtp.RcptOptions {
	o := &smtp.RcptOptions{}
	switch {
	case rc.Notify&queue.NotifyNever != 0:
		o.Notify = []smtp.DSNNotify{smtp.DSNNotifyNever}
	case rc.Notify != 0:
		if rc.Notify&queue.NotifySuccess != 0 {
			o.Notify = append(o.Notify, smtp.DSNNotifySuccess)
		}
		if rc.Notify&queue.NotifyFailure != 0 {
			o.Notify = append(o.Notify, smtp.DSNNotifyFailure)
		}
		if rc.Notify&queue.NotifyDelay != 0 {
			o.Notify = append(o.Notify, smtp.DSNNotifyDelayed)
		}
	}
	if typ, addr, ok := strings.Cut(rc.ORCPT, ";"); ok && addr != "" {
		switch strings.ToLower(typ) {
		case "rfc822":
			if isPrintableASCII(addr) {
				o.OriginalRecipientType, o.OriginalRecipient = smtp.DSNAddressTypeRFC822, addr
			}
		case "utf-8":
			o.OriginalRecipientType, o.OriginalRecipient = smtp.DSNAddressTypeUTF8, addr
		}
	}
	return o
}

// isPrintableASCII reports whether s is non-empty printable ASCII (what
// ENVID and an rfc822 ORCPT may hold before xtext encoding).
func isPrintableASCII(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x21 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// envelopeNonASCII reports whether the sender or a recipient address has
// non-ASCII characters.
func envelopeNonASCII(from string, rcpts []queue.Recipient) bool {
	if !isASCII(from) {
		return true
	}
	for _, r := range rcpts {
		if !isASCII(r.Addr) {
			return true
		}
	}
	return false
}
