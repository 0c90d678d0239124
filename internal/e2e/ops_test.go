package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"

	"github.com/batonmail/baton/relay/webhook"
)

// TestOps_StreamsMetricsWebhooksAdmin runs the built relayd the way an
// operator would with every operations feature on at once: a bulk stream
// with its own small worker share, a signed webhook, the admin API with
// /metrics behind its token. Mail is submitted by a user (transactional,
// and once choosing bulk by header), by an API key pinned to bulk (one
// recipient of which the destination refuses, so a DSN follows) and by a
// sandbox key; then every outcome is checked through what an operator
// sees: the destination, the webhook receiver, the admin API, the
// dashboard and the metrics. A restart follows, after which the captured
// bulk message is released through the API and delivered in bulk.
func TestOps_StreamsMetricsWebhooksAdmin(t *testing.T) {
	buildRelayd(t) // runCmd, before start, needs the binary
	dest := startSink(t, "smarthost.test")
	dest.rcptReply = func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "bad@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
		}
		return nil
	}
	const secret = "e2e-webhook-secret-0123456789"
	hooks := newHookReceiver(t, secret)
	routeKey := fmt.Sprintf("route:127.0.0.1:%d", dest.port)

	dir := t.TempDir()
	dataDir := filepath.Join(dir, "data")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		t.Fatal(err)
	}
	secretFile := filepath.Join(dir, "webhook.secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	adminAddr, metricsAddr := freeAddr(t), freeAddr(t)
	r := &relayd{t: t, dir: dataDir, addr: freeAddr(t), tlsAddr: freeAddr(t), cfgPath: filepath.Join(dir, "relayd.toml")}
	conf := fmt.Sprintf(`hostname = "relay.test"
data_dir = %q
[smtp]
listen = [%q]
listen_tls = [%q]
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[streams.bulk]
workers = 2
max_in_flight = 4
per_destination = 2
[[webhooks]]
url = %q
secret_file = %q
flush_interval = "100ms"
batch_size = 5
[admin]
listen = %q
[metrics]
listen = %q
[log]
level = "info"
`, dataDir, r.addr, r.tlsAddr, dest.port, hooks.srv.URL+"/hook", secretFile, adminAddr, metricsAddr)
	if err := os.WriteFile(r.cfgPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}

	// Identities are made with the binary before it starts, as an
	// operator provisions them.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	createKey := func(args ...string) string {
		t.Helper()
		out, err := r.runCmd(ctx, nil, append([]string{"apikey", "create"}, args...)...)
		m := keyRE.FindStringSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("apikey create %v: %v\n%s", args, err, out)
		}
		return m[2]
	}
	bulkKey := createKey("-stream", "bulk", "bulkapp")
	sandboxKey := createKey("-sandbox", "staging")
	addUser := func(args ...string) string {
		t.Helper()
		out, err := r.runCmd(ctx, nil, append([]string{"user", "add", "-generate"}, args...)...)
		m := regexp.MustCompile(`password for \S+ \(shown once\): (\S+)`).FindStringSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("user add %v: %v\n%s", args, err, out)
		}
		return m[1]
	}
	txnPass := addUser("txn")
	newsPass := addUser("-stream", "bulk", "news")
	if out, err := r.runCmd(ctx, nil, "apikey", "create", "-stream", "nosuch", "x"); err == nil {
		t.Fatalf("apikey create with an unknown stream succeeded:\n%s", out)
	}

	r.start()
	t.Cleanup(r.stop)
	tokenBytes, err := os.ReadFile(filepath.Join(dataDir, "admin-token"))
	if err != nil {
		t.Fatalf("admin token file: %v\n%s", err, r.out.String())
	}
	adm := &adminClient{t: t, base: "http://" + adminAddr, token: strings.TrimSpace(string(tokenBytes))}
	tlsCfg := relaydClientTLS(t, dataDir)

	// What is submitted, by whom; ids are filled from the 250 replies.
	type sub struct {
		user, pass, to string
		header         string // extra header field
		stream         string // the stream it must travel in
		identity       string
		sandbox        bool
		msg            string
		id             string
	}
	var subs []*sub
	for i := 1; i <= 3; i++ {
		subs = append(subs, &sub{user: "txn", pass: txnPass, to: fmt.Sprintf("t%d@dest.test", i), stream: "transactional", identity: "txn"})
	}
	for i := 1; i <= 3; i++ {
		subs = append(subs, &sub{user: "apikey", pass: bulkKey, to: fmt.Sprintf("b%d@dest.test", i), stream: "bulk", identity: "apikey:bulkapp"})
	}
	hdr := &sub{user: "txn", pass: txnPass, to: "h1@dest.test", header: "X-Baton-Stream: bulk\r\n", stream: "bulk", identity: "txn"}
	bounced := &sub{user: "apikey", pass: bulkKey, to: "bad@dest.test", stream: "bulk", identity: "apikey:bulkapp"}
	captured := &sub{user: "apikey", pass: sandboxKey, to: "captured@dest.test", stream: "transactional", identity: "apikey:staging", sandbox: true}
	// The pinned stream overrules the header, which goes all the same.
	overruled := &sub{user: "apikey", pass: bulkKey, to: "b4@dest.test", header: "x-baton-stream:  Transactional\r\n", stream: "bulk", identity: "apikey:bulkapp"}
	news := &sub{user: "news", pass: newsPass, to: "n1@dest.test", stream: "bulk", identity: "news"}
	// A captured message in bulk: released after a restart below.
	captured2 := &sub{user: "apikey", pass: sandboxKey, to: "captured2@dest.test", header: "X-Baton-Stream: bulk\r\n", stream: "bulk", identity: "apikey:staging", sandbox: true}
	subs = append(subs, hdr, overruled, news, bounced, captured, captured2)
	for i, s := range subs {
		s.msg = "From: app@sender.test\r\nTo: " + s.to + "\r\n" +
			fmt.Sprintf("Subject: ops %d to %s\r\nDate: Mon, 23 Nov 2026 17:00:%02d +0000\r\nMessage-ID: <ops-%d@sender.test>\r\n", i, s.to, i, i) +
			s.header + "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" +
			fmt.Sprintf("Message %d for %s.\r\nA second line, with trailing space \r\n.leading dot\r\n", i, s.to)
		s.id, err = submitAuth(r.addr, tlsCfg, s.user, s.pass, "app@sender.test", s.to, s.msg)
		if err != nil {
			t.Fatalf("submit to %s as %s: %v\n%s", s.to, s.user, err, r.out.String())
		}
	}
	// A header naming a stream relayd does not deliver is refused.
	_, err = submitAuth(r.addr, tlsCfg, "txn", txnPass, "app@sender.test", "x@dest.test",
		"From: app@sender.test\r\nX-Baton-Stream: nosuch\r\nSubject: unknown stream\r\n\r\nbody\r\n")
	if se, ok := err.(*smtp.SMTPError); !ok || se.Code != 554 || se.EnhancedCode != (smtp.EnhancedCode{5, 6, 0}) {
		t.Errorf("unknown stream header: %v, want 554 5.6.0", err)
	}
	submitted := time.Now()
	delivered := 0
	for _, s := range subs {
		if s != bounced && !s.sandbox {
			delivered++
		}
	}

	// The destination gets every deliverable message and the bounce's DSN.
	msgs := dest.wait(delivered+1, time.Minute)
	var dsn *received
	for i, got := range msgs {
		if bytes.Contains(bytes.ToLower(got.Body), []byte("x-baton-stream")) {
			t.Errorf("the stream header reached the destination (to %v):\n%s", got.To, got.Body)
		}
		if got.From == "" {
			dsn = &msgs[i]
			continue
		}
		var s *sub
		for _, c := range subs {
			if c.to == got.To[0] {
				s = c
			}
		}
		switch {
		case s == nil || s == bounced || s.sandbox:
			t.Errorf("destination got mail for %v", got.To)
		case s.header != "":
			want := strings.Replace(s.msg, s.header, "", 1)
			if !strings.HasSuffix(string(got.Body), want) {
				t.Errorf("message to %s changed beyond the stream header and trace fields:\n%s", s.to, got.Body)
			}
		default:
			if !strings.HasSuffix(string(got.Body), s.msg) {
				t.Errorf("message to %s changed beyond the trace fields:\n%s", s.to, got.Body)
			}
		}
	}
	if dsn == nil || dsn.To[0] != "app@sender.test" || !bytes.Contains(dsn.Body, []byte("bad@dest.test")) {
		t.Fatalf("no DSN for bad@dest.test among %d messages", len(msgs))
	}

	// Webhooks: every event arrives once, signed, with the right stream.
	type evKey struct{ kind, queueID, rcpt, stream, from string }
	want := map[evKey]bool{}
	for _, s := range subs {
		want[evKey{"accepted", s.id, s.to, s.stream, "app@sender.test"}] = true
		switch {
		case s == bounced:
			want[evKey{"failed", s.id, s.to, s.stream, "app@sender.test"}] = true
			want[evKey{"dsn_sent", s.id, s.to, s.stream, "app@sender.test"}] = true
		case !s.sandbox:
			want[evKey{"delivered", s.id, s.to, s.stream, "app@sender.test"}] = true
		}
	}
	var dsnID string
	poll(t, time.Minute, func() error {
		evs, bad := hooks.snapshot()
		if bad > 0 {
			return fmt.Errorf("%d webhook requests failed the signature check", bad)
		}
		for _, e := range evs {
			if e.Kind == "dsn_sent" {
				dsnID = e.DSNID
			}
		}
		if dsnID == "" {
			return fmt.Errorf("no dsn_sent event among %d", len(evs))
		}
		// The DSN travels in the stream of the message it reports on.
		want[evKey{"delivered", dsnID, "app@sender.test", bounced.stream, ""}] = true
		if len(evs) < len(want) {
			return fmt.Errorf("%d webhook events, want %d", len(evs), len(want))
		}
		return nil
	}, r)
	// checkEvents compares the receiver's events with want.
	checkEvents := func() {
		evs, _ := hooks.snapshot()
		got := map[evKey]bool{}
		for _, e := range evs {
			k := evKey{e.Kind, e.QueueID, e.Rcpt, e.Stream, e.From}
			if got[k] {
				t.Errorf("event reported twice under different ids: %+v", k)
			}
			got[k] = true
			if !want[k] {
				t.Errorf("unexpected webhook event %+v", e)
			}
			for _, s := range subs {
				if s.id == e.QueueID && e.Kind != "dsn_sent" && s.identity != e.Identity {
					t.Errorf("%s event for %s has identity %q, want %q", e.Kind, s.to, e.Identity, s.identity)
				}
			}
			if e.Kind == "delivered" || e.Kind == "failed" {
				if e.Dest != routeKey || e.Reply == nil || (e.Reply.Code != 250 && e.Reply.Code != 550) {
					t.Errorf("%s event without its destination or reply: %+v", e.Kind, e)
				}
			}
		}
		for k := range want {
			if !got[k] {
				t.Errorf("missing webhook event %+v", k)
			}
		}
		if d := hooks.duplicates(); len(d) > 0 {
			t.Errorf("webhook events delivered more than once: %v", d)
		}
	}
	checkEvents()

	// Metrics on the admin listener: the token is required, and the
	// recipient counts per stream match what was sent.
	for _, tok := range []string{"", "wrong-token-wrong-token"} {
		if code := adm.status("/metrics", tok); code != http.StatusUnauthorized {
			t.Errorf("/metrics with token %q: %d, want 401", tok, code)
		}
	}
	wantCounts := map[[2]string]float64{}
	for k := range want {
		wantCounts[[2]string{k.kind, k.stream}]++
	}
	var fams map[string]*dto.MetricFamily
	poll(t, time.Minute, func() error {
		fams = adm.metrics()
		for k, n := range wantCounts {
			if got := sumCounter(fams, "baton_recipients_total", map[string]string{"event": k[0], "stream": k[1]}); got != n {
				return fmt.Errorf("baton_recipients_total{event=%q,stream=%q} = %v, want %v", k[0], k[1], got, n)
			}
		}
		// Everything the webhook got is counted as sent, nothing pending.
		if got := sumCounter(fams, "baton_webhook_events_sent_total", nil); got != float64(len(want)) {
			return fmt.Errorf("baton_webhook_events_sent_total = %v, want %v", got, len(want))
		}
		return nil
	}, r)
	// The queue gauges come to agree with the queue: the captured
	// messages alone (delivered ones leave the queue after their event).
	poll(t, time.Minute, func() error {
		gauges := adm.metrics()
		for _, c := range []struct {
			name, label, value string
			want               float64
		}{
			{"baton_queue_messages", "state", "held", 2},
			{"baton_queue_messages", "state", "queued", 0},
			{"baton_queue_messages", "state", "leased", 0},
			{"baton_queue_messages", "state", "deferred", 0},
			{"baton_queue_stream_messages", "stream", "bulk", 1},
			{"baton_queue_stream_messages", "stream", "transactional", 1},
		} {
			if got := sumCounter(gauges, c.name, map[string]string{c.label: c.value}); got != c.want {
				return fmt.Errorf("%s{%s=%q} = %v, want %v", c.name, c.label, c.value, got, c.want)
			}
		}
		return nil
	}, r)
	// The [metrics] listener serves the same registry, without a token.
	plain := scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
	for k, n := range wantCounts {
		if got := sumCounter(plain, "baton_recipients_total", map[string]string{"event": k[0], "stream": k[1]}); got != n {
			t.Errorf("[metrics] listener: baton_recipients_total{event=%q,stream=%q} = %v, want %v", k[0], k[1], got, n)
		}
	}
	for _, ev := range []string{"deferred", "expired", "suppressed"} {
		if got := sumCounter(fams, "baton_recipients_total", map[string]string{"event": ev}); got != 0 {
			t.Errorf("baton_recipients_total{event=%q} = %v, want 0", ev, got)
		}
	}
	for _, name := range []string{"baton_webhook_events_dropped_total", "baton_webhook_events_pending"} {
		if got := sumCounter(fams, name, nil); got != 0 {
			t.Errorf("%s = %v, want 0", name, got)
		}
	}
	t.Logf("metrics: accepted bulk=%v transactional=%v, delivered bulk=%v transactional=%v",
		sumCounter(fams, "baton_recipients_total", map[string]string{"event": "accepted", "stream": "bulk"}),
		sumCounter(fams, "baton_recipients_total", map[string]string{"event": "accepted", "stream": "transactional"}),
		sumCounter(fams, "baton_recipients_total", map[string]string{"event": "delivered", "stream": "bulk"}),
		sumCounter(fams, "baton_recipients_total", map[string]string{"event": "delivered", "stream": "transactional"}))

	// The admin API: the queue holds only the captured message, and the
	// overview's counts match what happened.
	if code := adm.status("/api/v1/stats", ""); code != http.StatusUnauthorized {
		t.Errorf("/api/v1/stats without the token: %d, want 401", code)
	}
	type queueStats struct {
		ByState  map[string]int
		ByStream map[string]int
	}
	// checkStats compares queue statistics with the want maps; states
	// and streams they leave out must be absent or 0.
	checkStats := func(qs queueStats, byState, byStream map[string]int) error {
		for _, c := range []struct{ got, want map[string]int }{{qs.ByState, byState}, {qs.ByStream, byStream}} {
			for k, n := range c.got {
				if n != c.want[k] {
					return fmt.Errorf("queue stats %+v, want %v and %v", qs, byState, byStream)
				}
			}
			for k, n := range c.want {
				if c.got[k] != n {
					return fmt.Errorf("queue stats %+v, want %v and %v", qs, byState, byStream)
				}
			}
		}
		return nil
	}
	// The captured messages, held: one transactional, one bulk.
	wantStats := func(qs queueStats) error {
		return checkStats(qs, map[string]int{"held": 2}, map[string]int{"transactional": 1, "bulk": 1})
	}
	var overview struct {
		Queue    queueStats `json:"queue"`
		Depth    int        `json:"depth"`
		LastHour struct {
			Totals map[string]int64 `json:"totals"`
		} `json:"last_hour"`
	}
	poll(t, time.Minute, func() error {
		var qs queueStats
		adm.getJSON("/api/v1/queue/stats", &qs)
		if err := wantStats(qs); err != nil {
			return fmt.Errorf("/api/v1/queue/stats: %w", err)
		}
		adm.getJSON("/api/v1/stats", &overview)
		if err := wantStats(overview.Queue); err != nil {
			return fmt.Errorf("/api/v1/stats: %w", err)
		}
		return nil
	}, r)
	if overview.Depth != 2 {
		t.Errorf("overview depth = %d, want 2", overview.Depth)
	}
	wantTotals := map[string]int64{
		"accepted":  int64(len(subs)),
		"delivered": int64(wantCounts[[2]string{"delivered", "bulk"}] + wantCounts[[2]string{"delivered", "transactional"}]),
		"deferred":  0,
		"bounced":   1,
	}
	if !maps.Equal(overview.LastHour.Totals, wantTotals) {
		t.Errorf("last hour totals = %v, want %v", overview.LastHour.Totals, wantTotals)
	}
	// The dashboard shows the same numbers.
	page, _ := adm.get("/")
	for _, want := range []string{
		`id="depth-total" data-value="2"`,
		fmt.Sprintf(`id="hour-delivered" data-value="%d"`, wantTotals["delivered"]),
		`id="hour-bounced" data-value="1"`,
	} {
		if !bytes.Contains(page, []byte(want)) {
			t.Errorf("dashboard lacks %s:\n%s", want, page)
		}
	}

	// The sandbox mailbox lists the captured messages, and a download is
	// what was submitted, after relayd's trace field.
	var boxes []struct {
		Identity string `json:"identity"`
		Messages int    `json:"messages"`
		Bytes    int64  `json:"bytes"`
	}
	adm.getJSON("/api/v1/sandbox", &boxes)
	if len(boxes) != 1 || boxes[0].Identity != captured.identity || boxes[0].Messages != 2 {
		t.Fatalf("sandbox mailboxes = %+v, want one for %s with two messages", boxes, captured.identity)
	}
	var list []struct {
		ID      string   `json:"id"`
		To      []string `json:"to"`
		Subject string   `json:"subject"`
	}
	adm.getJSON("/api/v1/sandbox/messages?identity="+captured.identity, &list)
	if len(list) != 2 || list[1].ID != captured.id || !slices.Equal(list[1].To, []string{captured.to}) || !strings.HasPrefix(list[1].Subject, "ops ") ||
		list[0].ID != captured2.id {
		t.Fatalf("sandbox messages = %+v, want %s then %s", list, captured2.id, captured.id)
	}
	raw, hdrs := adm.get("/api/v1/sandbox/raw?id=" + captured.id)
	if ct := hdrs.Get("Content-Type"); ct != "message/rfc822" {
		t.Errorf("download Content-Type = %q", ct)
	}
	if cd := hdrs.Get("Content-Disposition"); !strings.Contains(cd, captured.id+".eml") {
		t.Errorf("download Content-Disposition = %q", cd)
	}
	_, rawBody, _ := bytes.Cut(raw, []byte("\r\n\r\n"))
	_, subBody, _ := strings.Cut(captured.msg, "\r\n\r\n")
	if string(rawBody) != subBody {
		t.Errorf("downloaded body differs from the submitted one:\n got %q\nwant %q", rawBody, subBody)
	}
	if prefix, ok := strings.CutSuffix(string(raw), captured.msg); !ok || !strings.HasPrefix(prefix, "Received: ") {
		t.Errorf("download is not the submitted message after a Received field:\n%s", raw)
	}
	// The stream header is gone from captured mail too.
	raw, _ = adm.get("/api/v1/sandbox/raw?id=" + captured2.id)
	if prefix, ok := strings.CutSuffix(string(raw), strings.Replace(captured2.msg, captured2.header, "", 1)); !ok || !strings.HasPrefix(prefix, "Received: ") {
		t.Errorf("download of %s is not the submitted message without its stream header after a Received field:\n%s", captured2.id, raw)
	}

	// One destination (the route), whose connection slots add up the
	// streams' own: 20 for transactional ([delivery] per_destination)
	// and 2 for bulk ([streams.bulk] per_destination).
	var dests []struct {
		Dest      string `json:"dest"`
		Queued    int    `json:"queued"`
		Max       int    `json:"max"`
		Delivered int64  `json:"delivered"`
		Deferred  int64  `json:"deferred"`
		Bounced   int64  `json:"bounced"`
	}
	adm.getJSON("/api/v1/destinations", &dests)
	if len(dests) != 1 || dests[0].Dest != routeKey || dests[0].Max != 20+2 || dests[0].Delivered != wantTotals["delivered"] ||
		dests[0].Bounced != 1 || dests[0].Deferred != 0 || dests[0].Queued != 2 {
		t.Errorf("destinations = %+v, want %s with max 22, %d delivered, 1 bounced, the captured recipients queued", dests, routeKey, wantTotals["delivered"])
	}

	// Search by recipient finds the bounced message, and its history
	// tells the recipient's story.
	var results []struct {
		ID      string   `json:"id"`
		To      []string `json:"to"`
		State   string   `json:"state"`
		InQueue bool     `json:"in_queue"`
	}
	adm.getJSON("/api/v1/search?q=BAD@dest.test", &results)
	if len(results) != 1 || results[0].ID != bounced.id || results[0].State != "done" || results[0].InQueue {
		t.Fatalf("search for bad@dest.test = %+v, want %s done", results, bounced.id)
	}
	var detail opsMessage
	adm.getJSON("/api/v1/message?id="+bounced.id, &detail)
	if detail.Stream != "bulk" || detail.Identity != bounced.identity || len(detail.Recipients) != 1 {
		t.Fatalf("message %s = %+v", bounced.id, detail)
	}
	rc := detail.Recipients[0]
	var kinds []string
	for _, h := range rc.History {
		kinds = append(kinds, h.Kind)
	}
	if rc.Addr != bounced.to || rc.State != "failed" || rc.Last.Code != 550 || !slices.Equal(kinds, []string{"accepted", "failed", "dsn_sent"}) {
		t.Fatalf("bounced recipient = %+v, want failed with 550 after accepted, failed, dsn_sent", rc)
	}
	if h := rc.History[1]; h.Reply.Code != 550 || h.Reply.Enhanced != "5.1.1" {
		t.Errorf("failed event reply = %+v", h.Reply)
	}
	if rc.History[2].DSNID != dsnID {
		t.Errorf("history dsn_id = %q, webhook's = %q", rc.History[2].DSNID, dsnID)
	}

	// Restart: the token file is kept, the captured messages and their
	// streams survive in the file queue, and releasing the bulk one
	// delivers it in bulk, as the new process's webhook and metrics say.
	restart := time.Now()
	r.stop()
	r.start()
	t.Logf("restart took %v", time.Since(restart))
	if strings.Contains(r.out.String(), "created admin token") {
		t.Errorf("a new admin token was made at restart:\n%s", r.out.String())
	}
	if b, err := os.ReadFile(filepath.Join(dataDir, "admin-token")); err != nil || !bytes.Equal(b, tokenBytes) {
		t.Errorf("admin token file changed at restart: %v", err)
	}
	poll(t, time.Minute, func() error {
		var qs queueStats
		adm.getJSON("/api/v1/queue/stats", &qs)
		return wantStats(qs)
	}, r)
	var held opsMessage
	adm.getJSON("/api/v1/message?id="+captured2.id, &held)
	if !held.InQueue || !held.Sandbox || held.State != "held" || held.Stream != "bulk" || held.Identity != captured2.identity {
		t.Fatalf("captured bulk message after restart = %+v", held)
	}
	if code, body := adm.post("/api/v1/queue/release?id=" + captured2.id); code != http.StatusOK {
		t.Fatalf("release %s: %d %s", captured2.id, code, body)
	}
	msgs = dest.wait(delivered+2, time.Minute)
	var rel *received
	for i, got := range msgs {
		if got.To[0] == captured2.to {
			rel = &msgs[i]
		}
	}
	if rel == nil {
		t.Fatalf("released message not delivered")
	}
	if !strings.HasSuffix(string(rel.Body), strings.Replace(captured2.msg, captured2.header, "", 1)) {
		t.Errorf("released message changed beyond the stream header and trace fields:\n%s", rel.Body)
	}
	want[evKey{"delivered", captured2.id, captured2.to, "bulk", "app@sender.test"}] = true
	poll(t, time.Minute, func() error {
		if evs, _ := hooks.snapshot(); len(evs) < len(want) {
			return fmt.Errorf("%d webhook events, want %d", len(evs), len(want))
		}
		fams = adm.metrics()
		if got := sumCounter(fams, "baton_webhook_events_sent_total", nil); got != 1 {
			return fmt.Errorf("baton_webhook_events_sent_total after restart = %v, want 1", got)
		}
		var qs queueStats
		adm.getJSON("/api/v1/queue/stats", &qs)
		return checkStats(qs, map[string]int{"held": 1}, map[string]int{"transactional": 1})
	}, r)
	checkEvents()
	t.Logf("from submission to the last check: %v (%d webhook events)", time.Since(submitted), len(want))
	for _, ev := range []string{"accepted", "delivered", "failed", "dsn_sent", "deferred"} {
		for _, stream := range []string{"bulk", "transactional"} {
			want := 0.0
			if ev == "delivered" && stream == "bulk" {
				want = 1
			}
			if got := sumCounter(fams, "baton_recipients_total", map[string]string{"event": ev, "stream": stream}); got != want {
				t.Errorf("after restart baton_recipients_total{event=%q,stream=%q} = %v, want %v", ev, stream, got, want)
			}
		}
	}
	adm.getJSON("/api/v1/sandbox/messages?identity="+captured.identity, &list)
	if len(list) != 1 || list[0].ID != captured.id {
		t.Errorf("sandbox messages after release = %+v, want %s alone", list, captured.id)
	}
}

