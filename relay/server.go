package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

// ServerConfig configures a Server. Zero fields take the defaults given
// with each field; only Submitter is required.
type ServerConfig struct {
	// Hostname is the name in the greeting, the EHLO reply, Received
	// headers and generated Message-IDs; default os.Hostname().
	Hostname string
	// Submitter receives accepted messages. Required.
	Submitter Submitter
	// Authenticator checks AUTH PLAIN and AUTH LOGIN credentials; nil
	// means AUTH is not offered.
	Authenticator auth.Authenticator
	// AddrAuthenticator recognises allow-listed clients by address when
	// they connect; they may send without AUTH. Nil means no allow-list.
	AddrAuthenticator auth.AddrAuthenticator
	// Policy is asked at connect, AUTH, MAIL, RCPT and after the message
	// header. Nil means DefaultServerPolicy(): a closed relay for
	// authenticated clients, restricted to their own sender addresses.
	Policy policy.Policy
	// AllowUnauthenticated lets clients that neither authenticated nor
	// are allow-listed past MAIL, leaving the decision to Policy (for
	// example policy.ClosedRelay with LocalDomains, for a relay that also
	// receives mail for its own domains). Off by default: MAIL before AUTH
	// is answered 530 5.7.0 whatever the Policy says.
	AllowUnauthenticated bool
	// TLSConfig enables STARTTLS on Serve and is required by ServeTLS;
	// nil means plaintext only.
	TLSConfig *tls.Config
	// AllowInsecureAuth offers AUTH without TLS. Only for tests and
	// loopback: it sends passwords in the clear.
	AllowInsecureAuth bool
	// MaxMessageBytes caps a message as the client sends it; default 25
	// MiB. A smaller Identity.MaxSize or policy.SizeLimiter limit applies
	// to the clients it concerns.
	MaxMessageBytes int64
	// MaxHeaderBytes caps the header block, which is held in memory for
	// the policy; default 256 KiB.
	MaxHeaderBytes int
	// MaxRecipients caps the recipients of one message; default 100.
	MaxRecipients int
	// IdleTimeout is how long a read or write may wait for the client,
	// renewed by each read: between commands and inside a message body
	// alike. Default 5 minutes (RFC 5321 §4.5.3.2.7).
	IdleTimeout time.Duration
	// SubmitTimeout bounds Submitter.Submit and the policy hooks of one
	// command; default 10 minutes (RFC 5321 §4.5.3.2.6).
	SubmitTimeout time.Duration
	// MaxConns caps simultaneous connections over all listeners; further
	// clients get 421 4.7.0. Default 1000; negative means no cap.
	MaxConns int
	// MaxJunkCommands caps the commands a connection may send without a
	// message being accepted: NOOP, RSET, VRFY, HELP, HELO/EHLO, unknown
	// commands and refused MAIL, RCPT, DATA and AUTH. Past it the server
	// answers 421 4.7.0 and closes. Default 100; negative means no cap.
	MaxJunkCommands int
	// MaxAuthFailures is how many failed AUTH attempts a connection may
	// make; the next failure is answered 421 4.7.0 and closes the
	// connection. Default 3; negative means no cap.
	MaxAuthFailures int
	// Postmaster is where mail to the bare recipient "postmaster" goes
	// (RFC 5321 §4.5.1); default "postmaster@" + Hostname.
	Postmaster string
	// StreamHeader names the header field by which a message chooses its
	// mail stream (Config.Streams) when the client's identity does not
	// pin one (auth.Identity.Stream); default DefaultStreamHeader. The
	// field is removed before the message is queued, whether it chose the
	// stream or was overruled by the identity. When the Submitter is a
	// StreamChecker, a stream it does not deliver is refused: named by the
	// header, with 554 5.6.0 (the message asks for something that cannot
	// be); pinned by the identity, with 451 4.3.5 at MAIL (the server's
	// configuration is inconsistent; RFC 3463 X.3.5).
	StreamHeader string
	// Logger receives connection and message logs; nil discards them.
	Logger *slog.Logger
	// Metrics receives the server's measurements: connections, TLS,
	// replies by code, AUTH failures and refusals. Nil means NopMetrics.
	Metrics Metrics
}

