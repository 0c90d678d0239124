package auth

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"
)

// API key scopes understood by baton. A key needs ScopeSend or
// ScopeSendSandbox to submit mail; a key with only ScopeSendSandbox is a
// sandbox identity whatever its Sandbox field says.
const (
	ScopeSend        = "send"
	ScopeSendSandbox = "send:sandbox"
)

// DefaultAPIKeyUser is the AUTH user name under which clients present an
// API key as the password.
const DefaultAPIKeyUser = "apikey"

// apiKeyPrefix starts every key, so a leaked key is recognisable (and
// secret scanners can find it).
const apiKeyPrefix = "bk_"

// APIKey is the stored record of one API key. The key itself is never
// stored: only its SHA-256 hash. (A fast hash is right here: the key holds
// 256 random bits, so there is nothing to guess that a slow hash would
// protect.)
type APIKey struct {
	// ID is public and names the key in lists, logs and revocation; it is
	// also the first part of the key.
	ID string `json:"id"`
	// Name is the identity's name (Identity.Name is "apikey:" + Name).
	Name string `json:"name"`
	// Hash is the hex SHA-256 of the whole key.
	Hash string `json:"hash"`
	// Scopes lists what the key may do (ScopeSend, ScopeSendSandbox).
	Scopes []string `json:"scopes"`
	// SenderDomains, SenderAddrs, MaxSize, Rate, Sandbox and Stream
	// become the identity's fields of the same names.
	SenderDomains []string `json:"sender_domains,omitempty"`
	SenderAddrs   []string `json:"sender_addrs,omitempty"`
	MaxSize       int64    `json:"max_size,omitempty"`
	Rate          Rate     `json:"rate,omitzero"`
	Sandbox       bool     `json:"sandbox,omitempty"`
	Stream        string   `json:"stream,omitempty"`
	// Created is when the key was made; Revoked, when set, is when it
	// stopped working. Revoked keys stay listed.
	Created time.Time  `json:"created"`
	Revoked *time.Time `json:"revoked,omitempty"`
}

// Identity returns the identity a client presenting this key carries.
func (k *APIKey) Identity() *Identity {
	id := &Identity{
		Name:          "apikey:" + k.Name,
		SenderDomains: slices.Clone(k.SenderDomains),
		SenderAddrs:   slices.Clone(k.SenderAddrs),
		MaxSize:       k.MaxSize,
		Rate:          k.Rate,
		Sandbox:       k.Sandbox,
		Stream:        k.Stream,
		Scopes:        slices.Clone(k.Scopes),
	}
	if id.Scopes == nil {
		id.Scopes = []string{}
	}
	if !slices.Contains(k.Scopes, ScopeSend) && slices.Contains(k.Scopes, ScopeSendSandbox) {
		id.Sandbox = true
	}
	return id
}

