package auth

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode"

	"golang.org/x/crypto/bcrypt"
)

// User is one entry of a password file.
type User struct {
	// Name is what the client gives as the AUTH user name. Names are
	// compared exactly (case-sensitive) and may not contain ':', spaces or
	// control characters.
	Name string
	// Hash is the bcrypt hash of the password ($2a$, $2b$ or $2y$, as
	// written by htpasswd -B).
	Hash string
	// SenderDomains, SenderAddrs, MaxSize, Rate, Sandbox and Stream
	// become the fields of the same names in the user's Identity.
	SenderDomains []string
	SenderAddrs   []string
	MaxSize       int64
	Rate          Rate
	Sandbox       bool
	Stream        string
}

// Identity returns the identity a successful login as u carries.
func (u *User) Identity() *Identity {
	return &Identity{
		Name:          u.Name,
		SenderDomains: slices.Clone(u.SenderDomains),
		SenderAddrs:   slices.Clone(u.SenderAddrs),
		MaxSize:       u.MaxSize,
		Rate:          u.Rate,
		Sandbox:       u.Sandbox,
		Stream:        u.Stream,
	}
}

// PasswordFileConfig configures a PasswordFile. The zero value is ready to
// use.
type PasswordFileConfig struct {
	// Cost is the bcrypt cost of hashes written by SetPassword and of the
	// dummy hash compared for unknown users; 0 means bcrypt.DefaultCost.
	Cost int
	// CheckInterval is how often Authenticate looks at the file's
	// modification time and reloads it when it changed; 0 means 2s and a
	// negative value turns automatic reloading off (call Reload, e.g. on
	// SIGHUP).
	CheckInterval time.Duration
	// MaxConcurrent caps the bcrypt comparisons running at once, so a
	// flood of AUTH attempts cannot take every CPU; 0 means GOMAXPROCS.
	// Further attempts wait (honouring their context).
	MaxConcurrent int
	// CacheTTL is how long a successful login is remembered, so a client
	// that logs in on every connection costs one bcrypt comparison per
	// CacheTTL instead of one per connection (bcrypt at the default cost
	// takes tens of milliseconds of CPU). Only successes are cached, as a
	// keyed hash of name and password tied to the user's current hash: a
	// changed password or a removed user misses at once. 0 means 5
	// minutes; a negative value turns the cache off.
	CacheTTL time.Duration
	// CacheSize bounds the cache entries; 0 means 10000.
	CacheSize int
	// Logger receives reloads and reload errors; nil discards.
	Logger *slog.Logger
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
}

// PasswordFile authenticates users against a file of bcrypt hashes.
//
// The file is text, one user per line, compatible with htpasswd -B for the
// first two fields:
//
//	# comment
//	name:$2y$10$...hash...
//	alice:$2a$10$...hash...:domains=example.test,example.invalid sandbox
//
// The optional third field holds space-separated attributes: domains=
// and addrs= (comma-separated allowed sender domains and addresses),
// max_size= (bytes), messages=, recipients= and per= (a rate limit, per
// being a Go duration such as 1h), sandbox, and stream= (the mail stream
// of all the user's messages, see Identity.Stream). Unknown attributes make
// the file invalid, so a typo cannot silently widen a restriction.
//
// A missing file holds no users. The file is reloaded when it changes
// (checked at most every CheckInterval while authenticating) and on Reload;
// a file that fails to parse is logged and the previous users stay in
// effect. The editing methods (SetUser, RemoveUser) lock the file against
// concurrent editors and replace it atomically with mode 0600.
//
// A PasswordFile is safe for concurrent use.
type PasswordFile struct {
	store fileStore[userSet]
	cost  int
	sem   chan struct{}
	cache *loginCache

	dummyOnce sync.Once
	dummy     []byte
}

type userSet struct {
	byName map[string]*User
	order  []string // as in the file, for stable rewriting
	lines  []string // comment lines, preserved at the top
}

var _ Authenticator = (*PasswordFile)(nil)