// Defaults of ServerConfig.
const (
	DefaultMaxMessageBytes = 25 << 20
	DefaultMaxHeaderBytes  = 256 << 10
	DefaultMaxRecipients   = 100
	DefaultIdleTimeout     = 5 * time.Minute
	DefaultSubmitTimeout   = 10 * time.Minute
	DefaultMaxConns        = 1000
	DefaultMaxJunkCommands = 100
	DefaultMaxAuthFailures = 3
	DefaultStreamHeader    = "X-Baton-Stream"
)

// DefaultServerPolicy is the policy of a Server whose config has none:
// policy.ClosedRelay without local domains (only authenticated or
// allow-listed clients may send) followed by policy.Senders (a client with
// sender restrictions may only use its own addresses, in the envelope and
// in the From header).
func DefaultServerPolicy() policy.Policy {
	return policy.Chain{policy.NewClosedRelay(nil), policy.NewSenders(nil)}
}

// Server is the SMTP front end of the relay: it accepts mail from clients
// (RFC 5321 submission on ports 25, 587 and 465) and hands each message to
// a Submitter, answering 250 only once the Submitter has made it durable.
//
// It is built on go-smtp and adds what an outbound relay needs in front of
// it:
//
//   - TLS: STARTTLS (RFC 3207) with Serve, implicit TLS (RFC 8314) with
//     ServeTLS; REQUIRETLS (RFC 8689) is offered over TLS only and its
//     MAIL parameter is refused over plaintext.
//   - AUTH PLAIN (RFC 4616) and AUTH LOGIN (RFC 4954), over TLS unless
//     AllowInsecureAuth; MAIL needs AUTH or an allow-listed address (530
//     5.7.0); failed attempts are capped.
//   - Strict RFC 5321 address syntax (501 5.1.7 and 501 5.1.3), the bare
//     postmaster recipient, duplicate recipients collapsed, DSN parameters
//     (RFC 3461) kept in the envelope, SIZE (RFC 1870), 8BITMIME (RFC
//     6152), SMTPUTF8 (RFC 6531), PIPELINING (RFC 2920), CHUNKING (RFC
//     3030) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463).
//   - Messages are streamed to the Submitter, never held whole: only the
//     header block is read first, for the policy's Data hook. Bare CR or
//     LF anywhere in a message is refused (SMTP smuggling), the size is
//     capped while streaming, and the RFC 6409 §8 fix-ups are added: a
//     Received header (with the RFC 3848 protocol name and the TLS version
//     and cipher, never the user name), and Date and Message-ID when
//     missing.
//   - Connections are watched: an idle deadline renewed by every read,
//     a cap on connections and on commands without progress, and Shutdown
//     that lets messages being received finish while idle connections are
//     closed with 421.
//
// A Server is safe for concurrent use; one Server may serve several
// listeners.
type Server struct {
	cfg    ServerConfig
	log    *slog.Logger
	policy policy.Policy
	smtp   *smtp.Server
	queue  *connQueue

	ctx    context.Context // canceled when the server is closed
	cancel context.CancelFunc

	bodyBufs sync.Pool // *bufio.Reader for message bodies
	// deep runs the DATA phase of sessions (see stackPool).
	deep      *stackPool
	startOnce sync.Once
	shutdown  atomic.Bool
	seq       atomic.Uint64
	metrics   Metrics // never nil

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*wire]struct{}
	wg        sync.WaitGroup // accept loops and connection set-up
}

// ErrServerClosed is returned by Serve and ServeTLS after Shutdown or
// Close. It matches net.ErrClosed with errors.Is.
var ErrServerClosed = fmt.Errorf("relay: server closed: %w", net.ErrClosed)

