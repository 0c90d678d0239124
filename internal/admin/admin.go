// Package admin serves baton's administration HTTP API and web dashboard
// on one handler, meant for a listener of its own (loopback by default).
//
// The JSON API (documented in docs/admin-api.md) covers the queue (list,
// inspect, hold, release, delete, retry, stats: the queueadmin handler that
// also serves "relayd queue" over the Unix admin socket, mounted under
// /api/v1/queue/, so both share one implementation), the suppression list,
// the sandbox mailboxes (mail captured from sandbox identities, viewable
// and downloadable as .eml), the last hour's activity and a message search.
//
// The dashboard is plain server-rendered HTML (html/template, embedded in
// the binary, plots as inline SVG, no script and nothing fetched from the
// network): an overview with queue depth and delivery rates over the last
// hour, a per-destination table, a search by queue ID, sender or recipient
// with each recipient's full history, the sandbox viewer, and the
// suppression list (search, add, remove). The numbers
// it shows come from the same functions as the API's.
//
// # Authentication
//
// Every request but the login form needs the configured token: API clients
// send "Authorization: Bearer TOKEN"; browsers post it once to /login and
// get a session cookie (HttpOnly, SameSite=Strict, Secure over TLS) that
// carries an expiry and an HMAC under the token, so changing the token ends
// every session. Tokens are compared in constant time.
//
// State changes are POST only and cannot be forged from another site: the
// whole handler sits behind net/http's CrossOriginProtection (which refuses
// cross-origin browser POSTs by Sec-Fetch-Site and Origin), and a POST
// authenticated by the cookie must also carry the session's CSRF token (the
// "csrf" form field or the X-CSRF-Token header). A Bearer token is never
// sent by a browser on its own, so Bearer requests need no CSRF token.
//
// Wrong tokens are throttled per client IP address (Config.AuthFailures):
// after a few, a client's login posts and Bearer requests answer 429 with
// Retry-After until its allowance refills.
package admin

import (
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/batonmail/baton/internal/queueadmin"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// StatusSource reports the relay's delivery slots per destination;
// *relay.Relay implements it. Destinations must be safe for concurrent use
// and return quickly.
type StatusSource interface {
	Destinations() []relay.DestinationStatus
}

// Config configures New.
type Config struct {
	// Queue is the relay's queue. Required.
	Queue queue.Queue
	// Suppressions is the suppression list; nil disables its endpoints
	// (they answer 404).
	Suppressions relay.Suppressions
	// Token authenticates every request. Required, at least
	// MinTokenLength bytes.
	Token string
	// Recorder supplies the last hour's activity, destinations' last
	// replies and the history of messages that left the queue; nil shows
	// none of it.
	Recorder *Recorder
	// Status supplies deliveries in flight per destination; nil shows
	// none.
	Status StatusSource
	// Logger receives errors; nil discards them.
	Logger *slog.Logger
	// Extra mounts more handlers (such as "/metrics") on the mux, by
	// http.ServeMux pattern, behind the same authentication.
	Extra map[string]http.Handler
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// SessionTTL is how long a dashboard login lasts (default 12 hours).
	SessionTTL time.Duration
	// AuthFailures is how many wrong tokens a client (an IP address, or
	// an IPv6 /64), posted to the login form or sent as a Bearer token,
	// may send in a row (default 5); then it may send one more every
	// AuthFailureEvery (default 10 seconds), and until then every request
	// of it with a token answers 429 with Retry-After. The client is the
	// connection's address: the handler is meant to be reached directly,
	// not through a proxy, and trusts no forwarded-for header.
	AuthFailures     int
	AuthFailureEvery time.Duration
	// AuthClients bounds how many clients' failures are remembered
	// (default 10000); the least recently seen are forgotten first.
	AuthClients int
}

// MinTokenLength is the shortest token New accepts.
const MinTokenLength = 16

// Server is the admin handler. It is safe for concurrent use.
type Server struct {
	cfg     Config
	log     *slog.Logger
	mux     *http.ServeMux
	handler http.Handler
	tokHash [32]byte
	fails   *authLimiter
}

var _ http.Handler = (*Server)(nil)

// cookieName is the dashboard session cookie.
const cookieName = "baton_admin"

// New returns the admin handler for cfg.
func New(cfg Config) (*Server, error) {
	if cfg.Queue == nil {
		return nil, errors.New("admin: Config.Queue is required")
	}
	if len(cfg.Token) < MinTokenLength {
		return nil, errors.New("admin: Config.Token must be at least " + strconv.Itoa(MinTokenLength) + " bytes")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.SessionTTL <= 0 {
		cfg.SessionTTL = 12 * time.Hour
	}
	if cfg.AuthFailures <= 0 {
		cfg.AuthFailures = 5
	}
	if cfg.AuthFailureEvery <= 0 {
		cfg.AuthFailureEvery = 10 * time.Second
	}
	if cfg.AuthClients <= 0 {
		cfg.AuthClients = 10000
	}
	s := &Server{cfg: cfg, log: cfg.Logger, mux: http.NewServeMux(), tokHash: sha256.Sum256([]byte(cfg.Token)),
		fails: newAuthLimiter(cfg.AuthFailures, cfg.AuthFailureEvery, cfg.AuthClients, cfg.Now)}
	s.routes()
	for pattern, h := range cfg.Extra {
		s.mux.Handle(pattern, h)
	}
	cop := http.NewCrossOriginProtection()
	s.handler = cop.Handler(http.HandlerFunc(s.serve))
	return s, nil
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
	s.handler.ServeHTTP(w, r)
}

// serve authenticates the request and dispatches it.
func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/login" {
		s.login(w, r)
		return
	}
	// A Bearer token is a guess until checked: admit it only while the
	// client has failures left, and count it when wrong.
	var attempt *authClient
	if r.Header.Get("Authorization") != "" {
		var wait time.Duration
		if attempt, wait = s.fails.acquire(r.RemoteAddr); attempt == nil {
			s.tooManyFailures(w, r, wait)
			return
		}
	}
	auth := s.authenticate(r)
	if attempt != nil {
		s.fails.release(attempt, auth == authNone)
	}
	if auth == authNone {
		if attempt != nil {
			s.log.Warn("admin request with a wrong token refused", "remote", r.RemoteAddr)
		}
		s.unauthorized(w, r)
		return
	}
	if auth == authCookie && !isSafeMethod(r.Method) && !s.csrfOK(r) {
		http.Error(w, "missing or wrong CSRF token", http.StatusForbidden)
		return
	}
	s.mux.ServeHTTP(w, r)
}