// submitAuth submits one message over STARTTLS with AUTH PLAIN and
// returns the queue ID from the 250 reply.
func submitAuth(addr string, tlsCfg *tls.Config, user, pass, from, to, msg string) (string, error) {
	c, err := smtp.DialStartTLS(addr, tlsCfg)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", user, pass)); err != nil {
		return "", err
	}
	if err := c.Mail(from, nil); err != nil {
		return "", err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return "", err
	}
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	m := regexp.MustCompile(`queued as (\S+)`).FindStringSubmatch(resp.StatusText)
	if m == nil {
		return "", fmt.Errorf("no queue ID in %q", resp.StatusText)
	}
	return m[1], c.Quit()
}

// relaydClientTLS trusts the self-signed certificate relayd made in its
// data directory for "relay.test".
func relaydClientTLS(t *testing.T, dataDir string) *tls.Config {
	t.Helper()
	pem, err := os.ReadFile(filepath.Join(dataDir, "tls", "selfsigned.crt"))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("no certificate in selfsigned.crt")
	}
	return &tls.Config{RootCAs: pool, ServerName: "relay.test"}
}

// poll calls f until it returns nil, failing the test with f's last error
// (and relayd's output) when d passes first.
func poll(t *testing.T, d time.Duration, f func() error, r *relayd) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v\nrelayd output:\n%s", err, r.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// sumCounter adds up the counters or gauges of family name whose labels
// include labels.
func sumCounter(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	var sum float64
next:
	for _, m := range fams[name].GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range labels {
			if have[k] != v {
				continue next
			}
		}
		sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return sum
}

