package admin

import (
	"context"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

const testToken = "test-token-0123456789abcdef"

type fixture struct {
	t    *testing.T
	q    *queue.Memory
	supp *relay.SuppressionMemory
	rec  *Recorder
	srv  *Server
	ts   *httptest.Server
	now  time.Time
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{t: t, q: queue.NewMemory(queue.MemoryConfig{}), supp: relay.NewSuppressionMemory(relay.SuppressionConfig{})}
	t.Cleanup(func() { f.q.Close() })
	f.rec = NewRecorder(RecorderConfig{Queue: f.q})
	var err error
	// The tests here send wrong tokens on purpose, more than the default
	// allowance; TestAuthLimit_* test the throttle.
	f.srv, err = New(Config{Queue: f.q, Suppressions: f.supp, Token: testToken, Recorder: f.rec, AuthFailures: 1000,
		Extra: map[string]http.Handler{"GET /metrics": http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "metric 1\n") })}})
	if err != nil {
		t.Fatal(err)
	}
	f.ts = httptest.NewServer(f.srv)
	t.Cleanup(f.ts.Close)
	return f
}

func (f *fixture) enqueue(env *queue.Envelope, body string) queue.ID {
	f.t.Helper()
	id, err := f.q.Enqueue(context.Background(), env, strings.NewReader(body))
	if err != nil {
		f.t.Fatal(err)
	}
	return id
}

// do sends a request with the Bearer token (when tok is not empty).
func (f *fixture) do(method, path, tok string, hdr map[string]string) *http.Response {
	f.t.Helper()
	req, err := http.NewRequest(method, f.ts.URL+path, nil)
	if err != nil {
		f.t.Fatal(err)
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := noRedirect.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { resp.Body.Close() })
	return resp
}

var noRedirect = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// api calls path with the token, wants status 200 and decodes the body into v.
func (f *fixture) api(method, path string, v any) {
	f.t.Helper()
	resp := f.do(method, path, testToken, nil)
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		f.t.Fatalf("%s %s: %s: %s", method, path, resp.Status, body)
	}
	if v != nil {
		if err := json.Unmarshal(body, v); err != nil {
			f.t.Fatalf("%s %s: %v in %s", method, path, err, body)
		}
	}
}

func wantStatus(t *testing.T, resp *http.Response, want int) {
	t.Helper()
	if resp.StatusCode != want {
		body, _ := io.ReadAll(resp.Body)
		t.Fatalf("%s %s: status %s, want %d: %s", resp.Request.Method, resp.Request.URL.Path, resp.Status, want, body)
	}
}

func TestNew_RefusesShortToken(t *testing.T) {
	if _, err := New(Config{Queue: queue.NewMemory(queue.MemoryConfig{}), Token: "short"}); err == nil {
		t.Fatal("New accepted a 5-byte token")
	}
}

func TestAuth_TokenRequired(t *testing.T) {
	f := newFixture(t)
	for _, p := range []string{"/api/v1/stats", "/api/v1/queue/list", "/api/v1/suppressions", "/api/v1/sandbox", "/metrics"} {
		resp := f.do("GET", p, "", nil)
		wantStatus(t, resp, http.StatusUnauthorized)
		if !strings.HasPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer") {
			t.Errorf("%s: WWW-Authenticate = %q", p, resp.Header.Get("WWW-Authenticate"))
		}
		wantStatus(t, f.do("GET", p, "wrong-token-0123456789abcdef", nil), http.StatusUnauthorized)
		wantStatus(t, f.do("GET", p, testToken[:len(testToken)-1], nil), http.StatusUnauthorized)
		wantStatus(t, f.do("GET", p, testToken, nil), http.StatusOK)
	}
	// A wrong Authorization scheme is refused too.
	wantStatus(t, f.do("GET", "/api/v1/stats", "", map[string]string{"Authorization": "Basic " + testToken}), http.StatusUnauthorized)
	// State changes without a token are refused and change nothing.
	id := f.enqueue(&queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: "b@y.test"}}}, "Subject: s\r\n\r\nbody\r\n")
	wantStatus(t, f.do("POST", "/api/v1/queue/delete?id="+string(id), "", nil), http.StatusUnauthorized)
	wantStatus(t, f.do("POST", "/api/v1/queue/delete?id="+string(id), "not-the-token-0123456789", nil), http.StatusUnauthorized)
	if _, err := f.q.Get(context.Background(), id); err != nil {
		t.Fatalf("message gone after unauthenticated delete: %v", err)
	}
	// Pages send browsers to the login form, keeping where they were.
	resp := f.do("GET", "/destinations", "", nil)
	wantStatus(t, resp, http.StatusUnauthorized)
	resp = f.do("GET", "/destinations", "", map[string]string{"Accept": "text/html,*/*"})
	wantStatus(t, resp, http.StatusSeeOther)
	if loc := resp.Header.Get("Location"); loc != "/login?next=%2Fdestinations" {
		t.Fatalf("redirect to %q", loc)
	}
	wantStatus(t, f.do("GET", "/login", "", nil), http.StatusOK)
}

