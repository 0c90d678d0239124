package dkim

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-smtp"
)

// DefaultHeaders are the header fields signed when present (RFC 6376
// §5.4.1 and the MIME and threading fields), in the order they appear in
// h=. From is always signed, whatever the configuration.
var DefaultHeaders = []string{
	"From", "Sender", "Reply-To", "Subject", "Date", "Message-ID",
	"To", "Cc",
	"MIME-Version", "Content-Type", "Content-Transfer-Encoding",
	"Content-Disposition", "Content-Language",
	"In-Reply-To", "References",
	"Resent-Date", "Resent-From", "Resent-Sender", "Resent-To", "Resent-Cc", "Resent-Message-ID",
	"List-Id", "List-Help", "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe",
	"List-Post", "List-Owner", "List-Archive",
}

// DefaultOversign are the header fields that are signed once more than
// they occur (RFC 6376 §5.4.2, §8.15): a verifier then hashes an empty
// instance for the extra name, so a copy of the field added later, or
// added where there was none, breaks the signature. These are the fields a
// reader sees or that change how the body is shown.
var DefaultOversign = []string{
	"From", "Sender", "Reply-To", "Subject", "Date", "Message-ID",
	"To", "Cc",
	"MIME-Version", "Content-Type", "Content-Transfer-Encoding",
	"List-Unsubscribe", "List-Unsubscribe-Post",
}

// DefaultMaxHeaderBytes bounds the header section Sign keeps in memory.
const DefaultMaxHeaderBytes = 1 << 20

// lineWidth is the widest line (without CRLF) of a generated
// DKIM-Signature field, the RFC 5322 §2.1.1 recommendation.
const lineWidth = 78

// SignerConfig configures a Signer. Only Keys is required.
type SignerConfig struct {
	// Keys are the signing keys. A nil or empty store signs nothing.
	Keys *KeyStore
	// Headers lists the header fields to sign when present, in h= order;
	// nil means DefaultHeaders. From is added when missing.
	Headers []string
	// Oversign lists header fields signed one more time than they occur
	// (and so also when absent); nil means DefaultOversign, an empty
	// non-nil slice disables over-signing. Names missing from Headers are
	// added to it.
	Oversign []string
	// ParentDomains makes a From domain without keys of its own use the
	// keys of its nearest parent domain (never a top-level domain): with a
	// key for example.com, mail from news.example.com is signed with
	// d=example.com, which DMARC relaxed alignment accepts.
	ParentDomains bool
	// Expiration, when positive, sets x= to the signing time plus
	// Expiration (RFC 6376 §3.5). Zero means no expiry.
	Expiration time.Duration
	// MaxHeaderBytes caps the header section of a message; a larger
	// header fails Sign with a 552 5.3.4 error. 0 means
	// DefaultMaxHeaderBytes.
	MaxHeaderBytes int
	// Now returns the signing time (t=); nil means time.Now.
	Now func() time.Time
	// Logger receives a debug line per message; nil discards.
	Logger *slog.Logger
}

// Signer adds DKIM signatures to messages. It is safe for concurrent use.
type Signer struct {
	keys      *KeyStore
	headers   []string // lower case
	oversign  map[string]bool
	parents   bool
	expire    time.Duration
	maxHeader int
	now       func() time.Time
	log       *slog.Logger
}

