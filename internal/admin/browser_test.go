package admin

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// chromiumPath finds Debian's chromium, or skips the test (fails it when
// BATON_REQUIRE_EXTERNAL=1, as in CI).
func chromiumPath(t *testing.T) string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("BATON_REQUIRE_EXTERNAL") == "1" {
		t.Fatal("chromium not found (apt-get install chromium)")
	}
	t.Skip("chromium not found; install it to run the dashboard browser test")
	return ""
}

// sinkBackend is a destination MX: it accepts mail, except that it
// greylists local parts starting with "defer", rejects those starting with
// "nouser", and holds mail for "slow" until release is closed.
type sinkBackend struct {
	release chan struct{}
	mu      sync.Mutex
	got     int
}

func (b *sinkBackend) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{b: b}, nil }

type sinkSession struct {
	b    *sinkBackend
	slow bool
}

func (s *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	switch {
	case strings.HasPrefix(to, "defer"):
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Greylisted, try again later"}
	case strings.HasPrefix(to, "nouser"):
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
	case strings.HasPrefix(to, "slow"):
		s.slow = true
	}
	return nil
}
func (s *sinkSession) Data(r io.Reader) error {
	io.Copy(io.Discard, r)
	if s.slow {
		<-s.b.release
	}
	s.b.mu.Lock()
	s.b.got++
	s.b.mu.Unlock()
	return nil
}
func (s *sinkSession) Reset()        { s.slow = false }
func (s *sinkSession) Logout() error { return nil }

// liveRelay is a relay with traffic behind the admin handler.
type liveRelay struct {
	q     *queue.Memory
	relay *relay.Relay
	rec   *Recorder
	url   string
}