// APIKeysConfig configures APIKeys. The zero value is ready to use.
type APIKeysConfig struct {
	// User is the AUTH user name that announces an API key as the
	// password; "" means DefaultAPIKeyUser ("apikey"). Other user names
	// are refused with ErrInvalidCredentials at once, so APIKeys can be
	// tried before a PasswordFile in Multi without slowing it down.
	User string
	// CheckInterval works as in PasswordFileConfig.
	CheckInterval time.Duration
	// Logger receives reloads and reload errors; nil discards.
	Logger *slog.Logger
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

// APIKeys authenticates clients that give an API key as the password under
// a fixed user name (AUTH PLAIN or LOGIN with user "apikey"), as hosted
// relays do. Keys are created with Create, shown once, stored as a hash in
// a JSON file (mode 0600, replaced atomically) and revoked with Revoke.
// The file is reloaded when it changes, as for PasswordFile.
//
// A key is "bk_" + a 16-hex-digit ID + "_" + 43 characters of base64url
// (256 random bits). An APIKeys is safe for concurrent use.
type APIKeys struct {
	store fileStore[keySet]
	user  string
	now   func() time.Time
}

type keySet struct {
	byID  map[string]*APIKey
	order []string
}

type keyFile struct {
	Keys []*APIKey `json:"keys"`
}

var _ Authenticator = (*APIKeys)(nil)

// OpenAPIKeys loads the API key file at path; a missing file holds no
// keys. cfg may be nil.
func OpenAPIKeys(path string, cfg *APIKeysConfig) (*APIKeys, error) {
	var c APIKeysConfig
	if cfg != nil {
		c = *cfg
	}
	if c.User == "" {
		c.User = DefaultAPIKeyUser
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = defaultCheckInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	k := &APIKeys{
		user: c.User,
		now:  c.Now,
		store: fileStore[keySet]{
			path:     path,
			parse:    parseKeys,
			format:   formatKeys,
			empty:    func() keySet { return keySet{byID: map[string]*APIKey{}} },
			log:      c.Logger,
			now:      c.Now,
			interval: c.CheckInterval,
		},
	}
	if err := k.store.reload(); err != nil {
		return nil, err
	}
	return k, nil
}

// Path returns the file's path.
func (a *APIKeys) Path() string { return a.store.path }

// User returns the AUTH user name that announces an API key.
func (a *APIKeys) User() string { return a.user }

// Reload reads the file again now; on error the previous keys stay in
// effect.
func (a *APIKeys) Reload(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return a.store.reload()
}

// Authenticate accepts username == the configured user name (compared
// case-insensitively) with a valid, unrevoked key as the password.
func (a *APIKeys) Authenticate(ctx context.Context, username, password string) (*Identity, error) {
	if !strings.EqualFold(username, a.user) {
		return nil, ErrInvalidCredentials
	}
	a.store.maybeReload()
	set := a.store.load()
	sum := sha256.Sum256([]byte(password))
	id, _ := splitKey(password)
	rec := set.byID[id]
	want := make([]byte, sha256.Size) // compared even when the ID is unknown
	if rec != nil {
		if h, err := hex.DecodeString(rec.Hash); err == nil && len(h) == sha256.Size {
			want = h
		}
	}
	if subtle.ConstantTimeCompare(sum[:], want) != 1 || rec == nil {
		return nil, ErrInvalidCredentials
	}
	if rec.Revoked != nil {
		return nil, fmt.Errorf("%w: key %s revoked", ErrInvalidCredentials, rec.ID)
	}
	return rec.Identity(), nil
}

// splitKey returns the ID part of a well-formed key.
func splitKey(key string) (id string, ok bool) {
	rest, ok := strings.CutPrefix(key, apiKeyPrefix)
	if !ok || len(rest) != 16+1+43 || rest[16] != '_' {
		return "", false
	}
	return rest[:16], true
}

// NewAPIKey describes a key to create; its fields become those of the
// APIKey record.
type NewAPIKey struct {
	Name string
	// Scopes nil means [ScopeSend]; an empty list makes a key that
	// authenticates but may not send.
	Scopes        []string
	SenderDomains []string
	SenderAddrs   []string
	MaxSize       int64
	Rate          Rate
	Sandbox       bool
	// Stream pins the key's mail to a stream (Identity.Stream).
	Stream string
}

// Create makes a new key, stores its hash and returns the key (to be shown
// once; it cannot be recovered) with its record.
func (a *APIKeys) Create(ctx context.Context, spec NewAPIKey) (string, APIKey, error) {
	if err := ValidUserName(spec.Name); err != nil {
		return "", APIKey{}, err
	}
	if spec.Scopes == nil {
		spec.Scopes = []string{ScopeSend}
	}
	for _, s := range spec.Scopes {
		if s == "" || strings.ContainsAny(s, " ,\t\n") {
			return "", APIKey{}, fmt.Errorf("auth: bad scope %q", s)
		}
	}
	u := User{Name: spec.Name, SenderDomains: spec.SenderDomains, SenderAddrs: spec.SenderAddrs, MaxSize: spec.MaxSize, Rate: spec.Rate, Stream: spec.Stream}
	if err := validAttrs(&u); err != nil {
		return "", APIKey{}, err
	}
	var idb [8]byte
	var secret [32]byte
	rand.Read(idb[:])
	rand.Read(secret[:])
	id := hex.EncodeToString(idb[:])
	key := apiKeyPrefix + id + "_" + base64.RawURLEncoding.EncodeToString(secret[:])
	sum := sha256.Sum256([]byte(key))
	rec := APIKey{
		ID:            id,
		Name:          spec.Name,
		Hash:          hex.EncodeToString(sum[:]),
		Scopes:        slices.Clone(spec.Scopes),
		SenderDomains: slices.Clone(spec.SenderDomains),
		SenderAddrs:   slices.Clone(spec.SenderAddrs),
		MaxSize:       spec.MaxSize,
		Rate:          spec.Rate,
		Sandbox:       spec.Sandbox,
		Stream:        spec.Stream,
		Created:       a.now().UTC().Truncate(time.Second),
	}
	err := a.store.update(ctx, func(s keySet) (keySet, error) {
		if _, dup := s.byID[id]; dup {
			return s, errors.New("auth: key ID collision, try again")
		}
		s = s.clone()
		r := rec
		s.byID[id] = &r
		s.order = append(s.order, id)
		return s, nil
	})
	if err != nil {
		return "", APIKey{}, err
	}
	return key, rec, nil
}

// ErrNoKey is returned by Revoke for an unknown key ID.
var ErrNoKey = errors.New("auth: no such API key")

// Revoke stops the key with this ID from working; it stays listed with
// its revocation time. Revoking a revoked key is not an error.
func (a *APIKeys) Revoke(ctx context.Context, id string) error {
	return a.store.update(ctx, func(s keySet) (keySet, error) {
		rec, ok := s.byID[id]
		if !ok {
			return s, fmt.Errorf("%w: %q", ErrNoKey, id)
		}
		if rec.Revoked != nil {
			return s, nil
		}
		s = s.clone()
		r := *rec
		t := a.now().UTC().Truncate(time.Second)
		r.Revoked = &t
		s.byID[id] = &r
		return s, nil
	})
}

// Keys returns the key records in creation order.
func (a *APIKeys) Keys() []APIKey {
	a.store.maybeReload()
	set := a.store.load()
	out := make([]APIKey, 0, len(set.order))
	for _, id := range set.order {
		out = append(out, *set.byID[id])
	}
	return out
}

func (s keySet) clone() keySet {
	m := make(map[string]*APIKey, len(s.byID)+1)
	for k, v := range s.byID {
		m[k] = v
	}
	return keySet{byID: m, order: slices.Clone(s.order)}
}

func parseKeys(data []byte) (keySet, error) {
	s := keySet{byID: map[string]*APIKey{}}
	if len(strings.TrimSpace(string(data))) == 0 {
		return s, nil
	}
	var f keyFile
	if err := json.Unmarshal(data, &f); err != nil {
		return keySet{}, err
	}
	for i, k := range f.Keys {
		if k == nil || k.ID == "" {
			return keySet{}, fmt.Errorf("key %d: no id", i)
		}
		if h, err := hex.DecodeString(k.Hash); err != nil || len(h) != sha256.Size {
			return keySet{}, fmt.Errorf("key %s: bad hash", k.ID)
		}
		if _, dup := s.byID[k.ID]; dup {
			return keySet{}, fmt.Errorf("key %s: duplicate id", k.ID)
		}
		s.byID[k.ID] = k
		s.order = append(s.order, k.ID)
	}
	return s, nil
}

func formatKeys(s keySet) ([]byte, error) {
	f := keyFile{Keys: make([]*APIKey, 0, len(s.order))}
	for _, id := range s.order {
		f.Keys = append(f.Keys, s.byID[id])
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// GeneratePassword returns a random password of 24 characters (about 143
// bits) from an alphabet without look-alike characters, for a new user.
func GeneratePassword() string {
	const alphabet = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
	var b [24]byte
	out := make([]byte, len(b))
	for i := range out {
		// Rejection sampling keeps every character equally likely.
		for {
			rand.Read(b[i : i+1])
			if int(b[i]) < 256-256%len(alphabet) {
				out[i] = alphabet[int(b[i])%len(alphabet)]
				break
			}
		}
	}
	return string(out)
}
