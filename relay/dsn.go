package relay

import (
	"bytes"
	"crypto/rand"
	"encoding/base32"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/batonmail/baton/queue"
)

// DSNKind says which delivery status notification to build.
type DSNKind int

// DSN kinds. Each is sent only to senders whose NOTIFY parameter asks for
// it (RFC 3461 §4.1); an absent NOTIFY asks for failures and delays.
const (
	// DSNFailure reports recipients that failed permanently or expired
	// (Action: failed). Requested by NOTIFY=FAILURE.
	DSNFailure DSNKind = iota + 1
	// DSNDelay reports recipients still being retried (Action: delayed).
	// Requested by NOTIFY=DELAY.
	DSNDelay
	// DSNSuccess reports final delivery (Action: delivered): use it when
	// the relay itself delivered the message into a mailbox. Requested by
	// NOTIFY=SUCCESS.
	DSNSuccess
	// DSNRelayed reports that the message was handed to a next-hop SMTP
	// server that does not offer the DSN extension and so will not confirm
	// delivery itself (Action: relayed, RFC 3461 §6.2.4.2). It is what a
	// relay sends for NOTIFY=SUCCESS in that case; when the next hop does
	// offer DSN, the request is passed on and no notification is due here.
	DSNRelayed
)

// String returns the kind's name in lower case ("failure", "delay"...).
func (k DSNKind) String() string {
	switch k {
	case DSNFailure:
		return "failure"
	case DSNDelay:
		return "delay"
	case DSNSuccess:
		return "success"
	case DSNRelayed:
		return "relayed"
	}
	return "DSNKind(" + strconv.Itoa(int(k)) + ")"
}

// DefaultDSNMaxReturn is the largest original message a DSN returns in
// full when no MaxReturnBytes is configured.
const DefaultDSNMaxReturn = 10 << 20

// DSNConfig configures BuildDSN. The zero value means defaults.
type DSNConfig struct {
	// ReportingMTA is the host name that reports (the Reporting-MTA field,
	// the Message-ID domain and the default From); default os.Hostname,
	// or "localhost".
	ReportingMTA string
	// From is the header From of DSNs: an address ("MAILER-DAEMON@host",
	// given the display name "Mail Delivery System") or a complete
	// mailbox with display name ("Postmaster <postmaster@host>"). Default
	// MAILER-DAEMON@ReportingMTA.
	From string
	// MaxReturnBytes caps the size of an original returned in full for
	// RET=FULL; a larger original is returned as its header only, and the
	// text says so. 0 means DefaultDSNMaxReturn; negative never returns
	// the full message.
	MaxReturnBytes int64
	// Now returns the current time; nil means time.Now. Tests inject a
	// fixed clock here.
	Now func() time.Time
	// Random supplies the bytes for the MIME boundary and the Message-ID;
	// nil means crypto/rand. Tests inject a fixed source for golden files.
	Random io.Reader
}

