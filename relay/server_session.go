package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
)

// session is one go-smtp session: from EHLO to QUIT, or to STARTTLS,
// which starts a new one. Its methods run on go-smtp's connection
// goroutine, except Data under BDAT, which runs on a goroutine of its own
// while RSET may reset the transaction: mu guards the transaction.
type session struct {
	srv  *Server
	w    *wire
	conn *smtp.Conn
	log  *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc

	tls   *tls.ConnectionState // as when the session started
	esmtp bool

	mu         sync.Mutex
	authID     *auth.Identity // identity from AUTH in this session
	authFails  int
	inTx       bool
	env        queue.Envelope
	rcpts      map[string]bool
	limit      int64 // size limit of the current transaction
	declared   int64 // SIZE parameter of the current transaction
	identityOK bool  // client may send (scopes)
}

var (
	_ smtp.Session     = (*session)(nil)
	_ smtp.AuthSession = (*session)(nil)
)

// Replies of the session.
var (
	errNestedMail     = policy.Reject(503, [3]int{5, 5, 1}, "Nested MAIL command")
	errNoScope        = policy.Reject(550, [3]int{5, 7, 1}, "Not permitted to send mail")
	errRequireTLS     = policy.Reject(530, [3]int{5, 7, 10}, "REQUIRETLS needs a TLS connection")
	errNeedUTF8       = policy.Reject(553, [3]int{5, 6, 7}, "Non-ASCII address needs the SMTPUTF8 parameter")
	errDeclaredTooBig = policy.Reject(552, [3]int{5, 3, 4}, "Message size exceeds fixed maximum message size")
	errEncryptionReq  = policy.Reject(538, [3]int{5, 7, 11}, "Encryption required for requested authentication mechanism")
	errAuthInvalid    = policy.Reject(535, [3]int{5, 7, 8}, "Authentication credentials invalid")
	errAuthTemp       = policy.Reject(454, [3]int{4, 7, 0}, "Temporary authentication failure")
	errAuthTooMany    = policy.Reject(421, [3]int{4, 7, 0}, "Too many authentication failures, closing connection")
	errNoRecipients   = policy.Reject(554, [3]int{5, 5, 1}, "No valid recipients")
	errStreamConfig   = policy.Reject(451, [3]int{4, 3, 5}, "Mail stream of this account is not configured")
)

func (s *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	v, ok := c.Conn().(*wireView)
	if !ok {
		return nil, errTempLocal
	}
	w := v.w
	ctx, cancel := context.WithCancel(s.ctx)
	log := w.log()
	if w.allowed != nil {
		log = log.With("identity", w.allowed.Name)
	}
	ss := &session{srv: s, w: w, conn: c, ctx: ctx, cancel: cancel, log: log, tls: w.tlsState, esmtp: w.esmtp}
	w.policyMu.Lock()
	w.client.HELO = c.Hostname()
	w.policyMu.Unlock()
	return ss, nil
}

// opCtx is the context of one command's policy hooks and submission.
func (ss *session) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(ss.ctx, ss.srv.cfg.SubmitTimeout)
}

// Reset implements smtp.Session.
func (ss *session) Reset() {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	ss.resetTx()
}

func (ss *session) resetTx() {
	ss.inTx = false
	ss.env = queue.Envelope{}
	ss.rcpts = nil
	ss.limit, ss.declared = 0, 0
}

// Logout implements smtp.Session.
func (ss *session) Logout() error {
	ss.cancel()
	return nil
}