// login posts the token to the login form and returns the session cookie.
func (f *fixture) login(tok string) (*http.Cookie, *http.Response) {
	f.t.Helper()
	resp, err := noRedirect.PostForm(f.ts.URL+"/login", url.Values{"token": {tok}, "next": {"/search"}})
	if err != nil {
		f.t.Fatal(err)
	}
	resp.Body.Close()
	for _, c := range resp.Cookies() {
		if c.Name == cookieName {
			return c, resp
		}
	}
	return nil, resp
}

func TestLogin_SessionCookieAndCSRF(t *testing.T) {
	f := newFixture(t)
	if c, resp := f.login("wrong-token-0123456789abcdef"); c != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong token: status %d, cookie %v", resp.StatusCode, c)
	}
	c, resp := f.login(testToken)
	if c == nil || resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/search" {
		t.Fatalf("login: status %d, location %q, cookie %v", resp.StatusCode, resp.Header.Get("Location"), c)
	}
	if !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || strings.Contains(c.Value, testToken) {
		t.Fatalf("session cookie %+v: want HttpOnly, SameSite=Strict, no token inside", c)
	}
	cookie := map[string]string{"Cookie": c.String()}
	wantStatus(t, f.do("GET", "/", "", cookie), http.StatusOK)
	wantStatus(t, f.do("GET", "/api/v1/stats", "", cookie), http.StatusOK)

	id := f.enqueue(&queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: "b@y.test"}}}, "Subject: s\r\n\r\nbody\r\n")
	hold := "/api/v1/queue/hold?id=" + string(id)
	// The cookie alone cannot change state: a forged form would carry it.
	wantStatus(t, f.do("POST", hold, "", cookie), http.StatusForbidden)
	wantStatus(t, f.do("POST", hold, "", map[string]string{"Cookie": c.String(), "X-CSRF-Token": "0123"}), http.StatusForbidden)
	if m, _ := f.q.Get(context.Background(), id); m.State == queue.StateHeld {
		t.Fatal("held without a CSRF token")
	}
	// With the session's CSRF token (as the pages embed it) it can.
	req := httptest.NewRequest("GET", "/", nil)
	req.AddCookie(c)
	csrf := f.srv.csrfToken(req)
	wantStatus(t, f.do("POST", hold, "", map[string]string{"Cookie": c.String(), "X-CSRF-Token": csrf}), http.StatusOK)
	if m, _ := f.q.Get(context.Background(), id); m.State != queue.StateHeld {
		t.Fatalf("state %v after hold with CSRF token", m.State)
	}
	// The form field works as well (the message page's buttons).
	form := url.Values{"csrf": {csrf}, "id": {string(id)}, "op": {"release"}}
	req2, _ := http.NewRequest("POST", f.ts.URL+"/message/action", strings.NewReader(form.Encode()))
	req2.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req2.AddCookie(c)
	resp2, err := noRedirect.Do(req2)
	if err != nil {
		t.Fatal(err)
	}
	resp2.Body.Close()
	wantStatus(t, resp2, http.StatusSeeOther)
	if m, _ := f.q.Get(context.Background(), id); m.State == queue.StateHeld {
		t.Fatal("still held after the release button")
	}
	// A cross-site browser POST is refused even with a valid token.
	wantStatus(t, f.do("POST", hold, testToken, map[string]string{"Sec-Fetch-Site": "cross-site"}), http.StatusForbidden)
	wantStatus(t, f.do("POST", hold, "", map[string]string{"Cookie": c.String(), "X-CSRF-Token": csrf, "Origin": "https://evil.example"}), http.StatusForbidden)
	// A tampered or foreign session is not a session.
	bad := *c
	bad.Value = strings.Replace(c.Value, ".", ".0", 1)
	wantStatus(t, f.do("GET", "/api/v1/stats", "", map[string]string{"Cookie": bad.String()}), http.StatusUnauthorized)
	// Logging out needs the CSRF token too.
	wantStatus(t, f.do("POST", "/logout", "", cookie), http.StatusForbidden)
}

