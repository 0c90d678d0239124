package relay

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/queue"
)

// RFC 2920 PIPELINING in the deliverer.
//
// go-smtp's client sends MAIL, each RCPT and DATA one round trip at a
// time and does not expose its connection. When the server advertises
// PIPELINING, transactPipelined instead writes MAIL, every RCPT and DATA
// in one write on the same connection and reads the replies in order
// through a reader of its own, then sends the body and the final dot and
// reads the last reply. It runs only between go-smtp calls, when neither
// side holds buffered bytes: go-smtp has flushed its writer (every
// command is flushed before its reply is read) and sdReadTracker proves
// that go-smtp's reader consumed everything it read (its last read ended
// with the one final reply line go-smtp was waiting for). After the
// transaction the reader of our own must be empty too, or the connection
// is not reused. Everything else (greeting, EHLO, STARTTLS, AUTH, RSET,
// NOOP, QUIT) stays with go-smtp, and so does the whole transaction when
// PIPELINING is not advertised.

// sdReadTracker sits between go-smtp's client and the connection and
// watches the reply lines go-smtp reads.
type sdReadTracker struct {
	net.Conn
	head      [4]byte // the first bytes of the line being read
	hn        int     // bytes of that line seen so far
	lastFinal bool    // the last complete line was a final reply line
	clean     bool    // see drained
}

func (t *sdReadTracker) Read(p []byte) (int, error) {
	n, err := t.Conn.Read(p)
	if n > 0 {
		finals := 0
		for _, b := range p[:n] {
			if b == '\n' {
				// "250 text", "250" or "250\r": a final line; "250-" goes on.
				t.lastFinal = t.hn >= 3 && (t.hn == 3 || t.head[3] == ' ' || t.head[3] == '\r')
				if t.lastFinal {
					finals++
				}
				t.hn = 0
				continue
			}
			if t.hn < len(t.head) {
				t.head[t.hn] = b
			}
			t.hn++
		}
		t.clean = t.hn == 0 && t.lastFinal && finals == 1
	}
	return n, err
}

// drained reports whether go-smtp's reader provably holds no unread
// bytes: its last read ended with a final reply line and held no other
// final line. go-smtp reads only when it needs more of the reply it waits
// for, so everything before that line was consumed, and it read replies
// up to a final line, so it consumed that line too.
func (t *sdReadTracker) drained() bool { return t.clean }

// sdLineLimit fails a read once a reply line grows past limit bytes, as
// go-smtp's client does (RFC 5321 §4.5.3.1.6 doubled).
type sdLineLimit struct {
	r     io.Reader
	limit int
	cur   int
}

var errSDLineTooLong = errors.New("smtp: reply line too long")

func (l *sdLineLimit) Read(p []byte) (int, error) {
	if l.cur > l.limit {
		return 0, errSDLineTooLong
	}
	n, err := l.r.Read(p)
	for _, b := range p[:n] {
		if b == '\n' {
			l.cur = 0
		} else if l.cur++; l.cur > l.limit {
			return n, errSDLineTooLong
		}
	}
	return n, err
}

// pipeReader returns the reader the pipelined transactions of c read
// replies with, created once the connection's TLS state is final.
func (c *sdConn) pipeReader() *textproto.Reader {
	if c.pbr == nil {
		c.pbr = bufio.NewReaderSize(&sdLineLimit{r: c.wconn, limit: 2000}, 4096)
		c.ptr = textproto.NewReader(c.pbr)
	}
	return c.ptr
}

// canPipeline reports whether the next transaction on c may be pipelined.
func (c *sdConn) canPipeline() bool {
	return c.ext.pipelining && c.rt.drained() && (c.pbr == nil || c.pbr.Buffered() == 0)
}

// sdReadReply reads one reply as go-smtp's client does: a code other than
// expect (textproto's rules: 25 matches 250 to 259) comes back as an
// *smtp.SMTPError with the enhanced code split off; other errors are
// network or protocol errors.
func sdReadReply(r *textproto.Reader, expect int) (int, string, error) {
	code, msg, err := r.ReadResponse(expect)
	var pe *textproto.Error
	if errors.As(err, &pe) {
		return code, msg, sdSMTPErr(pe)
	}
	return code, msg, err
}

