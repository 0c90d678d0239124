package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
)

// wire is one client connection, between the network and go-smtp.
//
// go-smtp reads commands and message bodies from a net.Conn and writes its
// replies to it; wire is that net.Conn (through a wireView). It owns the
// TCP connection and, once negotiated, the TLS layer above it, and it
// watches both directions of the dialogue:
//
//   - Every read from the network refreshes an idle deadline, so a slow
//     client is cut off after IdleTimeout of silence, in commands and in
//     the middle of a message body alike, and any failed read in a body
//     closes the connection (go-smtp would otherwise read the rest of the
//     body as commands).
//   - It hands go-smtp at most one line per Read while go-smtp expects a
//     command, so go-smtp never buffers bytes wire has not looked at. Which
//     kind of read go-smtp is doing follows from what it wrote last: a
//     command line is expected after a reply, body lines after 354, a SASL
//     response after 334, and exactly the announced number of chunk bytes
//     after a BDAT command whose size parses, whether or not go-smtp
//     replied first (it answers a refused BDAT, then discards the chunk).
//     Body lines are checked for bare CR and LF as they arrive, before
//     go-smtp's dot-unstuffing, which swallows some of them. (A DATA
//     body the session reads through wireData, see startData, bypasses
//     go-smtp's reader and these per-line reads altogether.)
//   - It answers some commands itself before go-smtp sees them: STARTTLS
//     (so that TLS sits below wire and the later commands are visible too;
//     the go-smtp session is then replaced by a fresh one, as RFC 3207
//     §4.2 requires), MAIL and RCPT with malformed addresses (RFC 5321
//     §4.1.2 syntax, checked strictly), and floods of commands that make
//     no progress. It rewrites "RCPT TO:<postmaster>", which go-smtp
//     refuses, to the configured postmaster address (RFC 5321 §4.5.1).
//   - It adds the STARTTLS and REQUIRETLS keywords to the EHLO reply when
//     they apply (go-smtp cannot know that wire is encrypted) and the
//     SIZE limit (go-smtp has none, see NewServer), never lets a CR
//     inside a reply line (go-smtp echoes unknown commands), and closes
//     the connection after any 421 reply.
type wire struct {
	srv    *Server
	raw    net.Conn // the TCP connection
	addr   netip.Addr
	remote string
	id     string // connection ID for logs

	// client is the policy view of this connection; it lives as long as
	// the connection (policy.Client keeps per-connection counters) and is
	// updated by sessions under policyMu.
	policyMu  sync.Mutex
	client    policy.Client
	connected bool // the policy's Connect was called
	gone      bool // the connection was forgotten
	// allowed is the allow-list identity found at connect, or nil.
	allowed *auth.Identity

	// Fields below are used by the goroutine of the current go-smtp
	// connection only (the one calling Read and Write).
	conn      net.Conn // raw, or the *tls.Conn above it
	tlsState  *tls.ConnectionState
	br        *bufio.Reader
	out       []byte // bytes of the current line not yet handed to go-smtp
	mode      readMode
	wrote     bool   // go-smtp wrote a reply since the last command line
	lastCode  string // code of the last complete reply line go-smtp wrote
	verb      string // verb of the last command line handed to go-smtp
	chunkLeft int64  // BDAT bytes go-smtp still has to read
	readErr   error  // a body read error to report on the next Read
	bodyCR    bool   // the last body byte was CR
	// bare is set when a DATA body holds a bare CR or LF. It is checked
	// on the raw lines because go-smtp's dot-unstuffing swallows some of
	// them (".\rX" becomes "X"); the session reads it at end of data.
	bare     atomic.Bool
	wbuf     []byte // partial reply line from go-smtp
	obuf     []byte // reply lines ready to send, written at once
	esmtp    bool   // the client greeted with EHLO
	greeting bool   // swallow the next 220 greeting (after STARTTLS)
	view     *wireView

	mu         sync.Mutex // guards the fields below, shared with Shutdown
	waitingCmd bool       // blocked reading a command line
	closed     bool
	junk       int // commands without progress
}

type readMode int

const (
	modeCommand readMode = iota
	modeBody
	modeChunk
	modeSASL
)

// errShutdownRead makes a blocked command read return during Shutdown.
var errShutdownRead = errors.New("relay: server shutting down")

// maxCommandLine bounds one command line (RFC 5321 §4.5.3.1.4 says 512
// octets; AUTH responses and ESMTP parameters make real lines longer).
const maxCommandLine = 4096