// startLiveRelay runs a relay that delivers over SMTP with STARTTLS to a
// go-smtp sink on 127.0.0.1, submits a mix of mail (delivered, deferred,
// bounced, one delivery held in flight, sandbox mail), waits until the
// relay is quiet, and serves the admin handler on 127.0.0.1.
func startLiveRelay(t *testing.T) *liveRelay {
	ca := testcert.NewCA()
	sink := &sinkBackend{release: make(chan struct{})}
	srv := smtp.NewServer(sink)
	srv.Domain = "mx.sink.test"
	srv.TLSConfig = ca.ServerConfig("mx.good.test", "mx.other.test", "mx.slow.test", "mx.src.test")
	srv.ErrorLog = nopLogger{}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	port := ln.Addr().(*net.TCPAddr).Port

	res := mx.ResolverFunc(func(ctx context.Context, d string) (*mx.Route, error) {
		return &mx.Route{Domain: d, Key: "mx:" + d, TLS: mx.TLSOpportunistic,
			Hosts: []mx.Host{{Name: "mx." + d, Port: port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}}, nil
	})
	deliv := relay.NewSMTPDeliverer(relay.SMTPDelivererConfig{Hostname: "relay.test", TLSConfig: &tls.Config{RootCAs: ca.Pool}})
	lr := &liveRelay{q: queue.NewMemory(queue.MemoryConfig{})}
	lr.rec = NewRecorder(RecorderConfig{Queue: lr.q})
	supp := relay.NewSuppressionMemory(relay.SuppressionConfig{})
	lr.relay, err = relay.New(relay.Config{Hostname: "relay.test", Queue: lr.q, Resolver: res, Deliverer: deliv,
		Observer: lr.rec, Suppressions: supp})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		lr.relay.Shutdown(ctx)
		deliv.Close()
		lr.q.Close()
	})
	// Runs before the shutdown above: the held delivery must finish.
	t.Cleanup(func() { close(sink.release) })

	submit := func(env *queue.Envelope, subject string) {
		t.Helper()
		body := fmt.Sprintf("From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: <%d@src.test>\r\n\r\nHello from the dashboard test.\r\n", env.From, env.To[0].Addr, subject, time.Now().UnixNano())
		if _, err := lr.relay.Submit(context.Background(), env, strings.NewReader(body)); err != nil {
			t.Fatal(err)
		}
	}
	to := func(addrs ...string) []queue.Recipient {
		var out []queue.Recipient
		for _, a := range addrs {
			out = append(out, queue.Recipient{Addr: a})
		}
		return out
	}
	for i := range 3 {
		submit(&queue.Envelope{From: "app@src.test", To: to(fmt.Sprintf("ok%d@good.test", i))}, "delivered")
	}
	for i := range 2 {
		submit(&queue.Envelope{From: "app@src.test", To: to(fmt.Sprintf("defer%d@good.test", i))}, "deferred")
	}
	submit(&queue.Envelope{From: "app@src.test", To: to("nouser@other.test")}, "bounced")
	submit(&queue.Envelope{From: "app@src.test", To: to("ok@other.test", "defer@other.test")}, "mixed")
	submit(&queue.Envelope{From: "app@src.test", To: to("slow@slow.test")}, "in flight")
	for i := range 2 {
		submit(&queue.Envelope{From: "app@staging.test", To: to(fmt.Sprintf("customer%d@example.test", i)), Identity: "staging", Held: true, Sandbox: true}, fmt.Sprintf("Sandbox welcome %d", i))
	}

	// Quiet: the deferred recipients wait for their retry (minutes away),
	// the bounce's DSN has been delivered, and only the slow delivery is
	// in flight.
	deadline := time.Now().Add(30 * time.Second)
	var last Counts
	for {
		st, err := lr.q.Stats(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		w := lr.rec.Window().Totals
		if w.Deferred == 3 && w.Bounced == 1 && w.Delivered == 5 && st.ByState[queue.StateQueued] == 0 &&
			st.ByState[queue.StateLeased] == 1 && w == last {
			break
		}
		last = w
		if time.Now().After(deadline) {
			t.Fatalf("relay not quiet: %+v, queue %+v", w, st.ByState)
		}
		time.Sleep(100 * time.Millisecond)
	}

	h, err := New(Config{Queue: lr.q, Suppressions: supp, Token: testToken, Recorder: lr.rec, Status: lr.relay})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(h)
	t.Cleanup(ts.Close)
	lr.url = ts.URL
	return lr
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...interface{}) {}
func (nopLogger) Println(...interface{})        {}

// getJSON calls the API with the Bearer token.
func (lr *liveRelay) getJSON(t *testing.T, path string, v any) {
	t.Helper()
	req, _ := http.NewRequest("GET", lr.url+path, nil)
	req.Header.Set("Authorization", "Bearer "+testToken)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s: %s", path, resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

// browse runs a chromedp action and fails the test on error.
func browse[T any](t *testing.T, ctx context.Context, step string, a chromedp.Action[T]) T {
	t.Helper()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("browser, %s: %v", step, err)
	}
	return v
}

// evaluate runs JavaScript in the page (awaiting a promise it returns).
func evaluate[T any](t *testing.T, ctx context.Context, step, js string) T {
	t.Helper()
	return browse(t, ctx, step, chromedp.Evaluate[T](js, chromedp.EvalAwaitPromise))
}