func TestLogin_SessionExpires(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{})
	defer q.Close()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	srv, err := New(Config{Queue: q, Token: testToken, Now: func() time.Time { return now }, SessionTTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	v, _ := srv.newSession()
	req := httptest.NewRequest("GET", "/api/v1/stats", nil)
	req.AddCookie(&http.Cookie{Name: cookieName, Value: v})
	if srv.authenticate(req) != authCookie {
		t.Fatal("fresh session refused")
	}
	now = now.Add(time.Hour)
	if srv.authenticate(req) != authNone {
		t.Fatal("session accepted after its TTL")
	}
}

func TestLogin_NextStaysOnServer(t *testing.T) {
	for in, want := range map[string]string{"/search?q=x": "/search?q=x", "//evil.example/": "/", "https://evil.example": "/", `/\evil.example`: "/", "": "/"} {
		if got := localPath(in); got != want {
			t.Errorf("localPath(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestAPI_QueueOperations(t *testing.T) {
	f := newFixture(t)
	id := f.enqueue(&queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: "b@y.test"}, {Addr: "c@z.test"}}}, "Subject: s\r\n\r\nbody\r\n")
	id2 := f.enqueue(&queue.Envelope{From: "d@x.test", To: []queue.Recipient{{Addr: "e@y.test"}}}, "Subject: t\r\n\r\nbody\r\n")

	resp := f.do("GET", "/api/v1/queue/list?sender=a@x.test", testToken, nil)
	wantStatus(t, resp, http.StatusOK)
	var listed []queue.Message
	dec := json.NewDecoder(resp.Body)
	for dec.More() {
		var m queue.Message
		if err := dec.Decode(&m); err != nil {
			t.Fatal(err)
		}
		listed = append(listed, m)
	}
	if len(listed) != 1 || listed[0].ID != id {
		t.Fatalf("list by sender = %+v", listed)
	}
	var m queue.Message
	f.api("GET", "/api/v1/queue/get?id="+string(id), &m)
	if m.ID != id || len(m.Recipients) != 2 {
		t.Fatalf("get = %+v", m)
	}
	f.api("POST", "/api/v1/queue/hold?id="+string(id), nil)
	f.api("GET", "/api/v1/queue/get?id="+string(id), &m)
	if m.State != queue.StateHeld {
		t.Fatalf("after hold: %v", m.State)
	}
	f.api("POST", "/api/v1/queue/release?id="+string(id), nil)
	f.api("GET", "/api/v1/queue/get?id="+string(id), &m)
	if m.State == queue.StateHeld {
		t.Fatal("still held after release")
	}
	var n struct{ Count int }
	f.api("POST", "/api/v1/queue/retry?domain=y.test", &n)
	if n.Count != 2 {
		t.Fatalf("retry touched %d messages, want 2", n.Count)
	}
	var st queue.Stats
	f.api("GET", "/api/v1/queue/stats", &st)
	if st.ByState[queue.StateQueued] != 2 {
		t.Fatalf("stats = %+v", st)
	}
	f.api("POST", "/api/v1/queue/delete?id="+string(id2), nil)
	wantStatus(t, f.do("GET", "/api/v1/queue/get?id="+string(id2), testToken, nil), http.StatusNotFound)
	wantStatus(t, f.do("POST", "/api/v1/queue/delete?id="+string(id2), testToken, nil), http.StatusNotFound)
	// Operations are POST only.
	wantStatus(t, f.do("GET", "/api/v1/queue/delete?id="+string(id), testToken, nil), http.StatusMethodNotAllowed)
	wantStatus(t, f.do("GET", "/api/v1/nothing", testToken, nil), http.StatusNotFound)
	// Extra handlers sit behind the same authentication.
	resp = f.do("GET", "/metrics", testToken, nil)
	wantStatus(t, resp, http.StatusOK)
	if b, _ := io.ReadAll(resp.Body); string(b) != "metric 1\n" {
		t.Fatalf("/metrics = %q", b)
	}
}

func TestAPI_Suppressions(t *testing.T) {
	f := newFixture(t)
	var s relay.Suppression
	f.api("POST", "/api/v1/suppressions/add?addr=Gone@Y.test&ttl=1h&reason=closed+account", &s)
	if s.Addr != "Gone@Y.test" || s.Reply.Text != "closed account" || s.Expires.Sub(s.Created) != time.Hour {
		t.Fatalf("added %+v", s)
	}
	if _, ok, _ := f.supp.Lookup(context.Background(), "gone@y.test"); !ok {
		t.Fatal("not in the store after add")
	}
	var list []relay.Suppression
	f.api("GET", "/api/v1/suppressions", &list)
	if len(list) != 1 || list[0].Addr != "Gone@Y.test" {
		t.Fatalf("list = %+v", list)
	}
	wantStatus(t, f.do("POST", "/api/v1/suppressions/add?addr=nobody", testToken, nil), http.StatusBadRequest)
	wantStatus(t, f.do("POST", "/api/v1/suppressions/add?addr=a@b.test&ttl=soon", testToken, nil), http.StatusBadRequest)
	wantStatus(t, f.do("GET", "/api/v1/suppressions/add?addr=a@b.test", testToken, nil), http.StatusMethodNotAllowed)
	f.api("POST", "/api/v1/suppressions/remove?addr=gone@y.test", nil)
	if _, ok, _ := f.supp.Lookup(context.Background(), "gone@y.test"); ok {
		t.Fatal("still suppressed after remove")
	}
	f.api("GET", "/api/v1/suppressions", &list)
	if len(list) != 0 {
		t.Fatalf("list after remove = %+v", list)
	}
}

func TestAPI_SuppressionsAbsent(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{})
	defer q.Close()
	srv, err := New(Config{Queue: q, Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("GET", "/api/v1/suppressions", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	w := httptest.NewRecorder()
	srv.ServeHTTP(w, req)
	if w.Code != http.StatusNotFound {
		t.Fatalf("without a store: %d", w.Code)
	}
}

const sandboxMsg = "From: App <app@x.test>\r\nTo: user@y.test\r\nSubject: =?utf-8?q?Welcome_=E2=9C=93?=\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nHello =E2=9C=93 <b>not html</b>\r\n--b\r\nContent-Type: text/html\r\n\r\n<p>Hello</p>\r\n--b--\r\n"

func TestAPI_Sandbox(t *testing.T) {
	f := newFixture(t)
	id := f.enqueue(&queue.Envelope{From: "app@x.test", To: []queue.Recipient{{Addr: "user@y.test"}}, Identity: "staging-app", Held: true, Sandbox: true}, sandboxMsg)
	f.enqueue(&queue.Envelope{From: "app@x.test", To: []queue.Recipient{{Addr: "user2@y.test"}}, Identity: "staging-app", Held: true, Sandbox: true}, "Subject: second\r\n\r\nx\r\n")
	plain := f.enqueue(&queue.Envelope{From: "app@x.test", To: []queue.Recipient{{Addr: "user@y.test"}}, Identity: "prod"}, "Subject: real\r\n\r\nx\r\n")

	var boxes []Mailbox
	f.api("GET", "/api/v1/sandbox", &boxes)
	if len(boxes) != 1 || boxes[0].Identity != "staging-app" || boxes[0].Messages != 2 {
		t.Fatalf("boxes = %+v", boxes)
	}
	var msgs []SandboxMessage
	f.api("GET", "/api/v1/sandbox/messages?identity=staging-app", &msgs)
	if len(msgs) != 2 {
		t.Fatalf("messages = %+v", msgs)
	}
	var found bool
	for _, m := range msgs {
		if m.ID == id {
			found = true
			if m.Subject != "Welcome ✓" || m.State != "held" || m.To[0] != "user@y.test" {
				t.Fatalf("summary = %+v", m)
			}
		}
	}
	if !found {
		t.Fatalf("%s not listed: %+v", id, msgs)
	}
	var d SandboxDetail
	f.api("GET", "/api/v1/sandbox/message?id="+string(id), &d)
	if d.TextType != "text/plain" || !strings.Contains(d.Text, "Hello ✓ <b>not html</b>") || d.Subject != "Welcome ✓" {
		t.Fatalf("detail = %+v", d)
	}
	if len(d.Header) < 5 || d.Header[0].Name != "From" {
		t.Fatalf("header = %+v", d.Header)
	}
	resp := f.do("GET", "/api/v1/sandbox/raw?id="+string(id), testToken, nil)
	wantStatus(t, resp, http.StatusOK)
	raw, _ := io.ReadAll(resp.Body)
	if string(raw) != sandboxMsg {
		t.Fatalf("raw download differs:\n%q\nwant\n%q", raw, sandboxMsg)
	}
	if ct, cd := resp.Header.Get("Content-Type"), resp.Header.Get("Content-Disposition"); ct != "message/rfc822" || !strings.HasPrefix(cd, "attachment;") || !strings.Contains(cd, ".eml") {
		t.Fatalf("headers %q %q", ct, cd)
	}
	// Mail that is not sandbox mail is not served here.
	wantStatus(t, f.do("GET", "/api/v1/sandbox/raw?id="+string(plain), testToken, nil), http.StatusNotFound)
	wantStatus(t, f.do("GET", "/api/v1/sandbox/message?id="+string(plain), testToken, nil), http.StatusNotFound)
	wantStatus(t, f.do("GET", "/api/v1/sandbox/raw?id=nope", testToken, nil), http.StatusNotFound)
	wantStatus(t, f.do("GET", "/api/v1/sandbox/raw", testToken, nil), http.StatusBadRequest)

	// The viewer escapes the message: the text's markup is shown, not run.
	resp = f.do("GET", "/sandbox/view?id="+string(id), testToken, nil)
	wantStatus(t, resp, http.StatusOK)
	page, _ := io.ReadAll(resp.Body)
	if !strings.Contains(string(page), "Hello ✓ &lt;b&gt;not html&lt;/b&gt;") {
		t.Fatalf("viewer page does not show the escaped text:\n%s", page)
	}
}

func TestAPI_StatsDestinationsSearchMessage(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	queued := f.enqueue(&queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: "b@y.test"}, {Addr: "c@z.test"}}}, "Subject: s\r\n\r\nbody\r\n")
	now := time.Now()
	ev := func(e relay.Event) { e.Time = now; f.rec.Observe(ctx, e) }
	ev(relay.Event{Kind: relay.EventAccepted, ID: queued, From: "a@x.test", Rcpt: "b@y.test"})
	ev(relay.Event{Kind: relay.EventAccepted, ID: queued, From: "a@x.test", Rcpt: "c@z.test"})
	ev(relay.Event{Kind: relay.EventDeferred, ID: queued, From: "a@x.test", Rcpt: "b@y.test", Dest: "mx:y.test", Reply: queue.Reply{Code: 451, Enhanced: "4.7.1", Text: "greylisted", Host: "mx.y.test"}, TLS: relay.TLSInfo{Version: 0x0304, Verified: true}, Attempts: 1})
	// A message that left the queue: only the Recorder knows it.
	ev(relay.Event{Kind: relay.EventAccepted, ID: "gone1", From: "old@x.test", Rcpt: "d@y.test"})
	ev(relay.Event{Kind: relay.EventDelivered, ID: "gone1", From: "old@x.test", Rcpt: "d@y.test", Dest: "mx:y.test", Reply: queue.Reply{Code: 250, Text: "ok", Host: "mx.y.test"}, TLS: relay.TLSInfo{Version: 0x0304}, Attempts: 1})
	ev(relay.Event{Kind: relay.EventFailed, ID: "gone2", From: "old@x.test", Rcpt: "e@w.test", Dest: "mx:w.test", Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}, Attempts: 1})

	var st StatsView
	f.api("GET", "/api/v1/stats", &st)
	if st.Depth != 1 || st.Queue.ByState[queue.StateQueued] != 1 || st.Queue.ByState[queue.StateHeld] != 0 {
		t.Fatalf("queue = %d %+v", st.Depth, st.Queue.ByState)
	}
	if want := (Counts{Accepted: 3, Delivered: 1, Deferred: 1, Bounced: 1}); st.LastHour.Totals != want {
		t.Fatalf("last hour = %+v, want %+v", st.LastHour.Totals, want)
	}
	last := st.LastHour.Minutes[len(st.LastHour.Minutes)-1]
	if len(st.LastHour.Minutes) != 60 || last.Depth == nil || *last.Depth != 1 || last.Delivered != 1 {
		t.Fatalf("minutes: %d, last %+v", len(st.LastHour.Minutes), last)
	}

	var rows []DestinationRow
	f.api("GET", "/api/v1/destinations", &rows)
	byDest := map[string]DestinationRow{}
	for _, r := range rows {
		byDest[r.Dest] = r
	}
	y := byDest["mx:y.test"]
	if y.Queued != 1 || y.Delivered != 1 || y.Deferred != 1 || y.LastReply.Code != 250 || y.TLS != "TLS 1.3" {
		t.Fatalf("mx:y.test row = %+v", y)
	}
	// z.test has a pending recipient but no attempt yet.
	if z := byDest["domain:z.test"]; z.Queued != 1 {
		t.Fatalf("rows = %+v", rows)
	}
	if w := byDest["mx:w.test"]; w.Bounced != 1 || w.Queued != 0 || w.TLS != "none" {
		t.Fatalf("mx:w.test row = %+v", w)
	}

	var res []MessageSummary
	f.api("GET", "/api/v1/search?q=OLD@x.test", &res)
	if len(res) != 2 || res[0].State != "done" || res[0].InQueue {
		t.Fatalf("search by sender = %+v", res)
	}
	f.api("GET", "/api/v1/search?q=c@z.test", &res)
	if len(res) != 1 || res[0].ID != queued || !res[0].InQueue {
		t.Fatalf("search by recipient = %+v", res)
	}
	f.api("GET", "/api/v1/search?q="+string(queued), &res)
	if len(res) != 1 || res[0].ID != queued {
		t.Fatalf("search by ID = %+v", res)
	}
	f.api("GET", "/api/v1/search?q=nobody@nowhere.test", &res)
	if len(res) != 0 {
		t.Fatalf("search for nothing = %+v", res)
	}

	var d MessageDetail
	f.api("GET", "/api/v1/message?id="+string(queued), &d)
	if !d.InQueue || len(d.Recipients) != 2 {
		t.Fatalf("detail = %+v", d)
	}
	b := d.Recipients[0]
	if b.Addr != "b@y.test" || len(b.History) != 2 || b.History[0].Kind != "accepted" || b.History[1].Kind != "deferred" || b.History[1].TLS != "TLS 1.3" {
		t.Fatalf("b@y.test = %+v", b)
	}
	f.api("GET", "/api/v1/message?id=gone1", &d)
	if d.InQueue || d.State != "done" || len(d.Recipients) != 1 || d.Recipients[0].State != "delivered" || len(d.Recipients[0].History) != 2 {
		t.Fatalf("gone1 = %+v", d)
	}
	wantStatus(t, f.do("GET", "/api/v1/message?id=never", testToken, nil), http.StatusNotFound)

	// The pages render with the same data.
	for _, p := range []string{"/", "/destinations", "/search?q=old@x.test", "/message?id=gone1", "/message?id=" + string(queued), "/sandbox"} {
		resp := f.do("GET", p, testToken, nil)
		wantStatus(t, resp, http.StatusOK)
		if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/html") {
			t.Fatalf("%s: Content-Type %q", p, ct)
		}
	}
}