// NewSigner returns a Signer for cfg.
func NewSigner(cfg SignerConfig) (*Signer, error) {
	s := &Signer{
		keys:      cfg.Keys,
		oversign:  make(map[string]bool),
		parents:   cfg.ParentDomains,
		expire:    cfg.Expiration,
		maxHeader: cfg.MaxHeaderBytes,
		now:       cfg.Now,
		log:       cfg.Logger,
	}
	if s.maxHeader <= 0 {
		s.maxHeader = DefaultMaxHeaderBytes
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.expire < 0 {
		return nil, errors.New("dkim: negative Expiration")
	}
	headers := cfg.Headers
	if headers == nil {
		headers = DefaultHeaders
	}
	oversign := cfg.Oversign
	if oversign == nil {
		oversign = DefaultOversign
	}
	seen := make(map[string]bool)
	add := func(name string) error {
		n := strings.ToLower(strings.TrimSpace(name))
		if n == "" || strings.ContainsAny(n, ": \t\r\n;") {
			return fmt.Errorf("dkim: invalid header field name %q", name)
		}
		if n == "dkim-signature" {
			return errors.New("dkim: DKIM-Signature cannot be signed")
		}
		if !seen[n] {
			seen[n] = true
			s.headers = append(s.headers, n)
		}
		return nil
	}
	if err := add("From"); err != nil {
		return nil, err
	}
	for _, h := range headers {
		if err := add(h); err != nil {
			return nil, err
		}
	}
	for _, h := range oversign {
		if err := add(h); err != nil {
			return nil, err
		}
		s.oversign[strings.ToLower(strings.TrimSpace(h))] = true
	}
	return s, nil
}

// Sign reads one whole RFC 5322 message (CRLF line endings) from msg,
// exactly once and to EOF, and returns the DKIM-Signature header fields to
// prepend to it: one per key of the signing domain, each CRLF-terminated
// and folded to lines of at most 78 characters. It returns nil, nil when
// no key applies (no From field, or no key for any From domain or, with
// ParentDomains, its parents).
//
// Only the header section is held in memory (up to MaxHeaderBytes); the
// body is streamed through the hash, once, however many keys sign. Since
// Sign consumes msg to EOF in every successful case, it can read from an
// io.TeeReader that spools the message at the same time.
//
// Signatures use relaxed/relaxed canonicalisation (RFC 6376 §3.4), SHA-256,
// no l= body length, and the configured header list with over-signing.
// They stay valid as long as the header fields and the body reach the
// verifier unchanged apart from white space in headers and at the ends of
// body lines.
//
// A header section larger than MaxHeaderBytes fails with a bare
// *smtp.SMTPError (552 5.3.4) that can be sent to the client as it is;
// read failures and ctx cancellation are returned wrapped.
func (s *Signer) Sign(ctx context.Context, msg io.Reader) ([]byte, error) {
	br := bufio.NewReaderSize(ctxReader{ctx: ctx, r: msg}, 32<<10)
	fields, err := readHeader(br, s.maxHeader)
	if err != nil {
		if errors.Is(err, errHeaderTooLarge) {
			return nil, &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4}, Message: "Message header too large"}
		}
		return nil, fmt.Errorf("dkim: read header: %w", err)
	}
	domains, nFrom := fromDomains(fields)
	var keys []*Key
	seen := make(map[string]bool)
	for _, d := range domains {
		for _, k := range s.keys.lookup(d, s.parents) {
			id := k.RecordName()
			if !seen[id] {
				seen[id] = true
				keys = append(keys, k)
			}
		}
	}
	if len(keys) == 0 {
		if _, err := io.Copy(io.Discard, br); err != nil {
			return nil, fmt.Errorf("dkim: read body: %w", err)
		}
		s.log.DebugContext(ctx, "dkim: not signing: no key for the From domain", "from_domains", domains)
		return nil, nil
	}
	if nFrom > 1 {
		s.log.WarnContext(ctx, "dkim: message has several From fields", "count", nFrom)
	}
	bh, err := bodyHash(br)
	if err != nil {
		return nil, err
	}
	now := s.now()
	hlist := s.headerList(fields)
	var out []byte
	for _, k := range keys {
		sig, err := s.signature(k, fields, hlist, bh, now)
		if err != nil {
			return nil, err
		}
		out = append(out, sig...)
		s.log.DebugContext(ctx, "dkim: signed", "domain", k.Domain, "selector", k.Selector, "type", k.Type())
	}
	return out, nil
}

// headerList returns the h= names for a message: each configured name as
// many times as it occurs, plus once more for over-signed names.
func (s *Signer) headerList(fields []field) []string {
	count := make(map[string]int)
	for _, f := range fields {
		count[f.name]++
	}
	var out []string
	for _, name := range s.headers {
		n := count[name]
		if s.oversign[name] {
			n++
		}
		for range n {
			out = append(out, name)
		}
	}
	return out
}

// signature builds and signs one DKIM-Signature field for key k.
func (s *Signer) signature(k *Key, fields []field, hlist []string, bh string, now time.Time) ([]byte, error) {
	algo := "rsa-sha256"
	hashOpt := crypto.Hash(crypto.SHA256)
	if k.Type() == Ed25519 {
		algo = "ed25519-sha256"
		hashOpt = 0 // PureEdDSA over the SHA-256 digest (RFC 8463 §3).
	}
	var f folder
	f.init("DKIM-Signature:")
	f.token(" v=1;")
	f.token(" a=" + algo + ";")
	f.token(" c=relaxed/relaxed;")
	f.token(" d=" + k.Domain + ";")
	f.token(" s=" + k.Selector + ";")
	f.token(" t=" + strconv.FormatInt(now.Unix(), 10) + ";")
	if s.expire > 0 {
		f.token(" x=" + strconv.FormatInt(now.Add(s.expire).Unix(), 10) + ";")
	}
	for i, name := range hlist {
		t := name
		if i == 0 {
			t = " h=" + t
		}
		if i == len(hlist)-1 {
			t += ";"
		} else {
			t += ":"
		}
		f.token(t)
	}
	f.token(" bh=" + bh + ";")
	f.newline()
	f.token(" b=")
	unsigned := f.String()

	// Hash the selected fields, bottom-up per name (RFC 6376 §5.4.2),
	// then the signature field itself with an empty b= and no CRLF.
	h := sha256.New()
	buf := make([]byte, 0, 1024)
	next := make(map[string]int) // name → instances already used
	for _, name := range hlist {
		used := next[name]
		next[name] = used + 1
		for i := len(fields) - 1; i >= 0; i-- {
			if fields[i].name != name {
				continue
			}
			if used == 0 {
				buf = relaxedHeader(buf[:0], fields[i].raw, true)
				h.Write(buf)
				break
			}
			used--
		}
	}
	buf = relaxedHeader(buf[:0], []byte(unsigned), false)
	h.Write(buf)
	digest := h.Sum(nil)

	sig, err := k.Signer.Sign(rand.Reader, digest, hashOpt)
	if err != nil {
		return nil, fmt.Errorf("dkim: sign with %s: %w", k.RecordName(), err)
	}
	f.fill(base64.StdEncoding.EncodeToString(sig))
	return append([]byte(f.String()), '\r', '\n'), nil
}