// sdSMTPErr is go-smtp's (v0.25.1) toSMTPErr: the error its client
// returns for a reply it did not expect.
func sdSMTPErr(pe *textproto.Error) *smtp.SMTPError {
	e := &smtp.SMTPError{Code: pe.Code, Message: pe.Msg}
	first, rest, ok := strings.Cut(pe.Msg, " ")
	if !ok {
		return e
	}
	parts := strings.Split(first, ".")
	if len(parts) != 3 {
		return e
	}
	var enh smtp.EnhancedCode
	for i, p := range parts {
		n, err := strconv.Atoi(p)
		if err != nil {
			return e
		}
		enh[i] = n
	}
	// Per RFC 2034, the enhanced code prefixes every line.
	e.EnhancedCode = enh
	e.Message = strings.ReplaceAll(rest, "\n"+first+" ", "\n")
	return e
}

// transactPipelined runs the transaction of transact over a server that
// advertised PIPELINING: cmds holds MAIL, the RCPTs and DATA. It keeps
// transact's semantics reply for reply, through the same sdTx steps.
func (d *SMTPDeliverer) transactPipelined(ctx context.Context, tx *sdTx, del *Delivery, cmds []byte, log *slog.Logger) *sdOutcome {
	t := d.cfg.Timeouts
	c, out, host := tx.c, tx.out, tx.host
	r := c.pipeReader()
	// Each reply gets the full command timeout (RFC 5321 §4.5.3.2), as
	// in lockstep, however long the replies before it took.
	next := func(timeout time.Duration) { c.raw.SetReadDeadline(time.Now().Add(timeout)) }
	// Hand the connection back to go-smtp (RSET) only with nothing left
	// unread; otherwise the session is out of step and is not reused.
	reset := func() {
		c.client.CommandTimeout = t.Command
		if c.pbr.Buffered() > 0 || c.client.Reset() != nil {
			out.broken = true
		}
	}
	defer c.raw.SetDeadline(time.Time{})
	// Whatever the path: a reply left unread (more replies than
	// commands) means the session is out of step; it is never reused.
	defer func() {
		if c.pbr.Buffered() > 0 {
			out.broken = true
		}
	}()

	c.raw.SetDeadline(time.Now().Add(t.Command))
	if _, err := c.wconn.Write(cmds); err != nil {
		return tx.lost("after MAIL", err)
	}

	// MAIL.
	_, _, err := sdReadReply(r, 250)
	if err != nil {
		rep, done := tx.refused("after MAIL", err)
		if done != nil {
			return done
		}
		fillReplies(out.replies, rep)
		// The RCPTs and DATA were sent regardless: read their refusals
		// so the session stays in step. A server that refused MAIL and
		// then takes DATA is out of step: the connection is dropped
		// rather than risk an empty message.
		for range del.Rcpts {
			next(t.Command)
			if _, _, err := sdReadReply(r, 25); err != nil && remoteError(err) == nil {
				out.broken = true
				return out
			}
		}
		next(t.DataInit)
		if _, _, err := sdReadReply(r, 354); !sdRefusedInStep(err) {
			out.broken = true
		}
		return out
	}
	tx.decided = true

	// RCPTs.
	for i := range del.Rcpts {
		next(t.Command)
		_, _, err := sdReadReply(r, 25)
		if done := tx.rcpt(i, err); done != nil {
			return done
		}
	}

	// DATA.
	next(t.DataInit)
	if tx.accepted == 0 {
		// RFC 2920 §3.1: DATA is refused, or, by a server that answers
		// DATA without looking back, accepted and ended at once.
		if !d.pipeEndRefusedData(c, r) {
			out.broken = true
			return out
		}
		reset()
		return out
	}
	_, _, err = sdReadReply(r, 354)
	if err != nil {
		rep, done := tx.refused("after DATA", err)
		if done != nil {
			return done
		}
		out.settleAccepted(rep, false)
		reset()
		return out
	}
	if c.pbr.Buffered() > 0 {
		return tx.lost("after DATA", errors.New("unexpected data after the 354 reply"))
	}

	body, err := del.Open(ctx)
	if err == nil {
		// copyBody leaves out the body's own final line end and sends
		// this instead, with the last block: it is what go-smtp's
		// untouched DotWriter writes on Close.
		err = d.copyBody(c, body, "\r\n.\r\n")
		body.Close()
	}
	if err != nil {
		return tx.bodyFailed(err, log)
	}

	c.raw.SetReadDeadline(time.Now().Add(t.DataEnd))
	_, msg, err := sdReadReply(r, 250)
	return tx.final(replyOK(msg, host), err)
}

