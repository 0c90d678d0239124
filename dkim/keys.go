package dkim

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// MinRSABits is the smallest RSA modulus accepted for signing. RFC 8301
// requires verifiers to accept 1024 to 4096 bits and signers to use at least
// 1024; 2048 is the current common floor and what this package enforces.
const MinRSABits = 2048

// MaxRSABits is the largest RSA modulus accepted. RFC 8301 only requires
// verifiers to handle keys up to 4096 bits.
const MaxRSABits = 4096

// KeyType names a signing algorithm family.
type KeyType string

// Key types.
const (
	// RSA keys sign with rsa-sha256 (RFC 6376, RFC 8301).
	RSA KeyType = "rsa"
	// Ed25519 keys sign with ed25519-sha256 (RFC 8463).
	Ed25519 KeyType = "ed25519"
)

// Key is one private signing key for a domain and selector.
type Key struct {
	// Domain is the signing domain (the d= tag), stored in lower-case
	// ASCII form.
	Domain string
	// Selector is the s= tag; the public key is published at
	// Selector._domainkey.Domain.
	Selector string
	// Signer is the private key: an *rsa.PrivateKey or an
	// ed25519.PrivateKey.
	Signer crypto.Signer
}

// Type returns the key's algorithm family.
func (k *Key) Type() KeyType {
	if _, ok := k.Signer.Public().(ed25519.PublicKey); ok {
		return Ed25519
	}
	return RSA
}

// RecordName returns the DNS name of the key's TXT record,
// "selector._domainkey.domain".
func (k *Key) RecordName() string {
	return k.Selector + "._domainkey." + k.Domain
}

// TXT returns the text of the DNS TXT record that publishes the key's
// public half, e.g. "v=DKIM1; k=ed25519; p=...".
func (k *Key) TXT() (string, error) {
	return TXTRecord(k.Signer.Public())
}

// KeyFile names a private key file for a domain and selector, as it appears
// in configuration.
type KeyFile struct {
	// Domain is the signing domain (d=).
	Domain string
	// Selector is the selector (s=).
	Selector string
	// Path is a PEM file holding a PKCS#8 ("PRIVATE KEY") RSA or Ed25519
	// key, or a PKCS#1 ("RSA PRIVATE KEY") RSA key.
	Path string
}

// KeyStore holds the signing keys of every signing domain: one or more
// selectors per domain, each with its key. A domain with several keys
// (for example an RSA and an Ed25519 key, or an old and a new selector
// during rotation) is signed with all of them. A KeyStore is immutable
// after construction and safe for concurrent use; to change keys, build a
// new one (and a new Signer).
type KeyStore struct {
	byDomain map[string][]*Key
}

// NewKeyStore checks keys and returns a store holding them. Domains and
// selectors are normalised (lower case, no trailing dot); a
// domain/selector pair may appear only once; RSA keys must have between
// MinRSABits and MaxRSABits bits.
func NewKeyStore(keys ...Key) (*KeyStore, error) {
	ks := &KeyStore{byDomain: make(map[string][]*Key)}
	seen := make(map[string]bool)
	for _, k := range keys {
		domain, err := NormalizeDomain(k.Domain)
		if err != nil {
			return nil, fmt.Errorf("dkim: key domain %q: %w", k.Domain, err)
		}
		selector, err := normalizeSelector(k.Selector)
		if err != nil {
			return nil, fmt.Errorf("dkim: key %q for %s: %w", k.Selector, domain, err)
		}
		if k.Signer == nil {
			return nil, fmt.Errorf("dkim: key %s._domainkey.%s has no private key", selector, domain)
		}
		if err := checkSigner(k.Signer); err != nil {
			return nil, fmt.Errorf("dkim: key %s._domainkey.%s: %w", selector, domain, err)
		}
		id := selector + "._domainkey." + domain
		if seen[id] {
			return nil, fmt.Errorf("dkim: key %s configured twice", id)
		}
		seen[id] = true
		ks.byDomain[domain] = append(ks.byDomain[domain], &Key{Domain: domain, Selector: selector, Signer: k.Signer})
	}
	return ks, nil
}

// LoadKeyStore reads the key files and returns a store holding them.
func LoadKeyStore(files []KeyFile) (*KeyStore, error) {
	keys := make([]Key, 0, len(files))
	for _, f := range files {
		signer, err := LoadPrivateKey(f.Path)
		if err != nil {
			return nil, err
		}
		keys = append(keys, Key{Domain: f.Domain, Selector: f.Selector, Signer: signer})
	}
	return NewKeyStore(keys...)
}