// NewServer checks cfg, fills in defaults and returns a Server that is not
// yet listening.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Submitter == nil {
		return nil, errors.New("relay: ServerConfig.Submitter is required")
	}
	if cfg.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		cfg.Hostname = h
	}
	if cfg.MaxMessageBytes <= 0 {
		cfg.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if cfg.MaxHeaderBytes <= 0 {
		cfg.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if cfg.MaxRecipients <= 0 {
		cfg.MaxRecipients = DefaultMaxRecipients
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.SubmitTimeout <= 0 {
		cfg.SubmitTimeout = DefaultSubmitTimeout
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxJunkCommands == 0 {
		cfg.MaxJunkCommands = DefaultMaxJunkCommands
	}
	if cfg.MaxAuthFailures == 0 {
		cfg.MaxAuthFailures = DefaultMaxAuthFailures
	}
	if cfg.StreamHeader == "" {
		cfg.StreamHeader = DefaultStreamHeader
	}
	if cfg.Postmaster == "" {
		cfg.Postmaster = "postmaster@" + cfg.Hostname
	}
	if err := checkPath("<"+cfg.Postmaster+">", false); err != nil {
		return nil, fmt.Errorf("relay: ServerConfig.Postmaster %q is not a valid address", cfg.Postmaster)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NopMetrics{}
	}
	s := &Server{
		metrics:   cfg.Metrics,
		cfg:       cfg,
		log:       cfg.Logger,
		policy:    cfg.Policy,
		queue:     newConnQueue(),
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*wire]struct{}),
		deep:      newStackPool(10 * time.Second),
	}
	if s.policy == nil {
		s.policy = DefaultServerPolicy()
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())

	be := smtp.BackendFunc(s.newSession)
	ss := smtp.NewServer(be)
	ss.Domain = cfg.Hostname
	// go-smtp's own size check refuses a message of exactly the limit and
	// knows nothing of per-client limits: the session counts instead, and
	// wire puts the limit into the EHLO reply.
	ss.MaxMessageBytes = 0
	ss.MaxRecipients = cfg.MaxRecipients
	// TLS is handled below go-smtp (see wire), so go-smtp never sees a
	// *tls.Conn: it must offer AUTH everywhere and leave the decision to
	// the session, and REQUIRETLS is advertised by wire.
	ss.AllowInsecureAuth = true
	ss.EnableSMTPUTF8 = true
	ss.EnableDSN = true
	ss.EnableREQUIRETLS = true
	ss.ErrorLog = slogPrintf{s.log}
	s.smtp = ss
	return s, nil
}

// Serve accepts connections on l and serves SMTP on them, with STARTTLS
// when TLSConfig is set. It returns ErrServerClosed after Shutdown or
// Close, or the listener's error.
func (s *Server) Serve(l net.Listener) error { return s.serve(l, false) }

// ServeTLS accepts connections on l and serves SMTP over implicit TLS
// (RFC 8314, port 465 style). TLSConfig must be set.
func (s *Server) ServeTLS(l net.Listener) error {
	if s.cfg.TLSConfig == nil {
		return errors.New("relay: ServeTLS needs ServerConfig.TLSConfig")
	}
	return s.serve(l, true)
}

func (s *Server) serve(l net.Listener, implicitTLS bool) error {
	s.mu.Lock()
	if s.shutdown.Load() {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	s.startOnce.Do(func() { go s.smtp.Serve(s.queue) })

	var delay time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.shutdown.Load() {
				return ErrServerClosed
			}
			var te interface{ Temporary() bool }
			if errors.As(err, &te) && te.Temporary() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				s.log.Warn("smtp accept error", "err", err, "retry_in", delay)
				select {
				case <-time.After(delay):
				case <-s.ctx.Done():
					return ErrServerClosed
				}
				continue
			}
			s.mu.Lock()
			delete(s.listeners, l)
			s.mu.Unlock()
			return err
		}
		delay = 0
		s.accept(c, implicitTLS)
	}
}

// accept registers a new connection and sets it up on its own goroutine.
func (s *Server) accept(c net.Conn, implicitTLS bool) {
	w := newWire(s, c, fmt.Sprintf("%x", s.seq.Add(1)))
	s.mu.Lock()
	if s.shutdown.Load() {
		s.mu.Unlock()
		c.Close()
		return
	}
	if s.cfg.MaxConns > 0 && len(s.conns) >= s.cfg.MaxConns {
		s.mu.Unlock()
		s.log.Warn("smtp connection refused: too many connections", "client", w.remote)
		s.metrics.Refused(StageConnect, RefusedConnLimit)
		go func() {
			if !implicitTLS {
				s.metrics.ServerReply(421)
				c.SetWriteDeadline(time.Now().Add(5 * time.Second))
				io.WriteString(c, "421 4.7.0 "+s.cfg.Hostname+" Too many connections, try again later\r\n")
			}
			c.Close()
		}()
		return
	}
	s.conns[w] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.metrics.ServerConnection()
	go func() {
		defer s.wg.Done()
		s.setUp(w, implicitTLS)
	}()
}