// OpenPasswordFile loads the password file at path. A missing file is not
// an error (it holds no users until one is added); a malformed one is.
// cfg may be nil.
func OpenPasswordFile(path string, cfg *PasswordFileConfig) (*PasswordFile, error) {
	var c PasswordFileConfig
	if cfg != nil {
		c = *cfg
	}
	if c.Cost == 0 {
		c.Cost = bcrypt.DefaultCost
	}
	if c.CheckInterval == 0 {
		c.CheckInterval = defaultCheckInterval
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = runtime.GOMAXPROCS(0)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.CacheTTL == 0 {
		c.CacheTTL = 5 * time.Minute
	}
	if c.CacheSize <= 0 {
		c.CacheSize = 10000
	}
	p := &PasswordFile{
		cost:  c.Cost,
		sem:   make(chan struct{}, c.MaxConcurrent),
		cache: newLoginCache(c.CacheTTL, c.CacheSize, c.Now),
		store: fileStore[userSet]{
			path:     path,
			parse:    parseUsers,
			format:   formatUsers,
			empty:    func() userSet { return userSet{byName: map[string]*User{}} },
			log:      c.Logger,
			now:      c.Now,
			interval: c.CheckInterval,
		},
	}
	if err := p.store.reload(); err != nil {
		return nil, err
	}
	return p, nil
}

// Path returns the file's path.
func (p *PasswordFile) Path() string { return p.store.path }

// Reload reads the file again now. On error the previous users stay in
// effect and the error is returned.
func (p *PasswordFile) Reload(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return p.store.reload()
}

// Authenticate checks name and password. Unknown users are compared
// against a dummy hash so they take as long as a wrong password.
func (p *PasswordFile) Authenticate(ctx context.Context, username, password string) (*Identity, error) {
	p.store.maybeReload()
	set := p.store.load()
	u := set.byName[username]
	hash := p.dummyHash()
	if u != nil {
		hash = []byte(u.Hash)
		if len(password) <= 72 && p.cache.hit(username, password, u.Hash) {
			return u.Identity(), nil
		}
	}
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	err := bcrypt.CompareHashAndPassword(hash, []byte(password))
	<-p.sem
	// bcrypt looks at 72 bytes only: longer passwords were never set by
	// SetPassword, so refuse them rather than accept a prefix.
	if u == nil || err != nil || len(password) > 72 {
		if err != nil && !errors.Is(err, bcrypt.ErrMismatchedHashAndPassword) && u != nil {
			// A corrupt hash in the file: still a refusal, but say why
			// in the log the caller keeps.
			return nil, fmt.Errorf("%w: unusable hash for %q", ErrInvalidCredentials, username)
		}
		return nil, ErrInvalidCredentials
	}
	p.cache.add(username, password, u.Hash)
	return u.Identity(), nil
}

func (p *PasswordFile) dummyHash() []byte {
	p.dummyOnce.Do(func() {
		var pw [16]byte
		rand.Read(pw[:])
		h, err := bcrypt.GenerateFromPassword(pw[:], p.cost)
		if err != nil {
			panic("auth: bcrypt: " + err.Error()) // cost is validated in SetUser
		}
		p.dummy = h
	})
	return p.dummy
}

// Users returns the users in file order, with their hashes.
func (p *PasswordFile) Users() []User {
	p.store.maybeReload()
	set := p.store.load()
	out := make([]User, 0, len(set.order))
	for _, n := range set.order {
		out = append(out, *set.byName[n])
	}
	return out
}

// User returns one user, or false when there is none by that name.
func (p *PasswordFile) User(name string) (User, bool) {
	u, ok := p.store.load().byName[name]
	if !ok {
		return User{}, false
	}
	return *u, true
}

// HashPassword returns the bcrypt hash SetUser would store for password.
// It refuses passwords longer than 72 bytes (bcrypt's limit) and empty
// ones.
func (p *PasswordFile) HashPassword(password string) (string, error) {
	if password == "" {
		return "", errors.New("auth: empty password")
	}
	h, err := bcrypt.GenerateFromPassword([]byte(password), p.cost)
	if err != nil {
		return "", fmt.Errorf("auth: %w", err)
	}
	return string(h), nil
}

// SetUser adds u or replaces the user of the same name and writes the
// file. When password is not empty it is hashed into u.Hash; otherwise
// u.Hash must hold a bcrypt hash (an existing user's hash is kept when
// u.Hash is empty too).
func (p *PasswordFile) SetUser(ctx context.Context, u User, password string) error {
	if err := ValidUserName(u.Name); err != nil {
		return err
	}
	if err := validAttrs(&u); err != nil {
		return err
	}
	if password != "" {
		h, err := p.HashPassword(password)
		if err != nil {
			return err
		}
		u.Hash = h
	}
	return p.store.update(ctx, func(s userSet) (userSet, error) {
		old := s.byName[u.Name]
		if u.Hash == "" && old != nil {
			u.Hash = old.Hash
		}
		if _, err := bcrypt.Cost([]byte(u.Hash)); err != nil {
			return s, fmt.Errorf("auth: user %q: not a bcrypt hash", u.Name)
		}
		s = s.clone()
		if old == nil {
			s.order = append(s.order, u.Name)
		}
		s.byName[u.Name] = &u
		return s, nil
	})
}

// ErrNoUser is returned by RemoveUser for a name that is not in the file.
var ErrNoUser = errors.New("auth: no such user")

// RemoveUser deletes a user and writes the file. It returns an error
// matching ErrNoUser when there is no such user.
func (p *PasswordFile) RemoveUser(ctx context.Context, name string) error {
	return p.store.update(ctx, func(s userSet) (userSet, error) {
		if _, ok := s.byName[name]; !ok {
			return s, fmt.Errorf("%w: %q", ErrNoUser, name)
		}
		s = s.clone()
		delete(s.byName, name)
		s.order = slices.DeleteFunc(s.order, func(n string) bool { return n == name })
		return s, nil
	})
}

func (s userSet) clone() userSet {
	m := make(map[string]*User, len(s.byName)+1)
	for k, v := range s.byName {
		m[k] = v
	}
	return userSet{byName: m, order: slices.Clone(s.order), lines: s.lines}
}

// ValidUserName reports why name cannot be a user name, or nil.
func ValidUserName(name string) error {
	if name == "" {
		return errors.New("auth: empty user name")
	}
	if len(name) > 256 {
		return errors.New("auth: user name too long")
	}
	for _, r := range name {
		if r == ':' || r == '#' || unicode.IsSpace(r) || unicode.IsControl(r) || r == unicode.ReplacementChar {
			return fmt.Errorf("auth: user name %q contains %q", name, r)
		}
	}
	return nil
}

func validAttrs(u *User) error {
	for _, d := range u.SenderDomains {
		if d == "" || strings.ContainsAny(d, ", \t\n:@") {
			return fmt.Errorf("auth: bad sender domain %q", d)
		}
	}
	for _, a := range u.SenderAddrs {
		if !strings.Contains(a, "@") || strings.ContainsAny(a, ", \t\n:") {
			return fmt.Errorf("auth: bad sender address %q", a)
		}
	}
	if u.MaxSize < 0 || u.Rate.Messages < 0 || u.Rate.Recipients < 0 || u.Rate.Per < 0 {
		return errors.New("auth: negative limit")
	}
	if (u.Rate.Messages > 0 || u.Rate.Recipients > 0) && u.Rate.Per == 0 {
		return errors.New("auth: rate limit without a period")
	}
	return ValidStream(u.Stream)
}

func parseUsers(data []byte) (userSet, error) {
	s := userSet{byName: map[string]*User{}}
	for i, line := range strings.Split(string(data), "\n") {
		line = strings.TrimRight(line, "\r")
		trimmed := strings.TrimSpace(line)
		if trimmed == "" {
			continue
		}
		if strings.HasPrefix(trimmed, "#") {
			if len(s.order) == 0 {
				s.lines = append(s.lines, line)
			}
			continue
		}
		u, err := parseUserLine(line)
		if err != nil {
			return userSet{}, fmt.Errorf("line %d: %w", i+1, err)
		}
		if _, dup := s.byName[u.Name]; dup {
			return userSet{}, fmt.Errorf("line %d: duplicate user %q", i+1, u.Name)
		}
		s.byName[u.Name] = u
		s.order = append(s.order, u.Name)
	}
	return s, nil
}

func parseUserLine(line string) (*User, error) {
	name, rest, ok := strings.Cut(line, ":")
	if !ok {
		return nil, errors.New("expected name:hash")
	}
	if err := ValidUserName(name); err != nil {
		return nil, err
	}
	hash, attrs, _ := strings.Cut(rest, ":")
	if _, err := bcrypt.Cost([]byte(hash)); err != nil {
		return nil, fmt.Errorf("user %q: not a bcrypt hash", name)
	}
	u := &User{Name: name, Hash: hash}
	for _, a := range strings.Fields(attrs) {
		k, v, hasValue := strings.Cut(a, "=")
		var err error
		switch k {
		case "sandbox":
			if hasValue {
				u.Sandbox, err = strconv.ParseBool(v)
			} else {
				u.Sandbox = true
			}
		case "domains":
			u.SenderDomains = splitList(v)
		case "addrs":
			u.SenderAddrs = splitList(v)
		case "max_size":
			u.MaxSize, err = strconv.ParseInt(v, 10, 64)
		case "messages":
			u.Rate.Messages, err = strconv.Atoi(v)
		case "recipients":
			u.Rate.Recipients, err = strconv.Atoi(v)
		case "per":
			u.Rate.Per, err = time.ParseDuration(v)
		case "stream":
			u.Stream = v
		default:
			return nil, fmt.Errorf("user %q: unknown attribute %q", name, k)
		}
		if err != nil {
			return nil, fmt.Errorf("user %q: attribute %s: %w", name, k, err)
		}
	}
	if err := validAttrs(u); err != nil {
		return nil, fmt.Errorf("user %q: %w", name, err)
	}
	return u, nil
}

func splitList(v string) []string {
	var out []string
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

func formatUsers(s userSet) ([]byte, error) {
	var b bytes.Buffer
	if len(s.lines) == 0 {
		b.WriteString("# baton users: name:bcrypt-hash[:attributes]; edit with \"relayd user\"\n")
	}
	for _, l := range s.lines {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	for _, n := range s.order {
		writeUserLine(&b, s.byName[n])
	}
	return b.Bytes(), nil
}

func writeUserLine(w io.Writer, u *User) {
	var attrs []string
	if len(u.SenderDomains) > 0 {
		attrs = append(attrs, "domains="+strings.Join(u.SenderDomains, ","))
	}
	if len(u.SenderAddrs) > 0 {
		attrs = append(attrs, "addrs="+strings.Join(u.SenderAddrs, ","))
	}
	if u.MaxSize > 0 {
		attrs = append(attrs, "max_size="+strconv.FormatInt(u.MaxSize, 10))
	}
	if u.Rate.Messages > 0 {
		attrs = append(attrs, "messages="+strconv.Itoa(u.Rate.Messages))
	}
	if u.Rate.Recipients > 0 {
		attrs = append(attrs, "recipients="+strconv.Itoa(u.Rate.Recipients))
	}
	if u.Rate.Per > 0 {
		attrs = append(attrs, "per="+u.Rate.Per.String())
	}
	if u.Sandbox {
		attrs = append(attrs, "sandbox")
	}
	if u.Stream != "" {
		attrs = append(attrs, "stream="+u.Stream)
	}
	fmt.Fprintf(w, "%s:%s", u.Name, u.Hash)
	if len(attrs) > 0 {
		fmt.Fprintf(w, ":%s", strings.Join(attrs, " "))
	}
	fmt.Fprintln(w)
}