// Keys returns the keys of domain (exactly that domain, not its parents)
// in configuration order, or nil. The returned slice must not be modified.
func (ks *KeyStore) Keys(domain string) []*Key {
	if ks == nil {
		return nil
	}
	d, err := NormalizeDomain(domain)
	if err != nil {
		return nil
	}
	return ks.byDomain[d]
}

// Domains returns the signing domains in the store, sorted.
func (ks *KeyStore) Domains() []string {
	if ks == nil {
		return nil
	}
	out := make([]string, 0, len(ks.byDomain))
	for d := range ks.byDomain {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// lookup returns the signing domain and keys for a From domain: the
// domain's own keys, or with parents set those of its nearest ancestor
// that has keys.
func (ks *KeyStore) lookup(domain string, parents bool) []*Key {
	if ks == nil || domain == "" {
		return nil
	}
	for d := domain; ; {
		if keys := ks.byDomain[d]; len(keys) > 0 {
			return keys
		}
		if !parents {
			return nil
		}
		_, rest, ok := strings.Cut(d, ".")
		if !ok || !strings.Contains(rest, ".") {
			// Never fall back to a top-level domain.
			return nil
		}
		d = rest
	}
}

// NormalizeDomain returns domain in the form used for d= tags and key
// look-ups: lower case and no trailing dot. Internationalised domains are
// not converted; configure them in the A-label ("xn--") form that From
// fields use.
func NormalizeDomain(domain string) (string, error) {
	d := strings.ToLower(strings.TrimSuffix(strings.TrimSpace(domain), "."))
	if d == "" {
		return "", errors.New("empty domain")
	}
	if len(d) > 253 {
		return "", errors.New("domain too long")
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 {
			return "", errors.New("invalid domain")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if c <= ' ' || c == 0x7f || strings.IndexByte("()<>[]:;@\\,\"", c) >= 0 {
				return "", errors.New("invalid domain")
			}
		}
	}
	return d, nil
}

func normalizeSelector(sel string) (string, error) {
	s := strings.ToLower(strings.TrimSpace(sel))
	if s == "" {
		return "", errors.New("empty selector")
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return "", errors.New("invalid selector")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			ok := c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_'
			if !ok {
				return "", errors.New("invalid selector: only letters, digits, '-' and '_' are allowed")
			}
		}
	}
	return s, nil
}

func checkSigner(s crypto.Signer) error {
	switch pub := s.Public().(type) {
	case *rsa.PublicKey:
		if bits := pub.N.BitLen(); bits < MinRSABits || bits > MaxRSABits {
			return fmt.Errorf("RSA key has %d bits, need %d to %d", bits, MinRSABits, MaxRSABits)
		}
		return nil
	case ed25519.PublicKey:
		if len(pub) != ed25519.PublicKeySize {
			return errors.New("bad Ed25519 public key size")
		}
		return nil
	default:
		return fmt.Errorf("unsupported key type %T (need RSA or Ed25519)", pub)
	}
}

// LoadPrivateKey reads a PEM private key file (see ParsePrivateKey).
func LoadPrivateKey(path string) (crypto.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dkim: read key: %w", err)
	}
	s, err := ParsePrivateKey(b)
	if err != nil {
		return nil, fmt.Errorf("dkim: %s: %w", path, err)
	}
	return s, nil
}

// ParsePrivateKey parses the first private key PEM block in data: PKCS#8
// ("PRIVATE KEY", RSA or Ed25519) or PKCS#1 ("RSA PRIVATE KEY"). RSA keys
// must have between MinRSABits and MaxRSABits bits.
func ParsePrivateKey(data []byte) (crypto.Signer, error) {
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			return nil, errors.New("no PEM private key found")
		}
		var (
			key any
			err error
		)
		switch block.Type {
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", block.Type, err)
		}
		var s crypto.Signer
		switch k := key.(type) {
		case *rsa.PrivateKey:
			s = k
		case ed25519.PrivateKey:
			s = k
		default:
			return nil, fmt.Errorf("unsupported private key type %T (need RSA or Ed25519)", key)
		}
		if err := checkSigner(s); err != nil {
			return nil, err
		}
		return s, nil
	}
}