func newWire(srv *Server, raw net.Conn, id string) *wire {
	w := &wire{srv: srv, raw: raw, conn: raw, id: id, remote: raw.RemoteAddr().String()}
	if ap, err := netip.ParseAddrPort(w.remote); err == nil {
		w.addr = ap.Addr().Unmap()
	}
	w.br = bufio.NewReaderSize(idleReader{w}, maxCommandLine)
	w.view = &wireView{w: w}
	return w
}

// idleReader reads from the current connection with a fresh idle
// deadline for every read.
type idleReader struct{ w *wire }

func (r idleReader) Read(p []byte) (int, error) {
	w := r.w
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return 0, net.ErrClosed
	}
	if w.waitingCmd && w.srv.shuttingDown() {
		w.mu.Unlock()
		return 0, errShutdownRead
	}
	w.raw.SetReadDeadline(time.Now().Add(w.srv.cfg.IdleTimeout))
	w.mu.Unlock()
	return w.conn.Read(p)
}

// interruptIfIdle makes a command read that is blocked waiting for the
// client return at once. Shutdown calls it after setting its flag.
func (w *wire) interruptIfIdle() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.waitingCmd && !w.closed {
		w.raw.SetReadDeadline(time.Now())
	}
}

func (w *wire) setWaiting(v bool) {
	w.mu.Lock()
	w.waitingCmd = v
	w.mu.Unlock()
}

// progress records that a message was accepted: the count of commands
// without progress starts again.
func (w *wire) progress() {
	w.mu.Lock()
	w.junk = 0
	w.mu.Unlock()
}

func (w *wire) addJunk() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.junk++
	return w.junk
}

// close closes the connection once and forgets it.
func (w *wire) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.mu.Unlock()
	w.raw.Close()
	w.srv.forget(w)
}

// isClosed reports whether close was called.
func (w *wire) isClosed() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.closed
}

// say writes one reply line of wire's own, with a write deadline.
func (w *wire) say(line string) error {
	if code, ok := replyCode(line); ok {
		w.srv.metrics.ServerReply(code)
	}
	w.raw.SetWriteDeadline(time.Now().Add(w.srv.cfg.IdleTimeout))
	_, err := io.WriteString(w.conn, line+"\r\n")
	return err
}

// abort sends a last reply line (if any) and closes the connection.
func (w *wire) abort(line string) {
	if w.isClosed() {
		return
	}
	if line != "" {
		w.say(line)
	}
	w.close()
}

// read is wireView.Read: what go-smtp reads.
func (w *wire) read(p []byte) (int, error) {
	if len(w.out) > 0 {
		n := copy(p, w.out)
		w.out = w.out[n:]
		return n, nil
	}
	if w.wrote && !(w.mode == modeChunk && w.chunkLeft > 0) {
		// (go-smtp answers a refused BDAT before it reads and discards
		// the chunk: the chunk is still owed.)
		w.wrote = false
		switch w.lastCode {
		case "354":
			w.mode = modeBody
			w.bare.Store(false)
			w.bodyCR = false
		case "334":
			w.mode = modeSASL
		default:
			w.mode = modeCommand
		}
	}
	switch w.mode {
	case modeChunk:
		if w.chunkLeft <= 0 {
			w.mode = modeCommand
			return w.readCommand(p)
		}
		if int64(len(p)) > w.chunkLeft {
			p = p[:w.chunkLeft]
		}
		n, err := w.br.Read(p)
		w.chunkLeft -= int64(n)
		if err != nil {
			return n, w.bodyReadFailed(err)
		}
		return n, nil
	case modeBody, modeSASL:
		if err := w.readErr; err != nil {
			w.readErr = nil
			return 0, w.bodyReadFailed(err)
		}
		// A client owing a SASL response is as idle as one owing a
		// command: Shutdown may interrupt it.
		w.setWaiting(w.mode == modeSASL)
		line, err := w.br.ReadSlice('\n')
		w.setWaiting(false)
		if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) == 0 {
				return 0, w.bodyReadFailed(err)
			}
			w.readErr = err // after the bytes read so far
		}
		// A line longer than the buffer goes in pieces; go-smtp's line
		// length limit deals with it.
		if w.mode == modeBody && !w.bare.Load() {
			w.checkBare(line)
		}
		return w.deliver(p, line), nil
	}
	return w.readCommand(p)
}

// checkBare looks for a CR not followed by LF or an LF not preceded by CR.
func (w *wire) checkBare(b []byte) {
	for _, c := range b {
		if w.bodyCR != (c == '\n') {
			w.bare.Store(true)
			return
		}
		w.bodyCR = c == '\r'
	}
}

// deliver copies line to p, keeping what does not fit for the next Read.
func (w *wire) deliver(p, line []byte) int {
	n := copy(p, line)
	if n < len(line) {
		w.out = append(w.out[:0], line[n:]...)
	}
	return n
}