// AuthMechanisms implements smtp.AuthSession: PLAIN and LOGIN, over TLS
// (or anywhere with AllowInsecureAuth) when there is an Authenticator.
func (ss *session) AuthMechanisms() []string {
	if !ss.authAllowed() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

func (ss *session) authAllowed() bool {
	return ss.srv.cfg.Authenticator != nil && (ss.tls != nil || ss.srv.cfg.AllowInsecureAuth)
}

// Auth implements smtp.AuthSession.
func (ss *session) Auth(mech string) (sasl.Server, error) {
	if ss.srv.cfg.Authenticator == nil {
		return nil, smtp.ErrAuthUnsupported
	}
	if !ss.authAllowed() {
		return nil, errEncryptionReq
	}
	switch strings.ToUpper(mech) {
	case sasl.Plain:
		return newPlainServer(func(u, p string) error { return ss.checkCredentials(sasl.Plain, u, p) }), nil
	case sasl.Login:
		return newLoginServer(func(u, p string) error { return ss.checkCredentials(sasl.Login, u, p) }), nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// checkCredentials asks the Authenticator, then the policy's Auth hook,
// and counts failures; mech names the SASL mechanism for metrics.
func (ss *session) checkCredentials(mech, username, password string) error {
	ctx, cancel := ss.opCtx()
	defer cancel()
	id, err := ss.srv.cfg.Authenticator.Authenticate(ctx, username, password)
	ok := err == nil && id != nil
	var reply error
	switch {
	case ok:
	case err == nil || errors.Is(err, auth.ErrInvalidCredentials):
		reply = errAuthInvalid
	default:
		ss.log.Error("smtp authenticator failed", "err", err)
		reply = errAuthTemp
	}
	w := ss.w
	w.policyMu.Lock()
	if ok {
		setIdentity(&w.client, id)
	}
	perr := ss.srv.policy.Auth(ctx, &w.client, username, ok)
	if perr != nil && ok {
		resetAuth(&w.client, w.allowed)
	}
	w.policyMu.Unlock()
	var refusal *smtp.SMTPError
	if perr != nil {
		refusal = ss.srv.smtpError(perr, ss.log, "auth policy")
		reply, ok = refusal, false
	}
	if ok {
		ss.mu.Lock()
		ss.authID = id
		ss.log = w.log().With("identity", id.Name)
		ss.mu.Unlock()
		ss.log.Info("smtp authenticated")
		return nil
	}
	ss.mu.Lock()
	ss.authFails++
	fails := ss.authFails
	ss.mu.Unlock()
	ss.log.Info("smtp authentication failed", "fails", fails)
	m := ss.srv.metrics
	m.AuthFailure(mech)
	if max := ss.srv.cfg.MaxAuthFailures; max > 0 && fails > max {
		m.Refused(StageAuth, RefusedAuthLimit)
		return errAuthTooMany
	}
	if refusal != nil {
		m.Refused(StageAuth, refusalReason(StageAuth, refusal))
	}
	return reply
}

// client returns a copy of the connection's policy client.
func (ss *session) client() policy.Client {
	ss.w.policyMu.Lock()
	defer ss.w.policyMu.Unlock()
	return ss.w.client
}

// Mail implements smtp.Session.
func (ss *session) Mail(from string, opts *smtp.MailOptions) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if ss.inTx {
		return errNestedMail
	}
	c := ss.client()
	if !c.Authenticated && !ss.srv.cfg.AllowUnauthenticated {
		ss.log.Info("smtp MAIL refused: not authenticated", "from", from)
		ss.srv.metrics.Refused(StageMail, RefusedPolicy)
		return errAuthNeeded
	}
	if c.Authenticated && !maySend(&c) {
		ss.srv.metrics.Refused(StageMail, RefusedPolicy)
		return errNoScope
	}
	if opts == nil {
		opts = &smtp.MailOptions{}
	}
	if opts.RequireTLS && ss.tls == nil {
		return errRequireTLS
	}
	if from != "" {
		from = canonicalAddr(from)
		if !opts.UTF8 && !isASCII(from) {
			return errNeedUTF8
		}
	}
	limit := ss.srv.cfg.MaxMessageBytes
	if c.MaxSize > 0 && c.MaxSize < limit {
		limit = c.MaxSize
	}
	if sl, ok := ss.srv.policy.(policy.SizeLimiter); ok {
		ss.w.policyMu.Lock()
		n := sl.MaxMessageSize(&ss.w.client)
		ss.w.policyMu.Unlock()
		if n > 0 && n < limit {
			limit = n
		}
	}
	if opts.Size > limit {
		ss.srv.metrics.Refused(StageMail, RefusedPolicy)
		return errDeclaredTooBig
	}
	stream := ss.pinnedStream()
	if stream != "" && !ss.srv.hasStream(stream) {
		ss.log.Error("smtp MAIL refused: the identity's stream is not configured", "stream", stream)
		return errStreamConfig
	}
	ctx, cancel := ss.opCtx()
	defer cancel()
	ss.w.policyMu.Lock()
	err := ss.srv.policy.Mail(ctx, &ss.w.client, from)
	ss.w.policyMu.Unlock()
	if err != nil {
		reply := ss.srv.smtpError(err, ss.log, "mail policy")
		ss.log.Info("smtp MAIL refused by policy", "from", from, "code", reply.Code)
		ss.srv.metrics.Refused(StageMail, refusalReason(StageMail, reply))
		return reply
	}
	ss.inTx = true
	ss.env = queue.Envelope{
		From:       from,
		Ret:        queue.Ret(opts.Return),
		EnvID:      opts.EnvelopeID,
		SMTPUTF8:   opts.UTF8,
		EightBit:   opts.Body == smtp.Body8BitMIME,
		RequireTLS: opts.RequireTLS,
		Identity:   c.Identity,
		Held:       c.Sandbox,
		Sandbox:    c.Sandbox,
		Stream:     stream,
	}
	ss.rcpts = make(map[string]bool)
	ss.limit = limit
	ss.declared = opts.Size
	return nil
}

// Rcpt implements smtp.Session.
func (ss *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.inTx {
		return policy.Reject(503, [3]int{5, 5, 1}, "MAIL first")
	}
	to = canonicalAddr(to)
	if !ss.env.SMTPUTF8 && !isASCII(to) {
		return errNeedUTF8
	}
	key := strings.ToLower(to)
	if ss.rcpts[key] {
		return nil // a duplicate: accepted once
	}
	ctx, cancel := ss.opCtx()
	defer cancel()
	ss.w.policyMu.Lock()
	err := ss.srv.policy.Rcpt(ctx, &ss.w.client, ss.env.From, to)
	ss.w.policyMu.Unlock()
	if err != nil {
		reply := ss.srv.smtpError(err, ss.log, "rcpt policy")
		ss.log.Info("smtp RCPT refused by policy", "from", ss.env.From, "to", to, "code", reply.Code)
		ss.srv.metrics.Refused(StageRcpt, refusalReason(StageRcpt, reply))
		return reply
	}
	r := queue.Recipient{Addr: to}
	if opts != nil {
		for _, n := range opts.Notify {
			switch n {
			case smtp.DSNNotifyNever:
				r.Notify |= queue.NotifyNever
			case smtp.DSNNotifySuccess:
				r.Notify |= queue.NotifySuccess
			case smtp.DSNNotifyFailure:
				r.Notify |= queue.NotifyFailure
			case smtp.DSNNotifyDelayed:
				r.Notify |= queue.NotifyDelay
			}
		}
		if opts.OriginalRecipient != "" {
			r.ORCPT = strings.ToLower(string(opts.OriginalRecipientType)) + ";" + opts.OriginalRecipient
		}
	}
	ss.rcpts[key] = true
	ss.env.To = append(ss.env.To, r)
	return nil
}

// Data implements smtp.Session: it checks the header, runs the policy's
// Data hook, then streams the message with the fix-up headers into the
// Submitter and answers with the queue ID. It runs on one of the server's
// long-lived goroutines (see stackPool).
func (ss *session) Data(r io.Reader) (err error) {
	ss.srv.deep.do(func() { err = ss.data(r) })
	return err
}

func (ss *session) data(r io.Reader) error {
	start := time.Now()
	ss.mu.Lock()
	if !ss.inTx || len(ss.env.To) == 0 {
		ss.mu.Unlock()
		return errNoRecipients
	}
	env := ss.env
	env.To = append([]queue.Recipient(nil), ss.env.To...)
	limit, declared := ss.limit, ss.declared
	authed := ss.authID != nil
	log := ss.log
	ss.mu.Unlock()

	// The message is read from the wire directly when it can be (see
	// wireData), and from go-smtp's reader otherwise.
	var src io.Reader = r
	wd := ss.w.startData()
	if wd != nil {
		defer wd.finish()
		src = wd
	}
	body := newBodyReader(src, limit)
	if wd != nil {
		// wireData refuses bare CR and LF itself, on the bytes as they
		// came: its Read fails as soon as it has seen one.
		body.checked = true
	} else {
		// wire saw the lines before go-smtp's dot-unstuffing, which
		// swallows some bare CRs and LFs.
		body.atEOF = func() error {
			if ss.w.bare.Load() {
				return errBareNewline
			}
			return nil
		}
	}
	br, _ := ss.srv.bodyBufs.Get().(*bufio.Reader)
	if br == nil {
		br = bufio.NewReaderSize(body, 4096)
	} else {
		br.Reset(body)
	}
	defer func() {
		br.Reset(nil)
		ss.srv.bodyBufs.Put(br)
	}()
	raw, sawBlank, err := readHeaderBlock(br, ss.srv.cfg.MaxHeaderBytes)
	if err != nil {
		return ss.dataFailed(body, err, log)
	}
	h, err := parseHeader(raw)
	if err != nil {
		return ss.dataFailed(body, err, log)
	}
	if raw, err = ss.srv.chooseStream(&env, &h, raw); err != nil {
		log.Info("smtp message refused: unknown stream", "from", env.From)
		return err
	}

	ctx, cancel := ss.opCtx()
	defer cancel()
	to := make([]string, len(env.To))
	for i, rc := range env.To {
		to[i] = rc.Addr
	}
	ss.w.policyMu.Lock()
	perr := ss.srv.policy.Data(ctx, &ss.w.client, &policy.Message{From: env.From, To: to, Size: declared, Header: h})
	c := ss.w.client
	ss.w.policyMu.Unlock()
	if perr != nil {
		reply := ss.srv.smtpError(perr, log, "data policy")
		log.Info("smtp message refused by policy", "from", env.From, "code", reply.Code)
		ss.srv.metrics.Refused(StageData, refusalReason(StageData, reply))
		return reply
	}

	now := time.Now()
	trace := &traceInfo{
		Helo: c.HELO, Addr: ss.w.addr, Host: ss.srv.cfg.Hostname, ESMTP: ss.esmtp,
		Auth: authed, UTF8: env.SMTPUTF8, TLS: ss.tls, Received: now,
	}
	head := receivedHeader(trace)
	fix := fixUps(h, ss.srv.cfg.Hostname, now)
	parts := []io.Reader{strings.NewReader(head), bytes.NewReader(raw), strings.NewReader(fix + "\r\n")}
	if sawBlank {
		parts = append(parts, br)
	}
	// Only Read is exposed: io.MultiReader's WriteTo allocates a 32 KiB
	// buffer for every message, where io.Copy into most writers uses a
	// pooled one.
	msg := struct{ io.Reader }{io.MultiReader(parts...)}
	id, err := ss.srv.cfg.Submitter.Submit(ctx, &env, msg)
	if body.err != nil {
		// The client's message was at fault (or the connection broke):
		// that, not the Submitter's view of it, decides the reply.
		return ss.dataFailed(body, body.err, log)
	}
	if err != nil {
		reply := ss.srv.smtpError(err, log.With("from", env.From), "submit")
		log.Info("smtp message not queued", "from", env.From, "code", reply.Code)
		return reply
	}
	if !body.eof {
		// The Submitter must read the body to EOF (see Submitter); what it
		// queued may be truncated. The rest is discarded by go-smtp.
		log.Error("smtp submitter returned before the end of the message", "id", id)
	}
	ss.w.progress()
	log.Info("smtp message queued", "id", id, "from", env.From, "rcpts", len(env.To),
		"size", body.n, "held", env.Held, "duration", time.Since(start).Round(time.Millisecond))
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK queued as " + string(id)}
}

// dataFailed answers a message whose reading failed. Content errors are
// SMTP replies; a failed read from the client means the connection is
// broken or out of step, so it is closed.
func (ss *session) dataFailed(body *bodyReader, err error, log *slog.Logger) error {
	var se *smtp.SMTPError
	switch {
	case errors.As(err, &se):
		log.Info("smtp message refused", "code", se.Code, "reply", se.Message)
		if se == errTooBig || se == errHeaderTooBig {
			ss.srv.metrics.Refused(StageData, RefusedPolicy)
		}
		return cleanReply(se)
	case errors.Is(err, smtp.ErrDataReset):
		return errTempLocal
	case errors.Is(err, smtp.ErrTooLongLine):
		log.Info("smtp message refused: line too long")
		ss.w.abort("500 5.5.2 " + ss.srv.cfg.Hostname + " Line too long, closing connection")
		return errTempLocal
	default:
		if !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.ErrUnexpectedEOF) {
			log.Info("smtp message read failed", "err", err)
		}
		ss.w.abort("")
		return errTempLocal
	}
}