// adminClient calls relayd's admin API with its Bearer token.
type adminClient struct {
	t     *testing.T
	base  string
	token string
}

// do sends a request with token as its Bearer token (none when empty)
// and returns the response and its body.
func (a *adminClient) do(method, path, token string) (*http.Response, []byte) {
	a.t.Helper()
	req, err := http.NewRequest(method, a.base+path, nil)
	if err != nil {
		a.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp, b
}

// post sends a POST with the token and returns the status and body.
func (a *adminClient) post(path string) (int, []byte) {
	a.t.Helper()
	resp, b := a.do("POST", path, a.token)
	return resp.StatusCode, b
}

func (a *adminClient) status(path, token string) int {
	a.t.Helper()
	resp, _ := a.do("GET", path, token)
	return resp.StatusCode
}

func (a *adminClient) get(path string) ([]byte, http.Header) {
	a.t.Helper()
	resp, b := a.do("GET", path, a.token)
	if resp.StatusCode != http.StatusOK {
		a.t.Fatalf("GET %s: %s\n%s", path, resp.Status, b)
	}
	return b, resp.Header
}

func (a *adminClient) getJSON(path string, v any) {
	a.t.Helper()
	b, _ := a.get(path)
	if err := json.Unmarshal(b, v); err != nil {
		a.t.Fatalf("GET %s: %v\n%s", path, err, b)
	}
}

func (a *adminClient) metrics() map[string]*dto.MetricFamily {
	a.t.Helper()
	b, _ := a.get("/metrics")
	return parseMetrics(a.t, bytes.NewReader(b))
}

// hookReceiver is a webhook endpoint that checks every request's
// signature and keeps the events by ID.
type hookReceiver struct {
	srv    *httptest.Server
	secret string

	mu     sync.Mutex
	events []webhook.Event
	seen   map[string]bool
	dups   []string
	badSig int
}

func newHookReceiver(t *testing.T, secret string) *hookReceiver {
	h := &hookReceiver{secret: secret, seen: map[string]bool{}}
	h.srv = httptest.NewServer(http.HandlerFunc(h.serve))
	t.Cleanup(h.srv.Close)
	return h
}

func (h *hookReceiver) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 10<<20))
	if err != nil {
		http.Error(w, "read error", http.StatusBadRequest)
		return
	}
	if r.Method != http.MethodPost || r.URL.Path != "/hook" || r.Header.Get("Content-Type") != "application/json" {
		h.mu.Lock()
		h.badSig++
		h.mu.Unlock()
		http.Error(w, "bad request", http.StatusBadRequest)
		return
	}
	if err := webhook.Verify(h.secret, r.Header.Get(webhook.SignatureHeader), body, 5*time.Minute); err != nil {
		h.mu.Lock()
		h.badSig++
		h.mu.Unlock()
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var batch webhook.Batch
	if err := json.Unmarshal(body, &batch); err != nil {
		http.Error(w, "bad JSON", http.StatusBadRequest)
		return
	}
	h.mu.Lock()
	for _, e := range batch.Events {
		if h.seen[e.ID] {
			h.dups = append(h.dups, e.ID)
			continue
		}
		h.seen[e.ID] = true
		h.events = append(h.events, e)
	}
	h.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// snapshot returns the distinct events so far and the count of requests
// refused for their signature (or shape).
func (h *hookReceiver) snapshot() ([]webhook.Event, int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]webhook.Event(nil), h.events...), h.badSig
}