// setUp runs the implicit TLS handshake, the allow-list and the Connect
// policy, then hands the connection to go-smtp.
func (s *Server) setUp(w *wire, implicitTLS bool) {
	log := s.log.With("conn", w.id, "client", w.remote)
	if implicitTLS {
		if err := w.handshake(tls.Server(w.raw, s.cfg.TLSConfig)); err != nil {
			log.Info("smtp TLS handshake failed", "err", err)
			w.close()
			return
		}
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.cfg.SubmitTimeout)
	defer cancel()
	if s.cfg.AddrAuthenticator != nil && w.addr.IsValid() {
		id, err := s.cfg.AddrAuthenticator.AuthenticateAddr(ctx, w.addr)
		switch {
		case err == nil && id != nil:
			w.allowed = id
		case err != nil && !errors.Is(err, auth.ErrNotAllowed):
			log.Error("smtp allow-list lookup failed", "err", err)
		}
	}
	log.Debug("smtp connect", "allow_listed", w.allowed != nil, "tls", w.tlsState != nil)
	w.policyMu.Lock()
	if w.gone {
		w.policyMu.Unlock()
		return
	}
	w.client = policy.Client{Addr: w.addr, TLS: w.tlsState != nil}
	resetAuth(&w.client, w.allowed)
	w.connected = true
	err := s.policy.Connect(ctx, &w.client)
	w.policyMu.Unlock()
	if err != nil {
		reply := s.smtpError(err, log, "connect policy")
		log.Info("smtp connection refused by policy", "code", reply.Code, "reply", reply.Message)
		s.metrics.Refused(StageConnect, refusalReason(StageConnect, reply))
		w.abort(formatReply(reply))
		return
	}
	if s.shutdown.Load() || !s.handOver(w.view) {
		w.abort("421 4.3.2 " + s.cfg.Hostname + " Service shutting down, closing connection")
	}
}

// handOver gives a connection view to go-smtp. It fails once go-smtp is
// shut down.
func (s *Server) handOver(v *wireView) bool { return s.queue.push(v) }

// forget removes a closed connection and tells the policy.
func (s *Server) forget(w *wire) {
	s.mu.Lock()
	_, ok := s.conns[w]
	delete(s.conns, w)
	s.mu.Unlock()
	if !ok {
		return
	}
	w.policyMu.Lock()
	w.gone = true
	if cl, isCloser := s.policy.(policy.Closer); isCloser && w.connected {
		cl.Disconnect(context.WithoutCancel(s.ctx), &w.client)
	}
	w.policyMu.Unlock()
	w.log().Debug("smtp disconnect")
}

func (w *wire) log() *slog.Logger { return w.srv.log.With("conn", w.id, "client", w.remote) }

func (s *Server) shuttingDown() bool { return s.shutdown.Load() }

// Shutdown stops the server gracefully: it closes the listeners, answers
// connections waiting for a command with 421 4.3.2 and closes them, and
// lets messages being received and submitted finish (their connections
// are closed after the reply). When ctx ends first, the remaining
// connections are closed, submissions in progress are canceled, and
// Shutdown returns ctx's error.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.shutdown.Store(true)
	var err error
	for l := range s.listeners {
		if e := l.Close(); e != nil && err == nil && !errors.Is(e, net.ErrClosed) {
			err = e
		}
	}
	s.listeners = map[net.Listener]struct{}{}
	s.mu.Unlock()

	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		s.mu.Lock()
		n := len(s.conns)
		ws := make([]*wire, 0, n)
		for w := range s.conns {
			ws = append(ws, w)
		}
		s.mu.Unlock()
		if n == 0 {
			break
		}
		for _, w := range ws {
			w.interruptIfIdle()
		}
		select {
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		case <-t.C:
		}
	}
	s.queue.close()
	s.smtp.Close()
	s.cancel()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	return err
}

// Close closes the listeners and every connection at once, canceling
// submissions in progress.
func (s *Server) Close() error {
	s.mu.Lock()
	s.shutdown.Store(true)
	var err error
	for l := range s.listeners {
		if e := l.Close(); e != nil && err == nil && !errors.Is(e, net.ErrClosed) {
			err = e
		}
	}
	s.listeners = map[net.Listener]struct{}{}
	ws := make([]*wire, 0, len(s.conns))
	for w := range s.conns {
		ws = append(ws, w)
	}
	s.mu.Unlock()
	s.cancel()
	for _, w := range ws {
		w.close()
	}
	s.queue.close()
	s.smtp.Close()
	return err
}