func isSafeMethod(m string) bool {
	return m == http.MethodGet || m == http.MethodHead || m == http.MethodOptions
}

type authKind int

const (
	authNone authKind = iota
	authBearer
	authCookie
)

// authenticate checks the Bearer token, or else the session cookie. A
// request that sends a wrong Bearer token is refused even with a good
// cookie.
func (s *Server) authenticate(r *http.Request) authKind {
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if ok && s.tokenOK(tok) {
			return authBearer
		}
		return authNone
	}
	if c, err := r.Cookie(cookieName); err == nil && s.sessionOK(c.Value) {
		return authCookie
	}
	return authNone
}

func (s *Server) tokenOK(tok string) bool {
	h := sha256.Sum256([]byte(strings.TrimSpace(tok)))
	return subtle.ConstantTimeCompare(h[:], s.tokHash[:]) == 1
}

// mac is HMAC-SHA256 under the token, hex-encoded.
func (s *Server) mac(parts ...string) string {
	m := hmac.New(sha256.New, []byte(s.cfg.Token))
	for _, p := range parts {
		m.Write([]byte(p))
		m.Write([]byte{0})
	}
	return hex.EncodeToString(m.Sum(nil))
}

// newSession returns a cookie value: the expiry and its MAC.
func (s *Server) newSession() (value string, expires time.Time) {
	expires = s.cfg.Now().Add(s.cfg.SessionTTL)
	exp := strconv.FormatInt(expires.Unix(), 10)
	return exp + "." + s.mac("session", exp), expires
}

func (s *Server) sessionOK(v string) bool {
	exp, sum, ok := strings.Cut(v, ".")
	if !ok {
		return false
	}
	n, err := strconv.ParseInt(exp, 10, 64)
	if err != nil || s.cfg.Now().Unix() >= n {
		return false
	}
	return hmac.Equal([]byte(sum), []byte(s.mac("session", exp)))
}

// csrfToken is the CSRF token bound to the request's session cookie.
func (s *Server) csrfToken(r *http.Request) string {
	c, err := r.Cookie(cookieName)
	if err != nil {
		return ""
	}
	return s.mac("csrf", c.Value)
}

func (s *Server) csrfOK(r *http.Request) bool {
	want := s.csrfToken(r)
	got := r.Header.Get("X-CSRF-Token")
	if got == "" {
		got = r.PostFormValue("csrf")
	}
	return want != "" && hmac.Equal([]byte(got), []byte(want))
}