// pipeEndRefusedData reads the reply to a pipelined DATA that had no
// recipient: a refusal, or a 354 that is then answered with an empty
// body (RFC 2920 §3.1) whose reply is read and ignored. It reports
// whether the session is still in step (and open).
func (d *SMTPDeliverer) pipeEndRefusedData(c *sdConn, r *textproto.Reader) bool {
	_, _, err := sdReadReply(r, 354)
	if err != nil {
		return sdRefusedInStep(err)
	}
	if c.pbr.Buffered() > 0 {
		return false
	}
	c.raw.SetWriteDeadline(time.Now().Add(d.cfg.Timeouts.DataBlock))
	if _, err := c.wconn.Write([]byte(".\r\n")); err != nil {
		return false
	}
	c.raw.SetReadDeadline(time.Now().Add(d.cfg.Timeouts.DataEnd))
	_, _, err = sdReadReply(r, 250)
	return err == nil || sdRefusedInStep(err)
}

// sdRefusedInStep reports whether err is a refusal after which the
// session goes on: a 4xx or 5xx reply other than 421 (the server closing
// the connection), not a network or protocol error.
func sdRefusedInStep(err error) bool {
	se := remoteError(err)
	return se != nil && se.Code != 421
}

// sdPipeCmds appends MAIL, one RCPT per recipient and DATA to dst, each
// formatted byte for byte as go-smtp's client formats it for a server
// with ext. An error (a CR or LF in an address, a parameter go-smtp
// would refuse) leaves the transaction to go-smtp, which fails it as
// today.
func sdPipeCmds(dst []byte, from string, mo *smtp.MailOptions, rcpts []queue.Recipient, ext sdExt) ([]byte, error) {
	dst, err := sdMailCmd(dst, from, mo, ext)
	if err != nil {
		return dst, err
	}
	for _, rc := range rcpts {
		if dst, err = sdRcptCmd(dst, rc.Addr, rcptOptions(rc), ext); err != nil {
			return dst, err
		}
	}
	return append(dst, "DATA\r\n"...), nil
}

var errSDLine = errors.New("smtp: a line must not contain CR or LF")

// sdMailCmd appends the MAIL command line of go-smtp's (v0.25.1)
// Client.Mail.
func sdMailCmd(dst []byte, from string, o *smtp.MailOptions, ext sdExt) ([]byte, error) {
	if strings.ContainsAny(from, "\r\n") {
		return dst, errSDLine
	}
	if o == nil {
		o = &smtp.MailOptions{}
	}
	dst = append(dst, "MAIL FROM:<"...)
	dst = append(dst, from...)
	dst = append(dst, '>')
	if ext.eightBit {
		// go-smtp declares 8BITMIME whenever the server offers it.
		dst = append(dst, " BODY=8BITMIME"...)
	}
	if ext.size && o.Size != 0 {
		dst = append(dst, " SIZE="...)
		dst = strconv.AppendInt(dst, o.Size, 10)
	}
	if o.RequireTLS {
		if !ext.requireTLS {
			return dst, errors.New("smtp: server does not support REQUIRETLS")
		}
		dst = append(dst, " REQUIRETLS"...)
	}
	if o.UTF8 {
		if !ext.smtputf8 {
			return dst, errors.New("smtp: server does not support SMTPUTF8")
		}
		dst = append(dst, " SMTPUTF8"...)
	}
	if ext.dsn {
		switch o.Return {
		case smtp.DSNReturnFull, smtp.DSNReturnHeaders:
			dst = append(dst, " RET="...)
			dst = append(dst, o.Return...)
		case "":
		default:
			return dst, errors.New("smtp: Unknown RET parameter value")
		}
		if o.EnvelopeID != "" {
			if !sdGoPrintable(o.EnvelopeID) {
				return dst, errors.New("smtp: Malformed ENVID parameter value")
			}
			dst = append(dst, " ENVID="...)
			dst = sdXtext(dst, o.EnvelopeID)
		}
	}
	if o.Auth != nil {
		// Never set by the deliverer; leave such a transaction to go-smtp.
		return dst, errors.New("relay: MAIL AUTH= is not pipelined")
	}
	return append(dst, "\r\n"...), nil
}