func (h *hookReceiver) duplicates() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.dups...)
}

// opsMessage is the part of /api/v1/message the test reads.
type opsMessage struct {
	ID         string `json:"id"`
	InQueue    bool   `json:"in_queue"`
	State      string `json:"state"`
	From       string `json:"from"`
	Stream     string `json:"stream"`
	Identity   string `json:"identity"`
	Sandbox    bool   `json:"sandbox"`
	Recipients []struct {
		Addr    string `json:"addr"`
		State   string `json:"state"`
		Last    struct{ Code int }
		History []struct {
			Kind  string `json:"kind"`
			Reply struct {
				Code     int
				Enhanced string
			} `json:"reply"`
			DSNID string `json:"dsn_id"`
		} `json:"history"`
	} `json:"recipients"`
}

// TestOps_WebhookFlushedAtShutdown checks relayd's shutdown order with a
// webhook whose batches never fill or time out on their own: the events
// of mail delivered before SIGTERM still reach the receiver, signed,
// because relayd stops the relay first and then flushes the webhook.
func TestOps_WebhookFlushedAtShutdown(t *testing.T) {
	dest := startSink(t, "smarthost.test")
	const secret = "e2e-flush-secret-0123456789"
	hooks := newHookReceiver(t, secret)
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[auth]
allow = [{ name = "app", cidr = ["127.0.0.1/32"], stream = "bulk" }]
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[[webhooks]]
url = %q
secret = %q
flush_interval = "1h"
batch_size = 1000
`, dest.port, hooks.srv.URL+"/hook", secret))
	for i := range 3 {
		to := fmt.Sprintf("r%d@dest.test", i)
		if err := sendPlain(r.addr, "app@sender.test", to, "From: app@sender.test\r\nTo: "+to+"\r\nSubject: flush\r\n\r\nbody\r\n"); err != nil {
			t.Fatalf("submit: %v", err)
		}
	}
	dest.wait(3, time.Minute)
	if evs, _ := hooks.snapshot(); len(evs) != 0 {
		t.Fatalf("events sent before the batch filled or the interval passed: %+v", evs)
	}
	r.stop()
	if err := r.cmd.ProcessState.ExitCode(); err != 0 {
		t.Errorf("relayd exited with %d:\n%s", err, r.out.String())
	}
	evs, bad := hooks.snapshot()
	if bad != 0 {
		t.Errorf("%d requests failed the signature check", bad)
	}
	kinds := map[string]int{}
	for _, e := range evs {
		if e.Stream != "bulk" {
			t.Errorf("event %+v not in the allow-list's stream", e)
		}
		kinds[e.Kind]++
	}
	if kinds["accepted"] != 3 || kinds["delivered"] != 3 || len(evs) != 6 {
		t.Fatalf("events after shutdown: %v, want 3 accepted and 3 delivered\n%s", kinds, r.out.String())
	}
}

// TestOps_BulkWorkersDoNotHoldUpTransactional checks that relayd applies
// [streams.bulk] workers: with bulk mail stalled at its destination,
// deliveries in progress for bulk stop at the stream's 2 workers (its
// per-destination limit is higher, so only the worker share can stop
// them), and transactional mail is still delivered meanwhile.
func TestOps_BulkWorkersDoNotHoldUpTransactional(t *testing.T) {
	fast := startSink(t, "fast.test")
	// The stalled sink waits without a read deadline running out.
	slow := startSink(t, "slow.test", func(s *smtp.Server) { s.ReadTimeout = 5 * time.Minute })
	var (
		mu              sync.Mutex
		inData, entered int
	)
	release := make(chan struct{})
	slow.onData = func() {
		mu.Lock()
		inData++
		entered++
		mu.Unlock()
		<-release
		mu.Lock()
		inData--
		mu.Unlock()
	}
	stalled := func() (in, total int) {
		mu.Lock()
		defer mu.Unlock()
		return inData, entered
	}
	var once sync.Once
	unstall := func() { once.Do(func() { close(release) }) }
	t.Cleanup(unstall) // before the sinks close

	adminAddr := freeAddr(t)
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[auth]
allow = [{ name = "app", cidr = ["127.0.0.1/32"] }]
[[routes]]
domain = "bulk.test"
host = "127.0.0.1"
port = %d
tls = "none"
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[streams.bulk]
workers = 2
per_destination = 10
[admin]
listen = %q
`, slow.port, fast.port, adminAddr))
	tok, err := os.ReadFile(filepath.Join(r.dir, "admin-token"))
	if err != nil {
		t.Fatal(err)
	}
	adm := &adminClient{t: t, base: "http://" + adminAddr, token: strings.TrimSpace(string(tok))}

	const nBulk = 6
	for i := range nBulk {
		to := fmt.Sprintf("r%d@bulk.test", i)
		body := "From: app@sender.test\r\nTo: " + to + "\r\nX-Baton-Stream: bulk\r\nSubject: bulk\r\n\r\nbody\r\n"
		if err := sendPlain(r.addr, "app@sender.test", to, body); err != nil {
			t.Fatalf("submit bulk: %v", err)
		}
	}
	poll(t, time.Minute, func() error {
		if in, _ := stalled(); in != 2 {
			return fmt.Errorf("%d bulk deliveries stalled, want the stream's 2 workers", in)
		}
		return nil
	}, r)

	start := time.Now()
	body := "From: app@sender.test\r\nTo: t@dest.test\r\nSubject: transactional\r\n\r\nbody\r\n"
	if err := sendPlain(r.addr, "app@sender.test", "t@dest.test", body); err != nil {
		t.Fatalf("submit transactional: %v", err)
	}
	fast.wait(1, time.Minute)
	t.Logf("transactional delivered %v after submission, with bulk stalled", time.Since(start))
	if in, total := stalled(); in != 2 || total != 2 {
		t.Errorf("bulk deliveries: %d stalled, %d started; want 2 and 2", in, total)
	}
	var dests []struct {
		Dest     string `json:"dest"`
		InFlight int    `json:"in_flight"`
	}
	adm.getJSON("/api/v1/destinations", &dests)
	for _, d := range dests {
		if d.Dest == fmt.Sprintf("route:127.0.0.1:%d", slow.port) && d.InFlight != 2 {
			t.Errorf("destination %s in flight = %d, want 2", d.Dest, d.InFlight)
		}
	}

	unstall()
	slow.wait(nBulk, time.Minute)
	for _, m := range append(slow.messages(), fast.messages()...) {
		if headerValue(m.Body, "X-Baton-Stream") != "" {
			t.Errorf("stream header delivered to %v", m.To)
		}
	}
}