func (s *Server) unauthorized(w http.ResponseWriter, r *http.Request) {
	browser := strings.Contains(r.Header.Get("Accept"), "text/html")
	if !browser || strings.HasPrefix(r.URL.Path, "/api/") || r.Header.Get("Authorization") != "" || !isSafeMethod(r.Method) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="baton admin"`)
		writeJSON(w, http.StatusUnauthorized, errorBody{Error: "authentication required", Kind: "unauthorized"})
		return
	}
	http.Redirect(w, r, "/login?next="+url.QueryEscape(r.URL.RequestURI()), http.StatusSeeOther)
}

// tooManyFailures answers a client that has sent too many wrong tokens:
// 429 with Retry-After, as the login page for a browser's form and as
// JSON for the API.
func (s *Server) tooManyFailures(w http.ResponseWriter, r *http.Request, wait time.Duration) {
	secs := retryAfter(wait)
	w.Header().Set("Retry-After", strconv.Itoa(secs))
	s.log.Warn("admin authentication throttled", "remote", r.RemoteAddr, "retry_after", secs)
	if r.URL.Path == "/login" {
		s.render(w, r, http.StatusTooManyRequests, "login", loginPage{Next: localPath(r.FormValue("next")), RetryAfter: secs})
		return
	}
	writeJSON(w, http.StatusTooManyRequests, errorBody{Error: "too many failed authentications; retry in " + strconv.Itoa(secs) + "s", Kind: "rate_limited"})
}

// login shows the form (GET) and exchanges the token for a session
// cookie (POST).
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	next := localPath(r.FormValue("next"))
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		s.render(w, r, http.StatusOK, "login", loginPage{Next: next})
	case http.MethodPost:
		attempt, wait := s.fails.acquire(r.RemoteAddr)
		if attempt == nil {
			s.tooManyFailures(w, r, wait)
			return
		}
		ok := s.tokenOK(r.PostFormValue("token"))
		s.fails.release(attempt, !ok)
		if !ok {
			s.log.Warn("admin login refused", "remote", r.RemoteAddr)
			s.render(w, r, http.StatusUnauthorized, "login", loginPage{Next: next, Failed: true})
			return
		}
		v, exp := s.newSession()
		http.SetCookie(w, &http.Cookie{Name: cookieName, Value: v, Path: "/", Expires: exp, HttpOnly: true,
			Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
		http.Redirect(w, r, next, http.StatusSeeOther)
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
	}
}

// logout ends the browser's session.
func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	http.SetCookie(w, &http.Cookie{Name: cookieName, Value: "", Path: "/", MaxAge: -1, HttpOnly: true,
		Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, "/login", http.StatusSeeOther)
}

// localPath returns p if it is a path on this server, "/" otherwise, so
// the login form cannot redirect elsewhere. Control characters are refused
// too: browsers drop tabs and newlines from a URL before resolving it, so
// "/\t/evil.example" would lead them to another site.
func localPath(p string) string {
	if !strings.HasPrefix(p, "/") || strings.HasPrefix(p, "//") || strings.HasPrefix(p, "/\\") ||
		strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
		return "/"
	}
	return p
}

func (s *Server) routes() {
	m := s.mux
	// The queue API is the admin socket's handler: /api/v1/queue/X is its
	// /v1/X.
	qh := queueadmin.Handler(s.cfg.Queue, s.log)
	m.Handle("/api/v1/queue/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r2 := new(http.Request)
		*r2 = *r
		u := *r.URL
		u.Path = "/v1/" + strings.TrimPrefix(r.URL.Path, "/api/v1/queue/")
		u.RawPath = ""
		r2.URL = &u
		qh.ServeHTTP(w, r2)
	}))
	m.HandleFunc("GET /api/v1/stats", s.apiStats)
	m.HandleFunc("GET /api/v1/destinations", s.apiDestinations)
	m.HandleFunc("GET /api/v1/search", s.apiSearch)
	m.HandleFunc("GET /api/v1/message", s.apiMessage)
	m.HandleFunc("GET /api/v1/suppressions", s.apiSuppressions)
	m.HandleFunc("POST /api/v1/suppressions/add", s.apiSuppressionAdd)
	m.HandleFunc("POST /api/v1/suppressions/remove", s.apiSuppressionRemove)
	m.HandleFunc("GET /api/v1/sandbox", s.apiSandbox)
	m.HandleFunc("GET /api/v1/sandbox/messages", s.apiSandboxMessages)
	m.HandleFunc("GET /api/v1/sandbox/message", s.apiSandboxMessage)
	m.HandleFunc("GET /api/v1/sandbox/raw", s.apiSandboxRaw)

	m.HandleFunc("GET /{$}", s.pageOverview)
	m.HandleFunc("GET /destinations", s.pageDestinations)
	m.HandleFunc("GET /search", s.pageSearch)
	m.HandleFunc("GET /message", s.pageMessage)
	m.HandleFunc("POST /message/action", s.pageMessageAction)
	m.HandleFunc("GET /sandbox", s.pageSandbox)
	m.HandleFunc("GET /sandbox/view", s.pageSandboxView)
	m.HandleFunc("GET /suppressions", s.pageSuppressions)
	m.HandleFunc("POST /suppressions/action", s.pageSuppressionAction)
	m.HandleFunc("POST /logout", s.logout)
}