// connQueue is the listener go-smtp serves: connections arrive from
// Server.setUp and from STARTTLS hand-overs.
type connQueue struct {
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newConnQueue() *connQueue {
	return &connQueue{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (q *connQueue) push(c net.Conn) bool {
	select {
	case <-q.done:
		return false
	default:
	}
	select {
	case q.ch <- c:
		return true
	case <-q.done:
		return false
	}
}

// Accept implements net.Listener.
func (q *connQueue) Accept() (net.Conn, error) {
	select {
	case c := <-q.ch:
		return c, nil
	case <-q.done:
		return nil, net.ErrClosed
	}
}

func (q *connQueue) close() { q.once.Do(func() { close(q.done) }) }

// Close implements net.Listener.
func (q *connQueue) Close() error { q.close(); return nil }

// Addr implements net.Listener.
func (q *connQueue) Addr() net.Addr { return queueAddr{} }

type queueAddr struct{}

func (queueAddr) Network() string { return "relay" }
func (queueAddr) String() string  { return "relay" }

// slogPrintf adapts a slog.Logger to go-smtp's Logger.
type slogPrintf struct{ log *slog.Logger }

func (l slogPrintf) Printf(format string, v ...any) {
	l.log.Debug("smtp: " + fmt.Sprintf(format, v...))
}

func (l slogPrintf) Println(v ...any) { l.log.Debug("smtp: " + fmt.Sprint(v...)) }

// formatReply renders an SMTP error as one reply line.
func formatReply(e *smtp.SMTPError) string {
	if e.EnhancedCode == smtp.NoEnhancedCode {
		return fmt.Sprintf("%03d %s", e.Code, e.Message)
	}
	ec := e.EnhancedCode
	if ec == smtp.EnhancedCodeNotSet {
		ec = smtp.EnhancedCode{e.Code / 100, 0, 0}
	}
	return fmt.Sprintf("%03d %d.%d.%d %s", e.Code, ec[0], ec[1], ec[2], e.Message)
}

// Replies the server builds itself.
var (
	errTempLocal  = policy.Reject(451, [3]int{4, 3, 0}, "Temporary local problem, please try again later")
	errNoSpace    = policy.Reject(452, [3]int{4, 3, 1}, "Insufficient system storage")
	errAuthNeeded = policy.Reject(530, [3]int{5, 7, 0}, "Authentication required")
)

// smtpError turns an error from a policy or the Submitter into the reply
// for the client: an *smtp.SMTPError anywhere in err's chain is used bare
// (its enhanced class forced to match its code, its text on one line);
// anything else is logged and answered with a fixed 451 4.3.0.
func (s *Server) smtpError(err error, log *slog.Logger, stage string) *smtp.SMTPError {
	var se *smtp.SMTPError
	if errors.As(err, &se) && se.Code >= 400 && se.Code < 600 {
		return cleanReply(se)
	}
	if errors.Is(err, queue.ErrNoSpace) {
		log.Error("smtp "+stage+" failed: no space", "err", err)
		return errNoSpace
	}
	log.Error("smtp "+stage+" failed", "err", err)
	return errTempLocal
}

// cleanReply returns se, or a copy whose enhanced code class matches its
// code and whose text holds no CR or LF.
func cleanReply(se *smtp.SMTPError) *smtp.SMTPError {
	ec := se.EnhancedCode
	ok := ec == smtp.EnhancedCodeNotSet || ec == smtp.NoEnhancedCode || ec[0] == se.Code/100
	msg := se.Message
	clean := true
	for i := 0; i < len(msg); i++ {
		if msg[i] == '\r' || msg[i] == '\n' {
			clean = false
			break
		}
	}
	if ok && clean {
		return se
	}
	c := *se
	if !ok {
		c.EnhancedCode[0] = se.Code / 100
	}
	if !clean {
		b := []byte(msg)
		for i, ch := range b {
			if ch == '\r' || ch == '\n' {
				b[i] = ' '
			}
		}
		c.Message = string(b)
	}
	return &c
}