// folder writes a header field as tokens, folding before a token that
// would make the line longer than lineWidth.
type folder struct {
	b    strings.Builder
	line int // length of the current line
}

func (f *folder) init(s string) {
	f.b.WriteString(s)
	f.line = len(s)
}

// token appends t, folding first if needed; a token that starts a
// continuation line gets one leading space.
func (f *folder) token(t string) {
	if f.line+len(t) > lineWidth && f.line > 1 {
		f.newline()
	}
	if f.line == 0 {
		t = " " + strings.TrimLeft(t, " ")
	}
	f.b.WriteString(t)
	f.line += len(t)
}

// newline starts a continuation line.
func (f *folder) newline() {
	f.b.WriteString("\r\n")
	f.line = 0
}

// fill appends s, splitting it over as many lines as needed.
func (f *folder) fill(s string) {
	for len(s) > 0 {
		room := lineWidth - f.line
		if room <= 0 {
			f.newline()
			f.b.WriteString(" ")
			f.line = 1
			continue
		}
		n := min(room, len(s))
		f.b.WriteString(s[:n])
		f.line += n
		s = s[n:]
	}
}

func (f *folder) String() string { return f.b.String() }

// bodyHash returns the base64 relaxed body hash (bh=) of the rest of br.
// go-msgauth's streaming signer does the canonicalisation and hashing; it
// is given an empty header and a key that never signs, and only its bh=
// tag is used, so the body is hashed once for any number of signatures.
func bodyHash(br io.Reader) (string, error) {
	ms, err := msgauth.NewSigner(&msgauth.SignOptions{
		Domain:                 "body.invalid",
		Selector:               "body",
		Signer:                 nullSigner{},
		HeaderCanonicalization: msgauth.CanonicalizationRelaxed,
		BodyCanonicalization:   msgauth.CanonicalizationRelaxed,
		HeaderKeys:             []string{"From"},
	})
	if err != nil {
		return "", fmt.Errorf("dkim: %w", err)
	}
	if _, err := io.WriteString(ms, "\r\n"); err != nil {
		ms.Close()
		return "", fmt.Errorf("dkim: hash body: %w", err)
	}
	if _, err := io.Copy(ms, br); err != nil {
		ms.Close()
		return "", fmt.Errorf("dkim: read body: %w", err)
	}
	if err := ms.Close(); err != nil {
		return "", fmt.Errorf("dkim: hash body: %w", err)
	}
	params := parseTags(ms.Signature())
	bh := params["bh"]
	if bh == "" {
		return "", errors.New("dkim: no body hash from go-msgauth")
	}
	return bh, nil
}

// nullSigner lets go-msgauth run without a real key: its signature is
// thrown away.
type nullSigner struct{}

var nullPublic = ed25519.PublicKey(make([]byte, ed25519.PublicKeySize))

func (nullSigner) Public() crypto.PublicKey { return nullPublic }

func (nullSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) { return nil, nil }

// parseTags parses a tag=value list (RFC 6376 §3.2), or a header field
// holding one, with white space removed from values.
func parseTags(s string) map[string]string {
	if name, rest, ok := strings.Cut(s, ":"); ok && !strings.Contains(name, "=") {
		s = rest
	}
	out := make(map[string]string)
	for _, part := range strings.Split(s, ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		k = strings.TrimSpace(k)
		if _, dup := out[k]; dup || k == "" {
			continue
		}
		out[k] = strings.Join(strings.Fields(v), "")
	}
	return out
}

// ctxReader fails reads once ctx is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}