// bodyReadFailed handles a failed read while go-smtp reads a message or a
// SASL response: the connection is closed, whatever the error, so that
// nothing left of the body can be taken for commands.
func (w *wire) bodyReadFailed(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		w.abort("")
	case errors.Is(err, errShutdownRead) || w.srv.shuttingDown() && errors.As(err, &ne) && ne.Timeout():
		w.abort("421 4.3.2 " + w.srv.cfg.Hostname + " Service shutting down, closing connection")
	case errors.As(err, &ne) && ne.Timeout():
		w.abort("421 4.4.2 " + w.srv.cfg.Hostname + " Idle timeout, closing connection")
		w.srv.log.Info("smtp idle timeout in message", "conn", w.id, "client", w.remote)
	default:
		w.abort("421 4.4.0 " + w.srv.cfg.Hostname + " Connection error, closing connection")
	}
	return net.ErrClosed
}

// readCommand reads command lines until one is for go-smtp, answering
// the others itself.
func (w *wire) readCommand(p []byte) (int, error) {
	for {
		if max := w.srv.cfg.MaxJunkCommands; max > 0 && w.junkCount() >= max {
			w.srv.log.Info("smtp command flood", "conn", w.id, "client", w.remote)
			w.srv.metrics.Refused(StageCommand, RefusedCommandFlood)
			w.abort("421 4.7.0 " + w.srv.cfg.Hostname + " Too many commands without progress, closing connection")
			return 0, net.ErrClosed
		}
		w.setWaiting(true)
		line, err := w.br.ReadSlice('\n')
		w.setWaiting(false)
		if err != nil {
			return 0, w.commandReadFailed(line, err)
		}
		fwd, reply := w.filter(line)
		if reply != "" {
			w.addJunk()
			if err := w.say(reply); err != nil {
				w.abort("")
				return 0, net.ErrClosed
			}
			continue
		}
		if fwd == nil {
			// STARTTLS happened: this go-smtp connection ends here and a
			// fresh one takes over (or the connection is gone).
			return 0, io.EOF
		}
		return w.deliver(p, fwd), nil
	}
}

func (w *wire) junkCount() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.junk
}

func (w *wire) commandReadFailed(partial []byte, err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, bufio.ErrBufferFull):
		w.abort("500 5.5.2 " + w.srv.cfg.Hostname + " Line too long, closing connection")
	case errors.Is(err, errShutdownRead) || (w.srv.shuttingDown() && errors.As(err, &ne) && ne.Timeout()):
		w.abort("421 4.3.2 " + w.srv.cfg.Hostname + " Service shutting down, closing connection")
	case errors.As(err, &ne) && ne.Timeout():
		w.srv.log.Info("smtp idle timeout", "conn", w.id, "client", w.remote)
		w.abort("421 4.4.2 " + w.srv.cfg.Hostname + " Idle timeout, closing connection")
	case errors.Is(err, io.EOF) && len(partial) == 0:
		// The client hung up between commands: go-smtp closes quietly.
		return io.EOF
	default:
		w.abort("")
	}
	return net.ErrClosed
}

// filter looks at one command line. It returns the line to hand to
// go-smtp (possibly rewritten), or a reply that wire sends itself, or
// neither when the connection was taken over by STARTTLS or closed.
func (w *wire) filter(line []byte) (fwd []byte, reply string) {
	s := strings.TrimSuffix(strings.TrimSuffix(string(line), "\n"), "\r")
	if hasControl(s) {
		// go-smtp would echo it in its reply.
		return nil, "500 5.5.2 Syntax error, control character in command"
	}
	upper := strings.ToUpper(s)
	// go-smtp's own rule: any line starting with STARTTLS is STARTTLS.
	if strings.HasPrefix(upper, "STARTTLS") {
		return w.startTLS(s)
	}
	verb, arg := upper, ""
	if len(s) >= 4 {
		verb = upper[:4]
	}
	if len(s) > 5 && s[4] == ' ' {
		arg = strings.TrimSpace(s[5:])
	}
	w.verb = verb
	switch verb {
	case "MAIL":
		w.bare.Store(false) // a new transaction
		if rest, ok := cutPrefixFold(arg, "FROM:"); ok {
			if err := checkPath(strings.TrimSpace(rest), true); err != nil {
				return nil, "501 5.1.7 Bad sender address syntax"
			}
		}
	case "RCPT":
		if rest, ok := cutPrefixFold(arg, "TO:"); ok {
			rest = strings.TrimSpace(rest)
			if tail, ok := cutPrefixFold(rest, "<postmaster>"); ok {
				return []byte("RCPT TO:<" + w.srv.cfg.Postmaster + ">" + tail + "\r\n"), ""
			}
			if err := checkPath(rest, false); err != nil {
				return nil, "501 5.1.3 Bad recipient address syntax"
			}
		}
	case "BDAT":
		// go-smtp reads the chunk whenever the size parses, even when it
		// refuses the command; it then writes its reply after the chunk.
		w.chunkLeft = 0
		if f := strings.Fields(arg); len(f) == 1 || len(f) == 2 && strings.EqualFold(f[1], "LAST") {
			if n, err := strconv.ParseUint(f[0], 10, 32); err == nil {
				w.chunkLeft = int64(n)
				w.mode = modeChunk
			}
		}
	case "EHLO":
		w.esmtp = true
		w.addJunk()
	case "HELO":
		w.esmtp = false
		w.addJunk()
	case "DATA", "AUTH", "QUIT":
	default:
		// NOOP, RSET, VRFY, EXPN, HELP and unknown commands.
		w.addJunk()
	}
	return line, ""
}