// The message page's buttons run the queue operations.
func TestPage_MessageActions(t *testing.T) {
	f := newFixture(t)
	id := f.enqueue(&queue.Envelope{From: "a@x.test", To: []queue.Recipient{{Addr: "b@y.test"}}}, "Subject: s\r\n\r\nbody\r\n")
	post := func(op string) {
		t.Helper()
		req, _ := http.NewRequest("POST", f.ts.URL+"/message/action", strings.NewReader(url.Values{"id": {string(id)}, "op": {op}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := noRedirect.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		wantStatus(t, resp, http.StatusSeeOther)
	}
	post("hold")
	if m, _ := f.q.Get(context.Background(), id); m.State != queue.StateHeld {
		t.Fatalf("after hold: %v", m.State)
	}
	post("release")
	post("retry")
	post("delete")
	if _, err := f.q.Get(context.Background(), id); err == nil {
		t.Fatal("still queued after delete")
	}
}

// Browsers drop tabs and newlines from a URL before they resolve it, so a
// next of "/\t/evil.example" is "//evil.example" to them: another site.
func TestLogin_NextControlCharacters(t *testing.T) {
	f := newFixture(t)
	for _, next := range []string{"/\t/evil.example/", "/\n/evil.example/", "/\r\n/evil.example/", "/\x00/evil.example/", "/\t\\evil.example/"} {
		// Served directly: net/http's client would refuse such a Location
		// itself, where a browser follows it.
		req := httptest.NewRequest("POST", "/login", strings.NewReader(url.Values{"token": {testToken}, "next": {next}}.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		w := httptest.NewRecorder()
		f.srv.ServeHTTP(w, req)
		if w.Code != http.StatusSeeOther {
			t.Fatalf("next %q: status %d", next, w.Code)
		}
		if loc := w.Header().Get("Location"); loc != "/" {
			t.Errorf("next %q: redirected to %q, want /", next, loc)
		}
	}
}

// The pages' links carry identities and IDs as query values that come back
// unchanged: html/template escapes them once, and must not be given an
// already escaped value ("dev%40x.test" would arrive as "dev%2540x.test").
func TestPage_LinksCarryQueryValues(t *testing.T) {
	f := newFixture(t)
	const identity = "dev+1@x.test"
	id := f.enqueue(&queue.Envelope{From: "app@x.test", To: []queue.Recipient{{Addr: "user@y.test"}}, Identity: identity, Held: true, Sandbox: true}, sandboxMsg)
	hrefs := func(path string) []*url.URL {
		resp := f.do("GET", path, testToken, nil)
		wantStatus(t, resp, http.StatusOK)
		page, _ := io.ReadAll(resp.Body)
		var out []*url.URL
		for _, m := range regexp.MustCompile(`href="([^"]*)"`).FindAllStringSubmatch(string(page), -1) {
			u, err := url.Parse(html.UnescapeString(m[1]))
			if err != nil {
				t.Fatalf("%s: href %q: %v", path, m[1], err)
			}
			out = append(out, u)
		}
		return out
	}
	check := func(path, linkPath, param, want string) {
		t.Helper()
		found := false
		for _, u := range hrefs(path) {
			if u.Path == linkPath && u.Query().Has(param) {
				found = true
				if got := u.Query().Get(param); got != want {
					t.Errorf("%s: link %s has %s=%q, want %q", path, u, param, got, want)
				}
			}
		}
		if !found {
			t.Errorf("%s: no link to %s", path, linkPath)
		}
	}
	check("/sandbox", "/sandbox", "identity", identity)
	check("/sandbox/view?id="+string(id), "/sandbox", "identity", identity)
	check("/sandbox/view?id="+string(id), "/message", "id", string(id))
	check("/sandbox?identity="+url.QueryEscape(identity), "/sandbox/view", "id", string(id))
}

// nestedMsg is a message of depth nested multiparts with a text part at
// the bottom.
func nestedMsg(depth int) string {
	var b strings.Builder
	b.WriteString("Subject: nested\r\nMIME-Version: 1.0\r\n")
	for i := range depth {
		fmt.Fprintf(&b, "Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n", i, i)
	}
	b.WriteString("Content-Type: text/plain\r\n\r\nat the bottom\r\n")
	for i := depth - 1; i >= 0; i-- {
		fmt.Fprintf(&b, "--n%d--\r\n", i)
	}
	return b.String()
}

// Captured mail is the sender's to shape: the viewer looks for text only
// a few multiparts deep, since each level costs a reader and walking a
// message nested thousands deep would take the admin listener's time and
// memory.
func TestAPI_SandboxNestingBounded(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		depth int
		text  bool
	}{{3, true}, {maxPartDepth, true}, {maxPartDepth + 1, false}, {5000, false}} {
		id := f.enqueue(&queue.Envelope{From: "app@x.test", To: []queue.Recipient{{Addr: "user@y.test"}}, Identity: "dev", Held: true, Sandbox: true}, nestedMsg(tc.depth))
		var d SandboxDetail
		f.api("GET", "/api/v1/sandbox/message?id="+string(id), &d)
		if got := strings.Contains(d.Text, "at the bottom"); got != tc.text {
			t.Errorf("nested %d deep: text shown %v, want %v (%+v)", tc.depth, got, tc.text, d)
		}
	}
}

// postForm posts a dashboard form with the session cookie and, when csrf
// is not empty, its CSRF token.
func (f *fixture) postForm(path string, c *http.Cookie, csrf string, form url.Values) *http.Response {
	f.t.Helper()
	if csrf != "" {
		form.Set("csrf", csrf)
	}
	req, _ := http.NewRequest("POST", f.ts.URL+path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.AddCookie(c)
	resp, err := noRedirect.Do(req)
	if err != nil {
		f.t.Fatal(err)
	}
	f.t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// getPage fetches a page with the session cookie and returns its HTML.
func (f *fixture) getPage(path string, c *http.Cookie) string {
	f.t.Helper()
	resp := f.do("GET", path, "", map[string]string{"Cookie": c.String()})
	wantStatus(f.t, resp, http.StatusOK)
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

var suppRow = regexp.MustCompile(`<tr data-addr="([^"]*)">`)

func suppRows(page string) []string {
	var out []string
	for _, m := range suppRow.FindAllStringSubmatch(page, -1) {
		out = append(out, html.UnescapeString(m[1]))
	}
	return out
}

func dataValue(t *testing.T, page, id string) string {
	t.Helper()
	m := regexp.MustCompile(`id="` + id + `" data-value="([^"]*)"`).FindStringSubmatch(page)
	if m == nil {
		t.Fatalf("no #%s in the page", id)
	}
	return m[1]
}

func TestPage_Suppressions(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	for _, a := range []string{"b@y.test", "a@x.test", "c@x.test"} {
		if err := f.supp.Add(ctx, relay.Suppression{Addr: a, Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Reply text comes from remote servers: a hostile one must stay text.
	evil := `<script>alert(1)</script><img src=x onerror=alert(2)>`
	if err := f.supp.Add(ctx, relay.Suppression{Addr: "evil@z.test", Reply: queue.Reply{Code: 550, Text: evil}}); err != nil {
		t.Fatal(err)
	}
	c, _ := f.login(testToken)
	req := httptest.NewRequest("GET", "/", nil)
	req.AddCookie(c)
	csrf := f.srv.csrfToken(req)

	page := f.getPage("/suppressions", c)
	if got := fmt.Sprint(suppRows(page)); got != "[a@x.test b@y.test c@x.test evil@z.test]" {
		t.Fatalf("rows %s", got)
	}
	if dataValue(t, page, "supp-total") != "4" || dataValue(t, page, "supp-shown") != "4" || strings.Contains(page, "showing") {
		t.Fatalf("counts wrong in %s", page)
	}
	if strings.Contains(page, "<script>alert") || strings.Contains(page, "<img src=x") || !strings.Contains(page, "&lt;script&gt;alert(1)&lt;/script&gt;") {
		t.Fatalf("reply text not escaped: %s", page)
	}
	if !strings.Contains(page, `href="/suppressions" class="on"`) {
		t.Error("nav entry missing or not current")
	}

	// Search: a substring of the address, any case.
	page = f.getPage("/suppressions?q=X.TEST", c)
	if got := fmt.Sprint(suppRows(page)); got != "[a@x.test c@x.test]" || dataValue(t, page, "supp-total") != "2" {
		t.Fatalf("search rows %s", got)
	}
	if page = f.getPage("/suppressions?q=nomatch", c); len(suppRows(page)) != 0 || !strings.Contains(page, `id="supp-empty"`) {
		t.Fatal("no empty note for a search without matches")
	}

	// Add, with a reason and a search to return to.
	resp := f.postForm("/suppressions/action", c, csrf, url.Values{"op": {"add"}, "addr": {" New@X.test "}, "reason": {"asked to stop"}, "q": {"x.test"}})
	wantStatus(t, resp, http.StatusSeeOther)
	if loc := resp.Header.Get("Location"); loc != "/suppressions?q=x.test" {
		t.Errorf("after add: location %q", loc)
	}
	got, ok, _ := f.supp.Lookup(ctx, "new@x.test")
	if !ok || got.Addr != "New@X.test" || got.Reply.Text != "asked to stop" || got.Expires.IsZero() {
		t.Fatalf("after add: %+v %v", got, ok)
	}
	wantStatus(t, f.postForm("/suppressions/action", c, csrf, url.Values{"op": {"add"}, "addr": {"nobody"}}), http.StatusBadRequest)

	// Remove.
	wantStatus(t, f.postForm("/suppressions/action", c, csrf, url.Values{"op": {"remove"}, "addr": {"b@y.test"}}), http.StatusSeeOther)
	if _, ok, _ := f.supp.Lookup(ctx, "b@y.test"); ok {
		t.Fatal("still suppressed after the remove button")
	}
	if got := fmt.Sprint(suppRows(f.getPage("/suppressions", c))); got != "[New@X.test a@x.test c@x.test evil@z.test]" {
		t.Fatalf("rows after add and remove: %s", got)
	}
	wantStatus(t, f.postForm("/suppressions/action", c, csrf, url.Values{"op": {"frobnicate"}, "addr": {"a@x.test"}}), http.StatusBadRequest)

	// Without the CSRF token, or with a wrong one, the forms change nothing.
	wantStatus(t, f.postForm("/suppressions/action", c, "", url.Values{"op": {"remove"}, "addr": {"a@x.test"}}), http.StatusForbidden)
	wantStatus(t, f.postForm("/suppressions/action", c, "deadbeef", url.Values{"op": {"remove"}, "addr": {"a@x.test"}}), http.StatusForbidden)
	wantStatus(t, f.postForm("/suppressions/action", c, "", url.Values{"op": {"add"}, "addr": {"forged@x.test"}}), http.StatusForbidden)
	if _, ok, _ := f.supp.Lookup(ctx, "a@x.test"); !ok {
		t.Fatal("removed without a CSRF token")
	}
	if _, ok, _ := f.supp.Lookup(ctx, "forged@x.test"); ok {
		t.Fatal("added without a CSRF token")
	}
}

func TestPage_SuppressionsBounded(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	n := maxSuppressionRows + 20
	for i := range n {
		if err := f.supp.Add(ctx, relay.Suppression{Addr: fmt.Sprintf("u%04d@x.test", i)}); err != nil {
			t.Fatal(err)
		}
	}
	c, _ := f.login(testToken)
	page := f.getPage("/suppressions", c)
	rows := suppRows(page)
	if len(rows) != maxSuppressionRows || rows[0] != "u0000@x.test" || dataValue(t, page, "supp-total") != fmt.Sprint(n) ||
		dataValue(t, page, "supp-shown") != fmt.Sprint(maxSuppressionRows) || !strings.Contains(page, fmt.Sprintf("showing %d of", maxSuppressionRows)) {
		t.Fatalf("%d rows (first %q), total %s", len(rows), rows[0], dataValue(t, page, "supp-total"))
	}
	// A search narrows it below the bound.
	page = f.getPage("/suppressions?q=u051", c)
	if rows := suppRows(page); len(rows) != 10 || dataValue(t, page, "supp-total") != "10" {
		t.Fatalf("search u051: %v", rows)
	}
}

func TestPage_SuppressionsAbsent(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{})
	defer q.Close()
	srv, err := New(Config{Queue: q, Token: testToken})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest("GET", "/suppressions", nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	w := httptest.NewRecorder()
	srv.ServeHTTP(w, req)
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `id="no-suppressions"`) || strings.Contains(w.Body.String(), `action="/suppressions/action"`) {
		t.Fatalf("without a store: %d %s", w.Code, w.Body)
	}
	req = httptest.NewRequest("POST", "/suppressions/action", strings.NewReader("op=add&addr=a@x.test"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Authorization", "Bearer "+testToken)
	w = httptest.NewRecorder()
	srv.ServeHTTP(w, req)
	if w.Code != http.StatusNotFound {
		t.Fatalf("add without a store: %d", w.Code)
	}
}