// TestDashboard_InBrowser loads the dashboard in headless Chromium against
// a relay with traffic and checks that the numbers on the pages are the
// API's, that search finds messages with their history, that the queue
// buttons work through the login session (CSRF token and all), and that
// the sandbox viewer shows and downloads captured mail.
func TestDashboard_InBrowser(t *testing.T) {
	chrome := chromiumPath(t)
	lr := startLiveRelay(t)

	shots := t.TempDir()
	if d := os.Getenv("BATON_ADMIN_SCREENSHOTS"); d != "" {
		shots = d
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:], chromedp.ExecPath(chrome), chromedp.NoSandbox,
		chromedp.Headless, chromedp.DisableGPU, chromedp.WindowSize(1280, 900))
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	bctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	// The first Run starts the browser, which lives as long as that
	// call's context: start it without a deadline, then bound the steps.
	start := time.Now()
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("start chromium: %v", err)
	}
	t.Logf("chromium started in %v", time.Since(start))
	ctx, cancel := context.WithTimeout(bctx, 2*time.Minute)
	defer cancel()
	do := func(step string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		browse(t, ctx, step, chromedp.Steps(steps...))
	}
	css := func(s string) chromedp.CSS { return chromedp.CSS(s) }
	shot := func(name string) {
		t.Helper()
		png := browse(t, ctx, "screenshot "+name, chromedp.FullScreenshot(100))
		p := filepath.Join(shots, name+".png")
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot: %s", p)
	}

	// Sign in: the overview sends the browser to the login form.
	start = time.Now()
	do("login",
		chromedp.Navigate(lr.url+"/"),
		chromedp.WaitVisible(css("#token")),
		chromedp.SendKeys(css("#token"), testToken),
		chromedp.Click(css("#login-submit")),
		chromedp.WaitVisible(css("#depth-total")),
	)
	t.Logf("login and overview load: %v", time.Since(start))

	// Overview: every number is the API's.
	page := evaluate[map[string]int64](t, ctx, "read overview", `(() => {
		const o = {};
		for (const el of document.querySelectorAll('.card .n[id]')) o[el.id] = Number(el.dataset.value);
		o.rateLines = document.querySelectorAll('#rate-chart polyline').length;
		o.depthMarks = document.querySelectorAll('#depth-chart polyline, #depth-chart circle').length;
		return o;
	})()`)
	var st StatsView
	lr.getJSON(t, "/api/v1/stats", &st)
	want := map[string]int64{
		"depth-total": int64(st.Depth), "quarantined": int64(st.Queue.Quarantined),
		"hour-accepted": st.LastHour.Totals.Accepted, "hour-delivered": st.LastHour.Totals.Delivered,
		"hour-deferred": st.LastHour.Totals.Deferred, "hour-bounced": st.LastHour.Totals.Bounced,
		"rateLines": 3, "depthMarks": 1,
	}
	for _, s := range []queue.State{queue.StateQueued, queue.StateDeferred, queue.StateLeased, queue.StateHeld} {
		want["depth-"+s.String()] = int64(st.Queue.ByState[s])
	}
	if len(page) != len(want) {
		t.Errorf("overview shows %v, want the keys of %v", page, want)
	}
	for k, v := range want {
		if page[k] != v {
			t.Errorf("overview %s = %d, API says %d", k, page[k], v)
		}
	}
	// And the API's are the traffic's: 11 accepted (9 messages, one with
	// two recipients, 2 of them sandbox mail), 5 delivered (with the
	// bounce's DSN), 3 deferred, 1 bounced; 6 messages queued.
	if st.LastHour.Totals != (Counts{Accepted: 11, Delivered: 5, Deferred: 3, Bounced: 1}) || st.Depth != 6 ||
		st.Queue.ByState[queue.StateHeld] != 2 || st.Queue.ByState[queue.StateDeferred] != 3 || st.Queue.ByState[queue.StateLeased] != 1 {
		t.Errorf("API stats = %+v, depth %d %v", st.LastHour.Totals, st.Depth, st.Queue.ByState)
	}
	shot("overview")

	// Destinations: each row's numbers are the API's.
	type destCells struct {
		Dest                                           string
		Queued, InFlight, Delivered, Deferred, Bounced int
		TLS                                            string
		Reply                                          string
	}
	do("destinations", chromedp.Navigate(lr.url+"/destinations"), chromedp.WaitVisible(css("#destinations")))
	rows := evaluate[[]destCells](t, ctx, "read destinations", `Array.from(document.querySelectorAll('tr[data-dest]')).map(tr => {
		const v = f => tr.querySelector('[data-field="'+f+'"]').dataset.value;
		return {Dest: tr.dataset.dest, Queued: +v('queued'), InFlight: +v('in_flight'), Delivered: +v('delivered'),
			Deferred: +v('deferred'), Bounced: +v('bounced'), TLS: v('tls'),
			Reply: tr.querySelector('[data-field="last_reply"]').textContent};
	})`)
	var apiRows []DestinationRow
	lr.getJSON(t, "/api/v1/destinations", &apiRows)
	if len(rows) != len(apiRows) {
		t.Fatalf("page shows %d destinations, API %d: %+v", len(rows), len(apiRows), rows)
	}
	for i, a := range apiRows {
		w := destCells{Dest: a.Dest, Queued: a.Queued, InFlight: a.InFlight, Delivered: int(a.Delivered), Deferred: int(a.Deferred),
			Bounced: int(a.Bounced), TLS: a.TLS, Reply: a.LastReply.String()}
		if a.LastReply.Code == 0 && a.LastReply.Text == "" {
			w.Reply = "–"
		}
		if rows[i] != w {
			t.Errorf("row %d: page %+v, API %+v", i, rows[i], w)
		}
	}
	byDest := map[string]DestinationRow{}
	for _, a := range apiRows {
		byDest[a.Dest] = a
	}
	if g := byDest["mx:good.test"]; g.Queued != 2 || g.Delivered != 3 || g.Deferred != 2 || g.TLS != "TLS 1.3" || !g.TLSVerified {
		t.Errorf("mx:good.test = %+v", g)
	}
	if s := byDest["mx:slow.test"]; s.InFlight != 1 || s.Queued != 1 {
		t.Errorf("mx:slow.test = %+v (want one delivery in flight)", s)
	}
	shot("destinations")

	// Search by recipient, open the message, and check its history.
	do("search",
		chromedp.Navigate(lr.url+"/search"),
		chromedp.WaitVisible(css("#q")),
		chromedp.SendKeys(css("#q"), "defer@other.test"),
		chromedp.Click(css("#search-submit")),
		chromedp.WaitVisible(css("#result-count")),
	)
	count := evaluate[int](t, ctx, "result count", `Number(document.getElementById('result-count').dataset.value)`)
	ids := evaluate[[]string](t, ctx, "result ids", `Array.from(document.querySelectorAll('tr[data-id]')).map(tr => tr.dataset.id)`)
	var found []MessageSummary
	lr.getJSON(t, "/api/v1/search?q=defer@other.test", &found)
	if count != 1 || len(ids) != 1 || len(found) != 1 || ids[0] != string(found[0].ID) {
		t.Fatalf("search: page %d %v, API %+v", count, ids, found)
	}
	type rcptCells struct {
		Addr, State string
		Attempts    int
		Kinds       []string
	}
	readMessage := func() []rcptCells {
		return evaluate[[]rcptCells](t, ctx, "read message", `Array.from(document.querySelectorAll('.recipient')).map(d => ({
			Addr: d.dataset.rcpt, State: d.querySelector('[data-field="state"]').dataset.value,
			Attempts: +d.querySelector('[data-field="attempts"]').dataset.value,
			Kinds: Array.from(d.querySelectorAll('tr.event')).map(tr => tr.dataset.kind)}))`)
	}
	compareMessage := func(id string) {
		t.Helper()
		var d MessageDetail
		lr.getJSON(t, "/api/v1/message?id="+id, &d)
		got := readMessage()
		if len(got) != len(d.Recipients) {
			t.Fatalf("message %s: page %+v, API %+v", id, got, d.Recipients)
		}
		for i, r := range d.Recipients {
			w := rcptCells{Addr: r.Addr, State: r.State, Attempts: r.Attempts}
			for _, e := range r.History {
				w.Kinds = append(w.Kinds, e.Kind)
			}
			if fmt.Sprint(got[i]) != fmt.Sprint(w) {
				t.Errorf("message %s recipient %d: page %+v, API %+v", id, i, got[i], w)
			}
		}
	}
	do("open result", chromedp.Click(css(`tr[data-id] a`)), chromedp.WaitVisible(css("#message-id")))
	compareMessage(ids[0])
	if got := readMessage(); fmt.Sprint(got) != "[{ok@other.test delivered 1 [accepted delivered]} {defer@other.test pending 1 [accepted deferred]}]" {
		t.Errorf("mixed message history = %+v", got)
	}
	shot("message")

	// The hold and release buttons post through the session (CSRF token,
	// same-origin checks) from a real browser.
	do("hold", chromedp.Click(css("#op-hold")), chromedp.WaitVisible(css(`#message-state[data-value="held"]`)))
	if m, err := lr.q.Get(context.Background(), queue.ID(ids[0])); err != nil || m.State != queue.StateHeld {
		t.Fatalf("after the hold button: %v %v", m, err)
	}
	do("release", chromedp.Click(css("#op-release")), chromedp.WaitNotPresent(css(`#message-state[data-value="held"]`)))
	if m, err := lr.q.Get(context.Background(), queue.ID(ids[0])); err != nil || m.State == queue.StateHeld {
		t.Fatalf("after the release button: %v %v", m, err)
	}

	// A bounced message left the queue; the Recorder still has its story.
	do("search bounced",
		chromedp.Navigate(lr.url+"/search?q=nouser@other.test"),
		chromedp.WaitVisible(css("#results")),
		chromedp.Click(css(`tr[data-id] a`)),
		chromedp.WaitVisible(css("#message-id")))
	bounced := browse(t, ctx, "bounced id", chromedp.Text(css("#message-id")))
	lr.getJSON(t, "/api/v1/search?q=nouser@other.test", &found)
	if len(found) != 1 || string(found[0].ID) != bounced || found[0].InQueue {
		t.Fatalf("bounced search: page %q, API %+v", bounced, found)
	}
	compareMessage(bounced)
	if got := readMessage(); len(got) != 1 || got[0].State != "failed" || fmt.Sprint(got[0].Kinds) != "[accepted failed dsn_sent]" {
		t.Errorf("bounced message = %+v", got)
	}

	// Sandbox: the mailbox lists the captured mail; the viewer shows it
	// and its download link serves the message in the browser's session.
	do("sandbox", chromedp.Navigate(lr.url+"/sandbox"), chromedp.WaitVisible(css("#sandbox-messages")))
	boxCount := evaluate[int](t, ctx, "mailbox count", `Number(document.querySelector('tr[data-identity="staging"] [data-field="messages"]').dataset.value)`)
	subjects := evaluate[[]string](t, ctx, "subjects", `Array.from(document.querySelectorAll('#sandbox-messages [data-field="subject"]')).map(a => a.textContent)`)
	var boxes []Mailbox
	lr.getJSON(t, "/api/v1/sandbox", &boxes)
	var sm []SandboxMessage
	lr.getJSON(t, "/api/v1/sandbox/messages?identity=staging", &sm)
	if len(boxes) != 1 || boxes[0].Messages != boxCount || boxCount != 2 || len(subjects) != 2 || len(sm) != 2 ||
		subjects[0] != sm[0].Subject || subjects[1] != sm[1].Subject {
		t.Fatalf("sandbox: page %d %q, API %+v %+v", boxCount, subjects, boxes, sm)
	}
	shot("sandbox")
	do("sandbox view", chromedp.Click(css(`#sandbox-messages [data-field="subject"]`)), chromedp.WaitVisible(css("#body")))
	subject := browse(t, ctx, "subject", chromedp.Text(css("#subject")))
	body := browse(t, ctx, "body", chromedp.Text(css("#body")))
	eml := evaluate[string](t, ctx, "download", `fetch(document.getElementById('download').href).then(r => r.ok ? r.text() : 'HTTP ' + r.status)`)
	if subject != sm[0].Subject || !strings.Contains(body, "Hello from the dashboard test.") {
		t.Errorf("viewer: subject %q, body %q", subject, body)
	}
	rc, err := lr.q.Open(context.Background(), sm[0].ID)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(rc)
	rc.Close()
	if eml != string(raw) {
		t.Errorf("download in the browser = %q, want the stored message %q", eml, raw)
	}
	shot("sandbox-view")

	// Suppressions: one added through the API shows on the page, and its
	// remove button lifts it through the session.
	addReq, _ := http.NewRequest("POST", lr.url+"/api/v1/suppressions/add?addr=Blocked@Supp.test&reason="+url.QueryEscape("<b>closed</b> account"), nil)
	addReq.Header.Set("Authorization", "Bearer "+testToken)
	addResp, err := http.DefaultClient.Do(addReq)
	if err != nil {
		t.Fatal(err)
	}
	addResp.Body.Close()
	if addResp.StatusCode != http.StatusOK {
		t.Fatalf("add suppression: %s", addResp.Status)
	}
	var supps []relay.Suppression
	lr.getJSON(t, "/api/v1/suppressions", &supps)
	do("suppressions", chromedp.Navigate(lr.url+"/"), chromedp.Click(css(`nav a[href="/suppressions"]`)), chromedp.WaitVisible(css("#suppressions")))
	type suppCells struct{ Addr, Reply string }
	suppRowsJS := `Array.from(document.querySelectorAll('tr[data-addr]')).map(tr => ({Addr: tr.dataset.addr, Reply: tr.querySelector('[data-field="reply"]').textContent}))`
	srows := evaluate[[]suppCells](t, ctx, "read suppressions", suppRowsJS)
	total := evaluate[int](t, ctx, "suppression total", `Number(document.getElementById('supp-total').dataset.value)`)
	if len(srows) != len(supps) || total != len(supps) {
		t.Fatalf("suppressions: page %d rows (total %d) %+v, API %+v", len(srows), total, srows, supps)
	}
	for i, x := range supps {
		if srows[i].Addr != x.Addr || !strings.HasPrefix(srows[i].Reply, x.Reply.String()) {
			t.Errorf("suppression row %d: page %+v, API %+v", i, srows[i], x)
		}
	}
	if !strings.Contains(fmt.Sprint(srows), "{Blocked@Supp.test 550 5.1.1 <b>closed</b> account}") {
		t.Errorf("added suppression not shown as text: %+v", srows)
	}
	shot("suppressions")
	do("search suppressions", chromedp.SendKeys(css("#supp-q"), "supp.TEST"), chromedp.Click(css("#supp-search")),
		chromedp.WaitVisible(css(`#supp-q[value="supp.TEST"]`)))
	if srows = evaluate[[]suppCells](t, ctx, "read search", suppRowsJS); len(srows) != 1 || srows[0].Addr != "Blocked@Supp.test" {
		t.Fatalf("suppression search: %+v", srows)
	}
	do("remove suppression", chromedp.Click(css(`tr[data-addr="Blocked@Supp.test"] button[data-action="remove"]`)),
		chromedp.WaitVisible(css("#supp-empty")))
	lr.getJSON(t, "/api/v1/suppressions", &supps)
	for _, x := range supps {
		if strings.EqualFold(x.Addr, "blocked@supp.test") {
			t.Fatalf("API still lists %+v after the remove button", x)
		}
	}

	// Signing out ends the session.
	do("logout", chromedp.Navigate(lr.url+"/"), chromedp.Click(css(`header form button`)), chromedp.WaitVisible(css("#token")))
	if status := evaluate[int](t, ctx, "after logout", `fetch('/api/v1/stats').then(r => r.status)`); status != http.StatusUnauthorized {
		t.Fatalf("API after logout: %d", status)
	}
}