// hasControl reports whether s holds an ASCII control character other
// than TAB.
func hasControl(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return true
		}
	}
	return false
}

// startTLS performs STARTTLS (RFC 3207) below go-smtp.
func (w *wire) startTLS(line string) (fwd []byte, reply string) {
	cfg := w.srv.cfg.TLSConfig
	switch {
	case cfg == nil:
		return nil, "502 5.5.1 TLS not available"
	case w.tlsState != nil:
		return nil, "503 5.5.1 TLS already active"
	case len(line) != len("STARTTLS"):
		return nil, "501 5.5.4 STARTTLS takes no parameters"
	}
	if err := w.say("220 2.0.0 Ready to start TLS"); err != nil {
		w.abort("")
		return nil, ""
	}
	if n := w.br.Buffered(); n > 0 {
		// Plaintext pipelined after STARTTLS must not be taken as if it
		// came over TLS (CVE-2011-0411 and relatives).
		w.srv.log.Info("smtp plaintext after STARTTLS discarded", "conn", w.id, "client", w.remote, "bytes", n)
		w.abort("")
		return nil, ""
	}
	if err := w.handshake(tls.Server(w.raw, cfg)); err != nil {
		w.srv.log.Info("smtp TLS handshake failed", "conn", w.id, "client", w.remote, "err", err)
		w.abort("")
		return nil, ""
	}
	w.policyMu.Lock()
	w.client.TLS = true
	resetAuth(&w.client, w.allowed)
	w.policyMu.Unlock()
	// A fresh go-smtp connection forgets the EHLO name, the session and
	// any authentication, and writes a greeting that we swallow.
	w.greeting = true
	w.mode, w.wrote, w.lastCode, w.verb, w.esmtp = modeCommand, false, "", "", false
	old := w.view
	w.view = &wireView{w: w}
	old.stale = true
	if !w.srv.handOver(w.view) {
		w.abort("421 4.3.2 " + w.srv.cfg.Hostname + " Service shutting down, closing connection")
	}
	return nil, ""
}

// handshake runs a server TLS handshake on conn (over w.raw) within the
// idle timeout and makes it the connection.
func (w *wire) handshake(conn *tls.Conn) error {
	ctx, cancel := context.WithTimeout(w.srv.ctx, w.srv.cfg.IdleTimeout)
	defer cancel()
	if err := conn.HandshakeContext(ctx); err != nil {
		return err
	}
	st := conn.ConnectionState()
	w.conn = conn
	w.tlsState = &st
	w.srv.metrics.ServerTLS(st.Version)
	w.br.Reset(idleReader{w})
	return nil
}

// write is wireView.Write: the replies go-smtp sends.
func (w *wire) write(p []byte) (int, error) {
	if w.isClosed() {
		return 0, net.ErrClosed
	}
	w.wbuf = append(w.wbuf, p...)
	for {
		i := bytes.IndexByte(w.wbuf, '\n')
		if i < 0 {
			break
		}
		line := w.wbuf[:i+1]
		if err := w.writeLine(line); err != nil {
			w.wbuf = w.wbuf[:0]
			w.abort("")
			return 0, err
		}
		w.wbuf = w.wbuf[i+1:]
	}
	if len(w.wbuf) == 0 {
		w.wbuf = nil
	}
	if err := w.flushOut(); err != nil {
		w.abort("")
		return 0, err
	}
	return len(p), nil
}