func (c DSNConfig) withDefaults() DSNConfig {
	if c.ReportingMTA == "" {
		c.ReportingMTA, _ = os.Hostname()
		if c.ReportingMTA == "" {
			c.ReportingMTA = "localhost"
		}
	}
	c.ReportingMTA = dsnOneLine(c.ReportingMTA, 255)
	if c.From == "" {
		c.From = "MAILER-DAEMON@" + c.ReportingMTA
	}
	c.From = dsnOneLine(c.From, 255)
	if !strings.Contains(c.From, "<") {
		c.From = "Mail Delivery System <" + c.From + ">"
	}
	if c.MaxReturnBytes == 0 {
		c.MaxReturnBytes = DefaultDSNMaxReturn
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Random == nil {
		c.Random = rand.Reader
	}
	return c
}

// dsnWanted reports whether a recipient's NOTIFY parameter asks for kind.
func dsnWanted(n queue.Notify, kind DSNKind) bool {
	if n&queue.NotifyNever != 0 {
		return false
	}
	if n == 0 {
		return kind == DSNFailure || kind == DSNDelay
	}
	switch kind {
	case DSNFailure:
		return n&queue.NotifyFailure != 0
	case DSNDelay:
		return n&queue.NotifyDelay != 0
	case DSNSuccess, DSNRelayed:
		return n&queue.NotifySuccess != 0
	}
	return false
}

// DSNDue reports whether BuildDSN would build a notification of kind for
// msg and rcpts: the sender is not null and at least one recipient's
// NOTIFY asks for kind.
func DSNDue(msg *queue.Message, rcpts []queue.RecipientStatus, kind DSNKind) bool {
	if msg == nil || msg.Envelope.From == "" {
		return false
	}
	for _, r := range rcpts {
		if dsnWanted(r.Notify, kind) {
			return true
		}
	}
	return false
}

var dsnB32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// BuildDSN builds a delivery status notification (RFC 3464) of kind about
// rcpts, recipients of msg, to msg's envelope sender.
//
// It returns env == nil and no error when no notification is due: the
// original sender is null (a bounce is never bounced), or no recipient in
// rcpts asked for kind with its NOTIFY parameter (recipients that did not
// ask are left out of the report). Otherwise env has the null sender and
// the original sender as its only recipient (with NOTIFY=NEVER), and body
// streams the message:
//
//   - a header with From, To, Subject, Date, Message-ID,
//     Auto-Submitted: auto-replied (RFC 3834) and MIME-Version;
//   - multipart/report; report-type=delivery-status (RFC 6522) made of a
//     text/plain explanation naming each recipient and the reply that
//     decided it; a message/delivery-status part (RFC 3464) with
//     Reporting-MTA, Original-Envelope-Id, Arrival-Date and, per
//     recipient, Original-Recipient, Final-Recipient, Action, Status,
//     Remote-MTA, Diagnostic-Code, Last-Attempt-Date and, for delays,
//     Will-Retry-Until; and the original as message/rfc822 for failures
//     with RET=FULL (when it is at most MaxReturnBytes), otherwise its
//     header only as text/rfc822-headers. A nil original leaves the third
//     part out.
//
// Status is the reply's enhanced code when it has one of the right class,
// else derived from the basic code (550 → 5.0.0). An expired recipient
// gets Action failed with Status 4.4.7, "delivery time expired": RFC 3463
// §3.5 says 4.4.7 is meaningful only as a persistent transient failure, and
// the 4.X.X class covers a message abandoned after persistent temporary
// failures; its Diagnostic-Code is the last reply received. Diagnostic-Code
// uses the "smtp" type for replies from a remote host, and "X-Baton" for
// local decisions (connection failures, suppression), which no server
// sent.
//
// When the envelope is SMTPUTF8 or an address is not ASCII, the report
// follows RFC 6533 (message/global-delivery-status, utf-8 address types,
// message/global or message/global-headers) and env.SMTPUTF8 is set;
// otherwise non-ASCII text in replies is replaced by '?'. The original is
// copied byte for byte except that line endings are normalised to CRLF.
//
// body reads original lazily: the caller keeps original open until body
// has been read to the end (typically until Enqueue returns) and closes it
// afterwards. Memory use does not depend on the size of the original.
func BuildDSN(cfg DSNConfig, msg *queue.Message, rcpts []queue.RecipientStatus, kind DSNKind, original io.Reader) (env *queue.Envelope, body io.Reader, err error) {
	if msg == nil {
		return nil, nil, errors.New("relay: BuildDSN: nil message")
	}
	if kind < DSNFailure || kind > DSNRelayed {
		return nil, nil, fmt.Errorf("relay: BuildDSN: unknown kind %d", int(kind))
	}
	if msg.Envelope.From == "" {
		return nil, nil, nil
	}
	var list []queue.RecipientStatus
	for _, r := range rcpts {
		if dsnWanted(r.Notify, kind) {
			list = append(list, r)
		}
	}
	if len(list) == 0 {
		return nil, nil, nil
	}
	cfg = cfg.withDefaults()
	now := cfg.Now()

	var rnd [25]byte
	if _, err := io.ReadFull(cfg.Random, rnd[:]); err != nil {
		return nil, nil, fmt.Errorf("relay: BuildDSN: random: %w", err)
	}
	boundary := "=_" + dsnB32.EncodeToString(rnd[:15])
	msgID := strings.ToLower(dsnB32.EncodeToString(rnd[15:]))

	global := msg.Envelope.SMTPUTF8 || !isASCII(msg.Envelope.From) || !isASCII(cfg.ReportingMTA)
	for _, r := range list {
		if !isASCII(r.Addr) || !isASCII(r.ORCPT) {
			global = true
		}
	}
	text := func(s string, max int) string {
		s = dsnOneLine(s, max)
		if !global {
			s = dsnASCIIOnly(s)
		}
		return s
	}

	// Which form of the original goes into the third part.
	full := kind == DSNFailure && msg.Envelope.Ret == queue.RetFull && cfg.MaxReturnBytes > 0 && msg.Size <= cfg.MaxReturnBytes
	tooBig := kind == DSNFailure && msg.Envelope.Ret == queue.RetFull && !full
	eightBit := global || msg.Envelope.EightBit

	var b bytes.Buffer
	b.Grow(2048 + 512*len(list))

	// Top-level header.
	subject := map[DSNKind]string{
		DSNFailure: "Undelivered Mail Returned to Sender",
		DSNDelay:   "Delayed Mail (still being retried)",
		DSNSuccess: "Successful Mail Delivery Report",
		DSNRelayed: "Successful Mail Delivery Report",
	}[kind]
	dsnWriteField(&b, "From", cfg.From)
	dsnWriteField(&b, "To", "<"+text(msg.Envelope.From, 900)+">")
	dsnWriteField(&b, "Subject", subject)
	dsnWriteField(&b, "Date", now.Format(time.RFC1123Z))
	dsnWriteField(&b, "Message-ID", "<dsn."+msgID+"@"+cfg.ReportingMTA+">")
	dsnWriteField(&b, "Auto-Submitted", "auto-replied")
	dsnWriteField(&b, "MIME-Version", "1.0")
	dsnWriteField(&b, "Content-Type", `multipart/report; report-type=delivery-status; boundary="`+boundary+`"`)
	b.WriteString("\r\nThis is a MIME-encapsulated message.\r\n")

	// Part 1: the explanation for people.
	b.WriteString("\r\n--" + boundary + "\r\n")
	cte := "7bit"
	if global {
		cte = "8bit"
	}
	dsnWriteField(&b, "Content-Type", "text/plain; charset=utf-8")
	dsnWriteField(&b, "Content-Transfer-Encoding", cte)
	dsnWriteField(&b, "Content-Description", "Notification")
	b.WriteString("\r\n")
	fmt.Fprintf(&b, "This is the mail delivery system at %s.\r\n\r\n", cfg.ReportingMTA)
	switch kind {
	case DSNFailure:
		b.WriteString("Your message could not be delivered to the recipients below.\r\nNo further attempts will be made.\r\n")
	case DSNDelay:
		b.WriteString("Your message has not yet been delivered to the recipients below.\r\n")
		if !msg.Expires.IsZero() {
			fmt.Fprintf(&b, "Delivery will be retried until %s;\r\nyou do not need to send it again.\r\n", msg.Expires.Format(time.RFC1123Z))
		}
	case DSNSuccess:
		b.WriteString("Your message was delivered to the recipients below.\r\n")
	case DSNRelayed:
		b.WriteString("Your message was passed on to the recipients' mail servers below.\r\nThose servers do not confirm delivery, so this is the last report\r\nyou will receive about it.\r\n")
	}
	for _, r := range list {
		b.WriteString("\r\n<" + text(r.Addr, 900) + ">: ")
		status := dsnStatus(kind, &r)
		switch {
		case kind == DSNFailure && r.Expired:
			fmt.Fprintf(&b, "delivery time expired (%s)", status)
			if r.Attempts > 0 {
				fmt.Fprintf(&b, " after %d attempt(s)", r.Attempts)
			}
		case kind == DSNFailure:
			fmt.Fprintf(&b, "permanent failure (%s)", status)
		case kind == DSNDelay:
			fmt.Fprintf(&b, "delayed (%s)", status)
			if r.Attempts > 0 {
				fmt.Fprintf(&b, " after %d attempt(s)", r.Attempts)
			}
		case kind == DSNSuccess:
			fmt.Fprintf(&b, "delivered (%s)", status)
		case kind == DSNRelayed:
			fmt.Fprintf(&b, "relayed (%s)", status)
		}
		b.WriteString("\r\n")
		if r.Last.Code != 0 || r.Last.Text != "" {
			rep := r.Last
			rep.Host = ""
			rep.Text = text(rep.Text, 900)
			who := "    The reply was: "
			switch {
			case r.Last.Host != "" && r.Expired:
				who = "    The last reply, from " + text(r.Last.Host, 255) + ", was: "
			case r.Last.Host != "":
				who = "    " + text(r.Last.Host, 255) + " said: "
			case r.Expired:
				who = "    The last error was: "
			}
			dsnWrapText(&b, who, rep.String())
		}
	}
	fmt.Fprintf(&b, "\r\nThe message was received on %s from <%s>", msg.Received.Format(time.RFC1123Z), text(msg.Envelope.From, 900))
	if msg.ID != "" {
		fmt.Fprintf(&b, "\r\nwith queue ID %s", text(string(msg.ID), 100))
	}
	b.WriteString(".\r\n")
	switch {
	case original == nil:
	case full:
		b.WriteString("The original message is attached.\r\n")
	case tooBig:
		fmt.Fprintf(&b, "The original message (%d bytes) is too large to return in full;\r\nonly its header is attached.\r\n", msg.Size)
	default:
		b.WriteString("The header of the original message is attached.\r\n")
	}

	// Part 2: the machine-readable report.
	b.WriteString("\r\n--" + boundary + "\r\n")
	if global {
		dsnWriteField(&b, "Content-Type", "message/global-delivery-status")
	} else {
		dsnWriteField(&b, "Content-Type", "message/delivery-status")
	}
	dsnWriteField(&b, "Content-Description", "Delivery report")
	if global {
		dsnWriteField(&b, "Content-Transfer-Encoding", "8bit")
	}
	b.WriteString("\r\n")
	dsnWriteField(&b, "Reporting-MTA", "dns; "+cfg.ReportingMTA)
	if msg.Envelope.EnvID != "" {
		dsnWriteField(&b, "Original-Envelope-Id", text(msg.Envelope.EnvID, 200))
	}
	if !msg.Received.IsZero() {
		dsnWriteField(&b, "Arrival-Date", msg.Received.Format(time.RFC1123Z))
	}
	for _, r := range list {
		b.WriteString("\r\n")
		if r.ORCPT != "" {
			typ, addr, ok := strings.Cut(r.ORCPT, ";")
			if !ok {
				typ, addr = "rfc822", r.ORCPT
			}
			dsnWriteField(&b, "Original-Recipient", text(strings.TrimSpace(typ), 40)+"; "+text(strings.TrimSpace(addr), 900))
		}
		addrType := "rfc822"
		if !isASCII(r.Addr) {
			addrType = "utf-8"
		}
		dsnWriteField(&b, "Final-Recipient", addrType+"; "+text(r.Addr, 900))
		dsnWriteField(&b, "Action", dsnAction(kind))
		dsnWriteField(&b, "Status", dsnStatus(kind, &r))
		if r.Last.Host != "" {
			dsnWriteField(&b, "Remote-MTA", "dns; "+text(r.Last.Host, 255))
		}
		if r.Last.Code != 0 {
			rep := r.Last
			rep.Host = ""
			rep.Text = text(rep.Text, 900)
			typ := "smtp"
			if r.Last.Host == "" {
				typ = "X-Baton"
			}
			dsnWriteField(&b, "Diagnostic-Code", typ+"; "+rep.String())
		}
		if t := dsnLastAttempt(&r, now); !t.IsZero() {
			dsnWriteField(&b, "Last-Attempt-Date", t.Format(time.RFC1123Z))
		}
		if kind == DSNDelay && !msg.Expires.IsZero() {
			dsnWriteField(&b, "Will-Retry-Until", msg.Expires.Format(time.RFC1123Z))
		}
	}

	env = &queue.Envelope{
		From:       "",
		To:         []queue.Recipient{{Addr: msg.Envelope.From, Notify: queue.NotifyNever}},
		SMTPUTF8:   global,
		EightBit:   eightBit,
		RequireTLS: msg.Envelope.RequireTLS,
	}

	if original == nil {
		b.WriteString("\r\n--" + boundary + "--\r\n")
		return env, &b, nil
	}

	// Part 3: the original, or its header.
	b.WriteString("\r\n--" + boundary + "\r\n")
	var orig io.Reader = newDSNCRLFReader(original)
	switch {
	case full && global:
		dsnWriteField(&b, "Content-Type", "message/global")
	case full:
		dsnWriteField(&b, "Content-Type", "message/rfc822")
	case global:
		dsnWriteField(&b, "Content-Type", "message/global-headers")
	default:
		dsnWriteField(&b, "Content-Type", "text/rfc822-headers")
	}
	if full {
		dsnWriteField(&b, "Content-Description", "Undelivered Message")
	} else {
		dsnWriteField(&b, "Content-Description", "Undelivered Message Headers")
		orig = &dsnHeaderReader{r: orig, lineStart: true}
	}
	if eightBit {
		dsnWriteField(&b, "Content-Transfer-Encoding", "8bit")
	}
	b.WriteString("\r\n")
	// The original ends with CRLF (the reader guarantees it); the CRLF
	// before the closing delimiter belongs to the delimiter (RFC 2046
	// §5.1.1), so one more is written and the part's content is the
	// original exactly.
	return env, io.MultiReader(&b, orig, strings.NewReader("\r\n--"+boundary+"--\r\n")), nil
}

func dsnAction(kind DSNKind) string {
	switch kind {
	case DSNFailure:
		return "failed"
	case DSNDelay:
		return "delayed"
	case DSNSuccess:
		return "delivered"
	}
	return "relayed"
}

// dsnStatus returns the RFC 3463 status of r for a DSN of kind: 4.4.7 for
// expiry, else the reply's enhanced code when its class matches both the
// basic code and the action, else one derived from them.
func dsnStatus(kind DSNKind, r *queue.RecipientStatus) string {
	if kind == DSNFailure && r.Expired {
		return "4.4.7"
	}
	class := r.Last.Code / 100
	// Classes an action may carry: delays are transient, successes are
	// successes, failures are permanent or persistent transient.
	fits := func(c int) bool {
		switch kind {
		case DSNFailure:
			return c == 5 || c == 4
		case DSNDelay:
			return c == 4
		}
		return c == 2
	}
	if e, ok := dsnParseEnhanced(r.Last.Enhanced); ok && (class == 0 || e[0] == class) && fits(e[0]) {
		return r.Last.Enhanced
	}
	if fits(class) {
		return strconv.Itoa(class) + ".0.0"
	}
	switch kind {
	case DSNFailure:
		return "5.0.0"
	case DSNDelay:
		return "4.0.0"
	}
	return "2.0.0"
}

// dsnLastAttempt is when r was last tried: the newest history entry when it
// recorded r's last reply, else now for a recipient with a reply (the
// relay builds DSNs right after the attempt, before the queue records it).
func dsnLastAttempt(r *queue.RecipientStatus, now time.Time) time.Time {
	if n := len(r.History); n > 0 && r.History[n-1].Reply == r.Last {
		return r.History[n-1].At
	}
	if r.Last.Code != 0 || r.Last.Text != "" {
		return now
	}
	return time.Time{}
}

// dsnWriteField writes "Name: value" folded at spaces so that lines stay
// within 78 characters where the value allows it, ending with CRLF.
func dsnWriteField(b *bytes.Buffer, name, value string) {
	b.WriteString(name)
	b.WriteString(":")
	n := len(name) + 1
	first := true
	for w := range strings.FieldsSeq(value) {
		if !first && n+1+len(w) > 78 {
			b.WriteString("\r\n")
			n = 0
		}
		b.WriteByte(' ')
		b.WriteString(w)
		n += 1 + len(w)
		first = false
	}
	b.WriteString("\r\n")
}

// dsnWrapText writes prefix and s, wrapping s at spaces to about 76 columns,
// continuation lines indented by six spaces.
func dsnWrapText(b *bytes.Buffer, prefix, s string) {
	b.WriteString(prefix)
	n := len(prefix)
	first := true
	for w := range strings.FieldsSeq(s) {
		if !first && n+1+len(w) > 76 {
			b.WriteString("\r\n      ")
			n = 6
		} else if !first {
			b.WriteByte(' ')
			n++
		}
		b.WriteString(w)
		n += len(w)
		first = false
	}
	b.WriteString("\r\n")
}

func dsnASCIIOnly(s string) string {
	if isASCII(s) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if r >= utf8.RuneSelf {
			r = '?'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// dsnCRLFReader turns bare CR and bare LF into CRLF and makes sure non-empty
// input ends with CRLF. It allocates its buffers once.
type dsnCRLFReader struct {
	r       io.Reader
	in      []byte
	out     []byte
	pending []byte
	skipLF  bool // the previous input byte was CR, already written as CRLF
	last    byte // the last byte written
	wrote   bool // something was written
	err     error
}

func newDSNCRLFReader(r io.Reader) *dsnCRLFReader {
	const n = 4 << 10
	return &dsnCRLFReader{r: r, in: make([]byte, n), out: make([]byte, 0, 2*n+2)}
}

func (c *dsnCRLFReader) Read(p []byte) (int, error) {
	for len(c.pending) == 0 {
		if c.err != nil {
			return 0, c.err
		}
		n, err := c.r.Read(c.in)
		out := c.out[:0]
		in := c.in[:n]
		for len(in) > 0 {
			if c.skipLF && in[0] == '\n' {
				in = in[1:] // the LF of a CRLF whose CR was written as CRLF
				c.skipLF = false
				continue
			}
			c.skipLF = false
			i := bytes.IndexAny(in, "\r\n")
			if i < 0 {
				out = append(out, in...)
				break
			}
			out = append(out, in[:i]...)
			out = append(out, '\r', '\n')
			c.skipLF = in[i] == '\r'
			in = in[i+1:]
		}
		if len(out) > 0 {
			c.wrote, c.last = true, out[len(out)-1]
		}
		if err != nil {
			if err == io.EOF && c.wrote && c.last != '\n' {
				out = append(out, '\r', '\n')
				c.last = '\n'
			}
			c.err = err
		}
		c.pending = out
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// dsnHeaderReader passes its input (with CRLF line endings) up to, and not
// including, the empty line that ends the header, then reports EOF.
type dsnHeaderReader struct {
	r         io.Reader
	lineStart bool
	done      bool
}

func (h *dsnHeaderReader) Read(p []byte) (int, error) {
	if h.done {
		return 0, io.EOF
	}
	n, err := h.r.Read(p)
	for i := 0; i < n; i++ {
		if h.lineStart && p[i] == '\r' {
			h.done = true
			return i, nil
		}
		h.lineStart = p[i] == '\n'
	}
	return n, err
}