// TXTRecord returns the DKIM key record (RFC 6376 §3.6.1) that publishes
// pub: "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>" for RSA, and
// "v=DKIM1; k=ed25519; p=<base64 of the 32-byte key>" for Ed25519
// (RFC 8463 §4.2).
func TXTRecord(pub crypto.PublicKey) (string, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			return "", fmt.Errorf("dkim: %w", err)
		}
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(k), nil
	default:
		return "", fmt.Errorf("dkim: unsupported public key type %T", pub)
	}
}

// ZoneRecord formats a TXT record for a zone file: the owner name with a
// trailing dot and the text split into quoted strings of at most 255 bytes
// (RFC 1035 §3.3.14; RFC 6376 §3.6.2.2 says verifiers join them).
func ZoneRecord(name, txt string) string {
	var b strings.Builder
	b.WriteString(strings.TrimSuffix(name, "."))
	b.WriteString(". IN TXT (")
	for len(txt) > 0 {
		n := min(len(txt), 255)
		b.WriteString(` "`)
		b.WriteString(escapeTXT(txt[:n]))
		b.WriteString(`"`)
		txt = txt[n:]
	}
	b.WriteString(" )")
	return b.String()
}

func escapeTXT(s string) string {
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s)
}

// GenerateConfig says what key GenerateKey makes.
type GenerateConfig struct {
	// Domain and Selector name the key; both are required.
	Domain   string
	Selector string
	// Type is RSA (the default, for the widest support) or Ed25519.
	Type KeyType
	// Bits is the RSA modulus size; 0 means 2048.
	Bits int
}

// GeneratedKey is a new key with what is needed to publish it.
type GeneratedKey struct {
	// Key is the new key, ready for NewKeyStore.
	Key Key
	// PrivatePEM is the private key as PKCS#8 PEM ("PRIVATE KEY").
	PrivatePEM []byte
	// RecordName is the DNS name of the TXT record to publish.
	RecordName string
	// TXT is the text of the TXT record.
	TXT string
	// Zone is the record in zone-file syntax, ready to paste.
	Zone string
}

// GenerateKey makes a new private key for cfg.Domain and cfg.Selector.
func GenerateKey(cfg GenerateConfig) (*GeneratedKey, error) {
	domain, err := NormalizeDomain(cfg.Domain)
	if err != nil {
		return nil, fmt.Errorf("dkim: domain %q: %w", cfg.Domain, err)
	}
	selector, err := normalizeSelector(cfg.Selector)
	if err != nil {
		return nil, fmt.Errorf("dkim: selector %q: %w", cfg.Selector, err)
	}
	var signer crypto.Signer
	switch cfg.Type {
	case RSA, "":
		bits := cfg.Bits
		if bits == 0 {
			bits = 2048
		}
		if bits < MinRSABits || bits > MaxRSABits {
			return nil, fmt.Errorf("dkim: RSA key size %d out of range %d to %d", bits, MinRSABits, MaxRSABits)
		}
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			return nil, fmt.Errorf("dkim: generate RSA key: %w", err)
		}
		signer = k
	case Ed25519:
		_, k, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("dkim: generate Ed25519 key: %w", err)
		}
		signer = k
	default:
		return nil, fmt.Errorf("dkim: unknown key type %q (want rsa or ed25519)", cfg.Type)
	}
	der, err := x509.MarshalPKCS8PrivateKey(signer)
	if err != nil {
		return nil, fmt.Errorf("dkim: encode key: %w", err)
	}
	key := Key{Domain: domain, Selector: selector, Signer: signer}
	txt, err := key.TXT()
	if err != nil {
		return nil, err
	}
	return &GeneratedKey{
		Key:        key,
		PrivatePEM: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		RecordName: key.RecordName(),
		TXT:        txt,
		Zone:       ZoneRecord(key.RecordName(), txt),
	}, nil
}

// WriteKeyFile writes a private key to path with mode 0600, creating
// missing parent directories with mode 0700. It never replaces an
// existing file: if path exists it returns an error wrapping
// fs.ErrExist. The file is synced before WriteKeyFile returns.
func WriteKeyFile(path string, privatePEM []byte) (err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("dkim: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("dkim: key file %s already exists, not overwriting: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("dkim: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(path)
		}
	}()
	// The umask cannot widen 0600, but make the mode explicit anyway.
	if err := f.Chmod(0o600); err != nil {
		return fmt.Errorf("dkim: %w", err)
	}
	if _, err := f.Write(privatePEM); err != nil {
		return fmt.Errorf("dkim: write key: %w", err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("dkim: sync key: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("dkim: close key: %w", err)
	}
	return nil
}