func (w *wire) writeLine(line []byte) error {
	if body := bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r")); bytes.IndexByte(body, '\r') >= 0 {
		// Never let a CR inside a reply (go-smtp echoes some input).
		line = append(bytes.ReplaceAll(body, []byte("\r"), []byte(" ")), '\r', '\n')
	}
	if w.greeting {
		w.greeting = false
		if bytes.HasPrefix(line, []byte("220 ")) {
			return nil
		}
	}
	if len(line) < 4 {
		_, err := w.writeRaw(line)
		return err
	}
	code, final := string(line[:3]), line[3] != '-'
	w.wrote = true
	w.lastCode = code
	if w.verb == "EHLO" && code == "250" && len(line) == len("250-SIZE\r\n") && string(line[4:]) == "SIZE\r\n" {
		// RFC 1870: go-smtp has no limit of its own (see NewServer).
		line = []byte(fmt.Sprintf("250%cSIZE %d\r\n", line[3], w.srv.cfg.MaxMessageBytes))
	}
	if _, err := w.writeRaw(line); err != nil {
		return err
	}
	if w.verb == "EHLO" && code == "250" && !final && bytes.HasPrefix(line, []byte("250-Hello ")) {
		// go-smtp's EHLO reply always continues after its first line.
		if w.srv.cfg.TLSConfig != nil && w.tlsState == nil {
			if _, err := w.writeRaw([]byte("250-STARTTLS\r\n")); err != nil {
				return err
			}
		}
		if w.tlsState != nil {
			if _, err := w.writeRaw([]byte("250-REQUIRETLS\r\n")); err != nil {
				return err
			}
		}
	}
	if final {
		if c, ok := replyCode(code); ok {
			w.srv.metrics.ServerReply(c)
		}
		switch {
		case code == "421":
			w.flushOut()
			w.close()
		case code[0] == '4' || code[0] == '5':
			if w.verb == "MAIL" || w.verb == "RCPT" || w.verb == "DATA" || w.verb == "BDAT" || w.verb == "AUTH" {
				w.addJunk()
			}
		}
	}
	return nil
}

// writeRaw queues reply bytes; flushOut sends what go-smtp wrote in one
// call (a multi-line EHLO reply) with one system call.
func (w *wire) writeRaw(b []byte) (int, error) {
	w.obuf = append(w.obuf, b...)
	return len(b), nil
}

func (w *wire) flushOut() error {
	if len(w.obuf) == 0 {
		return nil
	}
	w.raw.SetWriteDeadline(time.Now().Add(w.srv.cfg.IdleTimeout))
	_, err := w.conn.Write(w.obuf)
	if cap(w.obuf) > 4096 {
		w.obuf = nil
	} else {
		w.obuf = w.obuf[:0]
	}
	return err
}

// wireView is the net.Conn one go-smtp connection uses. After STARTTLS a
// new view replaces it and the old one becomes stale: closing it no longer
// closes the connection.
type wireView struct {
	w     *wire
	stale bool
}

var _ net.Conn = (*wireView)(nil)

// Read implements net.Conn.
func (v *wireView) Read(p []byte) (int, error) {
	if v.stale {
		return 0, io.EOF
	}
	return v.w.read(p)
}

// Write implements net.Conn.
func (v *wireView) Write(p []byte) (int, error) {
	if v.stale {
		return 0, net.ErrClosed
	}
	return v.w.write(p)
}

// Close implements net.Conn.
func (v *wireView) Close() error {
	if !v.stale {
		v.w.close()
	}
	return nil
}

// LocalAddr implements net.Conn.
func (v *wireView) LocalAddr() net.Addr { return v.w.raw.LocalAddr() }

// RemoteAddr implements net.Conn.
func (v *wireView) RemoteAddr() net.Addr { return v.w.raw.RemoteAddr() }

// SetDeadline implements net.Conn; wire manages deadlines itself.
func (v *wireView) SetDeadline(t time.Time) error { return nil }

// SetReadDeadline implements net.Conn; wire manages deadlines itself.
func (v *wireView) SetReadDeadline(t time.Time) error { return nil }

// SetWriteDeadline implements net.Conn; wire manages deadlines itself.
func (v *wireView) SetWriteDeadline(t time.Time) error { return nil }

// replyCode parses the three-digit code at the start of a reply line.
func replyCode(line string) (int, bool) {
	if len(line) < 3 {
		return 0, false
	}
	n := 0
	for i := 0; i < 3; i++ {
		c := line[i]
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, true
}

// cutPrefixFold is strings.CutPrefix ignoring ASCII case.
func cutPrefixFold(s, prefix string) (string, bool) {
	if len(s) < len(prefix) || !strings.EqualFold(s[:len(prefix)], prefix) {
		return s, false
	}
	return s[len(prefix):], true
}
