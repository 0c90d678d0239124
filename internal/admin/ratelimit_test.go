package admin

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

// limitFixture is a Server with the default throttle and a clock the test
// moves, called in-process so each request can come from any address.
type limitFixture struct {
	t   *testing.T
	srv *Server
	now time.Time
}

func newLimitFixture(t *testing.T) *limitFixture {
	t.Helper()
	q := queue.NewMemory(queue.MemoryConfig{})
	t.Cleanup(func() { q.Close() })
	f := &limitFixture{t: t, now: time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)}
	var err error
	f.srv, err = New(Config{Queue: q, Token: testToken, Now: func() time.Time { return f.now }})
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// bearer sends GET /api/v1/stats from remote with tok as the Bearer token.
func (f *limitFixture) bearer(remote, tok string) *httptest.ResponseRecorder {
	req := httptest.NewRequest("GET", "/api/v1/stats", nil)
	req.RemoteAddr = remote
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	w := httptest.NewRecorder()
	f.srv.ServeHTTP(w, req)
	return w
}

// login posts tok to the login form from remote.
func (f *limitFixture) login(remote, tok string) *httptest.ResponseRecorder {
	req := httptest.NewRequest("POST", "/login", strings.NewReader(url.Values{"token": {tok}, "next": {"/search"}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.RemoteAddr = remote
	w := httptest.NewRecorder()
	f.srv.ServeHTTP(w, req)
	return w
}

func (f *limitFixture) want(step string, w *httptest.ResponseRecorder, status int, retryAfter string) {
	f.t.Helper()
	if w.Code != status || w.Header().Get("Retry-After") != retryAfter {
		f.t.Fatalf("%s: status %d, Retry-After %q; want %d, %q: %s", step, w.Code, w.Header().Get("Retry-After"), status, retryAfter, w.Body)
	}
}

const wrongToken = "wrong-token-0123456789abcdef"

func TestAuthLimit_Bearer(t *testing.T) {
	f := newLimitFixture(t)
	a, b := "192.0.2.1:40000", "192.0.2.2:40000"
	for i := range 5 {
		f.want(fmt.Sprint("wrong token ", i+1), f.bearer(a, wrongToken), http.StatusUnauthorized, "")
	}
	w := f.bearer(a, wrongToken)
	f.want("sixth wrong token", w, http.StatusTooManyRequests, "10")
	if !strings.Contains(w.Body.String(), `"kind": "rate_limited"`) {
		t.Errorf("429 body %s", w.Body)
	}
	// While throttled, even the right token is not checked: a guess that
	// is right must look like one that is wrong. A different source port
	// is the same client.
	f.want("right token while throttled", f.bearer("192.0.2.1:40001", testToken), http.StatusTooManyRequests, "10")
	// Requests without a token guess nothing and are not throttled.
	f.want("no token while throttled", f.bearer(a, ""), http.StatusUnauthorized, "")
	// Other clients keep their own allowance.
	f.want("other client, right token", f.bearer(b, testToken), http.StatusOK, "")
	f.want("other client, wrong token", f.bearer(b, wrongToken), http.StatusUnauthorized, "")

	// The allowance refills one failure per 10 seconds.
	f.now = f.now.Add(4 * time.Second)
	f.want("4s later", f.bearer(a, wrongToken), http.StatusTooManyRequests, "6")
	f.now = f.now.Add(6 * time.Second)
	f.want("10s later", f.bearer(a, wrongToken), http.StatusUnauthorized, "")
	f.want("and again", f.bearer(a, wrongToken), http.StatusTooManyRequests, "10")
	f.now = f.now.Add(10 * time.Second)
	f.want("right token after the wait", f.bearer(a, testToken), http.StatusOK, "")
	// A success gives nothing back: one more failure is allowed, not five.
	f.want("wrong after a success", f.bearer(a, wrongToken), http.StatusUnauthorized, "")
	f.want("then throttled", f.bearer(a, wrongToken), http.StatusTooManyRequests, "10")
}

func TestAuthLimit_LoginForm(t *testing.T) {
	f := newLimitFixture(t)
	a, b := "198.51.100.7:5000", "[2001:db8::1]:5000"
	for i := range 5 {
		f.want(fmt.Sprint("wrong login ", i+1), f.login(a, wrongToken), http.StatusUnauthorized, "")
	}
	w := f.login(a, wrongToken)
	f.want("sixth wrong login", w, http.StatusTooManyRequests, "10")
	if !strings.Contains(w.Body.String(), `id="login-throttled" data-value="10"`) || !strings.Contains(w.Body.String(), `name="next" value="/search"`) {
		t.Errorf("throttled login page: %s", w.Body)
	}
	f.want("right login while throttled", f.login(a, testToken), http.StatusTooManyRequests, "10")
	// The form and the Bearer header draw on one allowance.
	f.want("bearer while the form is throttled", f.bearer(a, testToken), http.StatusTooManyRequests, "10")

	// Another client signs in; that does not lift the first one's limit.
	w = f.login(b, testToken)
	f.want("other client login", w, http.StatusSeeOther, "")
	if !strings.Contains(w.Header().Get("Set-Cookie"), cookieName+"=") {
		t.Fatalf("no session cookie: %v", w.Header())
	}
	f.want("first client after the other's login", f.login(a, testToken), http.StatusTooManyRequests, "10")

	// A session obtained before is not a guess and keeps working.
	req := httptest.NewRequest("GET", "/api/v1/stats", nil)
	req.RemoteAddr = a
	req.Header.Set("Cookie", w.Header().Get("Set-Cookie"))
	rec := httptest.NewRecorder()
	f.srv.ServeHTTP(rec, req)
	f.want("session cookie from the throttled address", rec, http.StatusOK, "")

	f.now = f.now.Add(10 * time.Second)
	f.want("login after the wait", f.login(a, testToken), http.StatusSeeOther, "")
}

func TestAuthLimiter_ConcurrentAttemptsCount(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newAuthLimiter(5, 10*time.Second, 100, func() time.Time { return now })
	// Five attempts in flight at once use the whole allowance: a sixth
	// must wait, though none has failed yet.
	var held []*authClient
	for i := range 5 {
		c, wait := l.acquire("192.0.2.1:1")
		if c == nil {
			t.Fatalf("attempt %d refused (wait %v)", i+1, wait)
		}
		held = append(held, c)
	}
	if c, wait := l.acquire("192.0.2.1:1"); c != nil || wait != 10*time.Second {
		t.Fatalf("sixth concurrent attempt: %v, wait %v", c, wait)
	}
	// When they succeed, the allowance is whole again and the client is
	// forgotten.
	for _, c := range held {
		l.release(c, false)
	}
	if n := l.len(); n != 0 {
		t.Fatalf("%d clients remembered after successes only", n)
	}
	if c, _ := l.acquire("192.0.2.1:1"); c == nil {
		t.Fatal("refused after successful attempts")
	}
}

func TestAuthLimiter_BoundedAndKeyed(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := newAuthLimiter(1, time.Minute, 3, func() time.Time { return now })
	fail := func(remote string) bool {
		c, _ := l.acquire(remote)
		if c == nil {
			return false
		}
		l.release(c, true)
		return true
	}
	for i := 1; i <= 5; i++ {
		if !fail(fmt.Sprintf("192.0.2.%d:1", i)) {
			t.Fatalf("client %d refused at its first failure", i)
		}
		if n := l.len(); n > 3 {
			t.Fatalf("%d clients remembered, bound 3", n)
		}
	}
	// The most recent three are throttled; the oldest were forgotten.
	// (Checked newest first, as admitting a forgotten one evicts again.)
	for _, i := range []int{5, 4, 3, 2, 1} {
		c, _ := l.acquire(fmt.Sprintf("192.0.2.%d:1", i))
		if want := i <= 2; (c != nil) != want {
			t.Errorf("client %d admitted = %v, want %v", i, c != nil, want)
		}
		if c != nil {
			l.release(c, false)
		}
	}
	// An IPv6 /64 is one client; an IPv4-mapped address is its IPv4 one.
	l = newAuthLimiter(1, time.Minute, 10, func() time.Time { return now })
	fail("[2001:db8:1:2::1]:1")
	if c, _ := l.acquire("[2001:db8:1:2:ffff::9]:2"); c != nil {
		t.Error("another address in the same /64 has its own allowance")
	}
	if c, _ := l.acquire("[2001:db8:1:3::1]:1"); c == nil {
		t.Error("another /64 is throttled")
	}
	fail("192.0.2.9:1")
	if c, _ := l.acquire("[::ffff:192.0.2.9]:1"); c != nil {
		t.Error("IPv4-mapped address has its own allowance")
	}
}