// sdRcptCmd appends the RCPT command line of go-smtp's (v0.25.1)
// Client.Rcpt for the options rcptOptions sets.
func sdRcptCmd(dst []byte, to string, o *smtp.RcptOptions, ext sdExt) ([]byte, error) {
	if strings.ContainsAny(to, "\r\n") {
		return dst, errSDLine
	}
	if o == nil {
		o = &smtp.RcptOptions{}
	}
	if !o.RequireRecipientValidSince.IsZero() || o.DeliverBy != nil || o.MTPriority != nil {
		return dst, errors.New("relay: RRVS, BY and MT-PRIORITY are not pipelined")
	}
	dst = append(dst, "RCPT TO:<"...)
	dst = append(dst, to...)
	dst = append(dst, '>')
	if ext.dsn {
		if len(o.Notify) != 0 {
			if !sdNotifyValid(o.Notify) {
				return dst, errors.New("smtp: Malformed NOTIFY parameter value")
			}
			dst = append(dst, " NOTIFY="...)
			for i, v := range o.Notify {
				if i != 0 {
					dst = append(dst, ',')
				}
				dst = append(dst, v...)
			}
		}
		if o.OriginalRecipient != "" {
			var enc []byte
			switch o.OriginalRecipientType {
			case smtp.DSNAddressTypeRFC822:
				if !sdGoPrintable(o.OriginalRecipient) {
					return dst, errors.New("smtp: Illegal address")
				}
				enc = sdXtext(nil, o.OriginalRecipient)
			case smtp.DSNAddressTypeUTF8:
				enc = sdUTF8AddrText(nil, o.OriginalRecipient, ext.smtputf8)
			default:
				return dst, errors.New("smtp: Unknown address type")
			}
			dst = append(dst, " ORCPT="...)
			dst = append(dst, o.OriginalRecipientType...)
			dst = append(dst, ';')
			dst = append(dst, enc...)
		}
	}
	return append(dst, "\r\n"...), nil
}

// sdGoPrintable is go-smtp's isPrintableASCII (space included).
func sdGoPrintable(s string) bool {
	for _, ch := range s {
		if ch < ' ' || '~' < ch {
			return false
		}
	}
	return true
}

// sdNotifyValid is go-smtp's checkNotifySet: known values, no repeats,
// NEVER alone.
func sdNotifyValid(vs []smtp.DSNNotify) bool {
	seen := 0
	for _, v := range vs {
		b := 0
		switch v {
		case smtp.DSNNotifyNever:
			b = 1
		case smtp.DSNNotifyDelayed:
			b = 2
		case smtp.DSNNotifyFailure:
			b = 4
		case smtp.DSNNotifySuccess:
			b = 8
		}
		if b == 0 || seen&b != 0 {
			return false
		}
		seen |= b
	}
	return seen != 0 && (seen&1 == 0 || seen == 1)
}

// sdXtext appends the RFC 3461 xtext of s, as go-smtp's encodeXtext.
func sdXtext(dst []byte, s string) []byte {
	for _, ch := range s {
		if ch >= '!' && ch <= '~' && ch != '+' && ch != '=' {
			dst = append(dst, byte(ch))
			continue
		}
		dst = append(dst, '+')
		dst = append(dst, strings.ToUpper(strconv.FormatInt(int64(ch), 16))...)
	}
	return dst
}

// sdUTF8AddrText appends the RFC 6533 utf-8-addr-unitext (unicode, for
// an SMTPUTF8 server) or utf-8-addr-xtext form of s, as go-smtp's
// encodeUTF8AddrUnitext and encodeUTF8AddrXtext.
func sdUTF8AddrText(dst []byte, s string, unicode bool) []byte {
	for _, ch := range s {
		switch {
		case ch >= '!' && ch <= '~' && ch != '+' && ch != '=':
			dst = append(dst, byte(ch))
		case unicode && ch > '\x7F':
			dst = append(dst, string(ch)...)
		default:
			dst = append(dst, `\x{`...)
			dst = append(dst, strings.ToUpper(strconv.FormatInt(int64(ch), 16))...)
			dst = append(dst, '}')
		}
	}
	return dst
}
