package relay

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-message"
	"github.com/emersion/go-message/textproto"

	"github.com/batonmail/baton/queue"
)

var updateDSNGolden = flag.Bool("update-dsn", false, "rewrite relay/testdata/dsn golden files")

// dsnSeqReader is a deterministic Random source for golden files.
type dsnSeqReader struct{ n byte }

func (s *dsnSeqReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = s.n
		s.n++
	}
	return len(p), nil
}

var dsnReceived = time.Date(2026, 11, 20, 10, 0, 0, 0, time.UTC)

func fixedDSNConfig() DSNConfig {
	return DSNConfig{
		ReportingMTA: "relay.example.test",
		Now:          func() time.Time { return time.Date(2026, 11, 23, 12, 30, 0, 0, time.UTC) },
		Random:       &dsnSeqReader{},
	}
}

const dsnOriginal = "From: Sender <sender@example.test>\r\n" +
	"To: a@dest.test\r\n" +
	"Subject: Hello there\r\n" +
	"Message-ID: <orig@example.test>\r\n" +
	"\r\n" +
	"Body line 1\r\n" +
	"Body line 2\r\n"

// dsnMessage returns a message with recipients in several states:
// a (5.1.1 with ORCPT), b (expired after 4xx), c (5xx without enhanced
// code), d (NOTIFY=NEVER), e (suppressed locally).
func dsnMessage(ret queue.Ret) (*queue.Message, []queue.RecipientStatus) {
	m := &queue.Message{
		ID: "MSG0000000000001",
		Envelope: queue.Envelope{
			From:  "sender@example.test",
			Ret:   ret,
			EnvID: "env-123",
		},
		Received: dsnReceived,
		Expires:  dsnReceived.Add(5 * 24 * time.Hour),
		Size:     int64(len(dsnOriginal)),
	}
	at := dsnReceived.Add(3 * time.Hour)
	rs := []queue.RecipientStatus{
		{Recipient: queue.Recipient{Addr: "a@dest.test", ORCPT: "rfc822;A@dest.test"}, State: queue.RcptFailed, Attempts: 1,
			Last: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user here", Host: "mx1.dest.test"}},
		{Recipient: queue.Recipient{Addr: "b@dest.test", Notify: queue.NotifyFailure | queue.NotifyDelay}, State: queue.RcptFailed, Attempts: 12, Expired: true,
			Last: queue.Reply{Code: 451, Enhanced: "4.3.0", Text: "Try again later", Host: "mx1.dest.test"}},
		{Recipient: queue.Recipient{Addr: "c@other.test"}, State: queue.RcptFailed, Attempts: 2,
			Last: queue.Reply{Code: 554, Text: "Rejected for reasons of its own, with a reply long enough that it has to be wrapped in the text part", Host: "mx.other.test"}},
		{Recipient: queue.Recipient{Addr: "d@other.test", Notify: queue.NotifyNever}, State: queue.RcptFailed, Attempts: 1,
			Last: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "No such user", Host: "mx.other.test"}},
		{Recipient: queue.Recipient{Addr: "e@local.test"}, State: queue.RcptFailed, Attempts: 1,
			Last: SuppressedReply(&Suppression{Addr: "e@local.test", Created: dsnReceived.Add(-24 * time.Hour), Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "unknown", Host: "mx.local.test"}})},
	}
	rs[0].History = []queue.Attempt{{At: at, Result: queue.Failed, Reply: rs[0].Last}}
	for _, r := range rs {
		m.Envelope.To = append(m.Envelope.To, r.Recipient)
	}
	m.Recipients = rs
	return m, rs
}

func buildDSNBytes(t *testing.T, cfg DSNConfig, m *queue.Message, rs []queue.RecipientStatus, kind DSNKind, orig io.Reader) (*queue.Envelope, []byte) {
	t.Helper()
	env, body, err := BuildDSN(cfg, m, rs, kind, orig)
	if err != nil {
		t.Fatalf("BuildDSN: %v", err)
	}
	if env == nil {
		t.Fatalf("BuildDSN returned no DSN")
	}
	b, err := io.ReadAll(body)
	if err != nil {
		t.Fatalf("reading DSN: %v", err)
	}
	return env, b
}

// dsnView is what the independent Python parser reports.
type dsnView struct {
	ContentType string            `json:"content_type"`
	ReportType  string            `json:"report_type"`
	Headers     map[string]string `json:"headers"`
	Defects     []string          `json:"defects"`
	Parts       []struct {
		Type        string              `json:"type"`
		Text        string              `json:"text"`
		PerMessage  map[string]string   `json:"per_message"`
		Recipients  []map[string]string `json:"recipients"`
		Subject     string              `json:"subject"`
		Body        string              `json:"body"`
		Content     string              `json:"content"`
		RawFallback string              `json:"raw"`
	} `json:"parts"`
}

func dsnPythonParse(t *testing.T, dsn []byte) *dsnView {
	t.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed: the independent DSN parser is unavailable")
	}
	f := filepath.Join(t.TempDir(), "dsn.eml")
	if err := os.WriteFile(f, dsn, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(py, "testdata/dsn/check_dsn.py", f).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("python parser failed: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("python parser: %v", err)
	}
	var v dsnView
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("python output: %v\n%s", err, out)
	}
	return &v
}

func TestBuildDSN_Failure_PythonParser(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		ret      queue.Ret
		wantType string
	}{
		{"RetAbsentReturnsHeaders", "", "text/rfc822-headers"},
		{"RetHdrsReturnsHeaders", queue.RetHeaders, "text/rfc822-headers"},
		{"RetFullReturnsMessage", queue.RetFull, "message/rfc822"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, rs := dsnMessage(tc.ret)
			env, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, strings.NewReader(dsnOriginal))
			if env.From != "" || len(env.To) != 1 || env.To[0].Addr != "sender@example.test" || env.To[0].Notify != queue.NotifyNever {
				t.Fatalf("envelope = %+v, want null sender to sender@example.test with NOTIFY=NEVER", env)
			}
			v := dsnPythonParse(t, raw)
			if len(v.Defects) != 0 {
				t.Errorf("python found defects: %v", v.Defects)
			}
			if v.ContentType != "multipart/report" || v.ReportType != "delivery-status" {
				t.Errorf("type = %s report-type=%s", v.ContentType, v.ReportType)
			}
			for k, want := range map[string]string{
				"From":           "Mail Delivery System <MAILER-DAEMON@relay.example.test>",
				"To":             "sender@example.test",
				"Subject":        "Undelivered Mail Returned to Sender",
				"Auto-Submitted": "auto-replied",
				"MIME-Version":   "1.0",
				"Date":           "Mon, 23 Nov 2026 12:30:00 +0000",
			} {
				if got := v.Headers[k]; got != want {
					t.Errorf("header %s = %q, want %q", k, got, want)
				}
			}
			if !strings.HasSuffix(v.Headers["Message-ID"], "@relay.example.test>") {
				t.Errorf("Message-ID = %q", v.Headers["Message-ID"])
			}
			if len(v.Parts) != 3 {
				t.Fatalf("%d parts, want 3", len(v.Parts))
			}
			if v.Parts[0].Type != "text/plain" || v.Parts[1].Type != "message/delivery-status" || v.Parts[2].Type != tc.wantType {
				t.Fatalf("part types %s, %s, %s", v.Parts[0].Type, v.Parts[1].Type, v.Parts[2].Type)
			}
			text := v.Parts[0].Text
			for _, want := range []string{"<a@dest.test>", "No such user here", "<b@dest.test>", "delivery time expired (4.4.7)", "<c@other.test>", "<e@local.test>", "suppressed"} {
				if !strings.Contains(text, want) {
					t.Errorf("text part lacks %q:\n%s", want, text)
				}
			}
			if strings.Contains(text, "d@other.test") {
				t.Errorf("text part names the NOTIFY=NEVER recipient")
			}
			pm := v.Parts[1].PerMessage
			if pm["Reporting-MTA"] != "dns; relay.example.test" || pm["Original-Envelope-Id"] != "env-123" || pm["Arrival-Date"] != "Fri, 20 Nov 2026 10:00:00 +0000" {
				t.Errorf("per-message fields = %v", pm)
			}
			want := []map[string]string{
				{"Original-Recipient": "rfc822; A@dest.test", "Final-Recipient": "rfc822; a@dest.test", "Action": "failed", "Status": "5.1.1",
					"Remote-MTA": "dns; mx1.dest.test", "Diagnostic-Code": "smtp; 550 5.1.1 No such user here", "Last-Attempt-Date": "Fri, 20 Nov 2026 13:00:00 +0000"},
				{"Final-Recipient": "rfc822; b@dest.test", "Action": "failed", "Status": "4.4.7",
					"Remote-MTA": "dns; mx1.dest.test", "Diagnostic-Code": "smtp; 451 4.3.0 Try again later", "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000"},
				{"Final-Recipient": "rfc822; c@other.test", "Action": "failed", "Status": "5.0.0",
					"Remote-MTA": "dns; mx.other.test", "Diagnostic-Code": "smtp; 554 " + rs[2].Last.Text, "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000"},
				{"Final-Recipient": "rfc822; e@local.test", "Action": "failed", "Status": "5.1.1",
					"Diagnostic-Code": "X-Baton; " + rs[4].Last.String(), "Last-Attempt-Date": "Mon, 23 Nov 2026 12:30:00 +0000"},
			}
			got := v.Parts[1].Recipients
			if len(got) != len(want) {
				t.Fatalf("%d recipient groups, want %d: %v", len(got), len(want), got)
			}
			for i := range want {
				if fmt.Sprint(got[i]) != fmt.Sprint(want[i]) {
					t.Errorf("recipient %d:\n got %v\nwant %v", i, got[i], want[i])
				}
			}
			p3 := v.Parts[2]
			if p3.Subject != "Hello there" {
				t.Errorf("returned subject = %q", p3.Subject)
			}
			if tc.ret == queue.RetFull {
				if p3.Body != "Body line 1\r\nBody line 2\r\n" {
					t.Errorf("returned body = %q", p3.Body)
				}
			} else if strings.Contains(p3.Content, "Body line") {
				t.Errorf("headers-only part contains the body: %q", p3.Content)
			}
		})
	}
}

func TestBuildDSN_Delay_PythonParser(t *testing.T) {
	t.Parallel()
	m, _ := dsnMessage(queue.RetFull)
	rs := []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "late@dest.test"}, State: queue.RcptPending, Attempts: 3,
		Last: queue.Reply{Code: 421, Enhanced: "4.7.0", Text: "Too busy", Host: "mx1.dest.test"}}}
	_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNDelay, strings.NewReader(dsnOriginal))
	v := dsnPythonParse(t, raw)
	if v.Headers["Subject"] != "Delayed Mail (still being retried)" {
		t.Errorf("Subject = %q", v.Headers["Subject"])
	}
	if len(v.Parts) != 3 || v.Parts[2].Type != "text/rfc822-headers" {
		t.Fatalf("parts = %+v; a delay DSN returns headers only, even for RET=FULL", v.Parts)
	}
	r := v.Parts[1].Recipients[0]
	if r["Action"] != "delayed" || r["Status"] != "4.7.0" || r["Will-Retry-Until"] != "Wed, 25 Nov 2026 10:00:00 +0000" {
		t.Errorf("recipient fields = %v", r)
	}
}

func TestBuildDSN_RetFullTooLarge_ReturnsHeaders(t *testing.T) {
	m, rs := dsnMessage(queue.RetFull)
	cfg := fixedDSNConfig()
	cfg.MaxReturnBytes = int64(len(dsnOriginal)) - 1
	_, raw := buildDSNBytes(t, cfg, m, rs, DSNFailure, strings.NewReader(dsnOriginal))
	e := dsnReadEntity(t, raw)
	parts := dsnReadParts(t, e)
	if ct := parts[2].typ; ct != "text/rfc822-headers" {
		t.Fatalf("third part %s, want headers only", ct)
	}
	if !strings.Contains(parts[0].body, "too large to return in full") {
		t.Errorf("text part does not explain why only the header is returned:\n%s", parts[0].body)
	}
}

func TestBuildDSN_NotDue(t *testing.T) {
	m, rs := dsnMessage("")
	never := []queue.RecipientStatus{rs[3]}
	cases := []struct {
		name  string
		msg   func() *queue.Message
		rcpts []queue.RecipientStatus
		kind  DSNKind
	}{
		{"NullSender", func() *queue.Message { c := m.Clone(); c.Envelope.From = ""; return c }, rs, DSNFailure},
		{"NotifyNever", func() *queue.Message { return m }, never, DSNFailure},
		{"NoRecipients", func() *queue.Message { return m }, nil, DSNFailure},
		{"SuccessNotRequested", func() *queue.Message { return m }, rs, DSNSuccess},
		{"RelayedNotRequested", func() *queue.Message { return m }, rs, DSNRelayed},
		{"DelayNotRequested", func() *queue.Message { return m }, []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "x@dest.test", Notify: queue.NotifyFailure}}}, DSNDelay},
		{"FailureNotRequested", func() *queue.Message { return m }, []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "x@dest.test", Notify: queue.NotifySuccess | queue.NotifyDelay}}}, DSNFailure},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			msg := tc.msg()
			env, body, err := BuildDSN(fixedDSNConfig(), msg, tc.rcpts, tc.kind, strings.NewReader(dsnOriginal))
			if err != nil || env != nil || body != nil {
				t.Fatalf("BuildDSN = %v, %v, %v; want no DSN", env, body, err)
			}
			if DSNDue(msg, tc.rcpts, tc.kind) {
				t.Errorf("DSNDue = true, want false")
			}
		})
	}
}

func TestBuildDSN_NotifyFilter_OnlyRequestingRecipientsReported(t *testing.T) {
	m, _ := dsnMessage("")
	rs := []queue.RecipientStatus{
		{Recipient: queue.Recipient{Addr: "yes@dest.test", Notify: queue.NotifySuccess}, State: queue.RcptDelivered, Last: queue.Reply{Code: 250, Text: "OK", Host: "mx.dest.test"}},
		{Recipient: queue.Recipient{Addr: "no@dest.test"}, State: queue.RcptDelivered, Last: queue.Reply{Code: 250, Text: "OK", Host: "mx.dest.test"}},
	}
	if !DSNDue(m, rs, DSNRelayed) {
		t.Fatal("DSNDue = false for a NOTIFY=SUCCESS recipient")
	}
	_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNRelayed, strings.NewReader(dsnOriginal))
	groups := dsnStatusGroups(t, dsnReadParts(t, dsnReadEntity(t, raw))[1].body)
	if len(groups) != 2 {
		t.Fatalf("%d groups, want per-message + 1 recipient", len(groups))
	}
	g := groups[1]
	if g.Get("Final-Recipient") != "rfc822; yes@dest.test" || g.Get("Action") != "relayed" || g.Get("Status") != "2.0.0" {
		t.Errorf("recipient group = %v", g.Map())
	}
}

func TestBuildDSN_ErrorsOnBadInput(t *testing.T) {
	m, rs := dsnMessage("")
	if _, _, err := BuildDSN(fixedDSNConfig(), nil, rs, DSNFailure, nil); err == nil {
		t.Error("nil message: no error")
	}
	if _, _, err := BuildDSN(fixedDSNConfig(), m, rs, DSNKind(99), nil); err == nil {
		t.Error("unknown kind: no error")
	}
}

func TestBuildDSN_NilOriginal_TwoParts(t *testing.T) {
	m, rs := dsnMessage(queue.RetFull)
	_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, nil)
	parts := dsnReadParts(t, dsnReadEntity(t, raw))
	if len(parts) != 2 {
		t.Fatalf("%d parts, want 2", len(parts))
	}
}

func TestBuildDSN_UTF8_UsesGlobalTypes(t *testing.T) {
	m, _ := dsnMessage(queue.RetFull)
	m.Envelope.From = "séndér@example.test"
	m.Envelope.SMTPUTF8 = true
	rs := []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "üser@dest.test"}, State: queue.RcptFailed, Attempts: 1,
		Last: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "Unbekannter Empfänger", Host: "mx.dest.test"}}}
	env, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, strings.NewReader(dsnOriginal))
	if !env.SMTPUTF8 || !env.EightBit {
		t.Errorf("envelope SMTPUTF8=%v EightBit=%v, want both", env.SMTPUTF8, env.EightBit)
	}
	parts := dsnReadParts(t, dsnReadEntity(t, raw))
	if parts[1].typ != "message/global-delivery-status" || parts[2].typ != "message/global" {
		t.Fatalf("types %s, %s", parts[1].typ, parts[2].typ)
	}
	g := dsnStatusGroups(t, parts[1].body)[1]
	if g.Get("Final-Recipient") != "utf-8; üser@dest.test" || g.Get("Diagnostic-Code") != "smtp; 550 5.1.1 Unbekannter Empfänger" {
		t.Errorf("recipient group = %v", g.Map())
	}
	goldenDSN(t, "utf8-full.eml", raw)
}

func TestBuildDSN_ASCII_ReplacesNonASCIIText(t *testing.T) {
	m, _ := dsnMessage("")
	rs := []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "u@dest.test"}, State: queue.RcptFailed, Attempts: 1,
		Last: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "Unbekannter Empfänger", Host: "mx.dest.test"}}}
	env, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, strings.NewReader(dsnOriginal))
	if env.SMTPUTF8 {
		t.Error("SMTPUTF8 set for an ASCII envelope")
	}
	header, _, _ := bytes.Cut(raw, []byte("\r\n--=_"))
	_, rest, _ := bytes.Cut(raw, []byte("message/delivery-status"))
	if !isASCII(string(header)) || !isASCII(string(rest)) {
		t.Errorf("non-ASCII bytes in an ASCII DSN")
	}
	if !bytes.Contains(raw, []byte("Unbekannter Empf?nger")) {
		t.Errorf("non-ASCII reply text not replaced")
	}
}

func TestBuildDSN_Golden(t *testing.T) {
	for _, tc := range []struct {
		file string
		ret  queue.Ret
		kind DSNKind
	}{
		{"failure-hdrs.eml", queue.RetHeaders, DSNFailure},
		{"failure-full.eml", queue.RetFull, DSNFailure},
	} {
		t.Run(tc.file, func(t *testing.T) {
			m, rs := dsnMessage(tc.ret)
			_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, tc.kind, strings.NewReader(dsnOriginal))
			goldenDSN(t, tc.file, raw)
		})
	}
	t.Run("delay.eml", func(t *testing.T) {
		m, _ := dsnMessage("")
		rs := []queue.RecipientStatus{{Recipient: queue.Recipient{Addr: "late@dest.test"}, State: queue.RcptPending, Attempts: 3,
			Last: queue.Reply{Code: 421, Enhanced: "4.7.0", Text: "Too busy", Host: "mx1.dest.test"}}}
		_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNDelay, strings.NewReader(dsnOriginal))
		goldenDSN(t, "delay.eml", raw)
	})
}

func goldenDSN(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", "dsn", name)
	if *updateDSNGolden {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -run BuildDSN ./relay -update-dsn to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from golden file:\n--- got ---\n%s\n--- want ---\n%s", name, got, want)
	}
}

func TestBuildDSN_RandomBoundary(t *testing.T) {
	m, rs := dsnMessage("")
	_, a := buildDSNBytes(t, DSNConfig{ReportingMTA: "r.test"}, m, rs, DSNFailure, strings.NewReader(dsnOriginal))
	_, b := buildDSNBytes(t, DSNConfig{ReportingMTA: "r.test"}, m, rs, DSNFailure, strings.NewReader(dsnOriginal))
	if bytes.Equal(a, b) {
		t.Error("two DSNs with the default Random are identical (same boundary and Message-ID)")
	}
}

func TestBuildDSN_FullOriginalStreamedExactly(t *testing.T) {
	// A body with bare LF, bare CR, a long line and no final newline: the
	// returned copy has every line ending as CRLF and ends in CRLF.
	orig := "Subject: odd\nX: y\r\n\r\nline1\nline2\rline3\r\n" + strings.Repeat("x", 5000) + "\nlast"
	want := "Subject: odd\r\nX: y\r\n\r\nline1\r\nline2\r\nline3\r\n" + strings.Repeat("x", 5000) + "\r\nlast\r\n"
	m, rs := dsnMessage(queue.RetFull)
	m.Size = int64(len(orig))
	_, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, iotest.OneByteReader(strings.NewReader(orig)))
	parts := dsnReadParts(t, dsnReadEntity(t, raw))
	if parts[2].typ != "message/rfc822" {
		t.Fatalf("third part %s", parts[2].typ)
	}
	if got := parts[2].raw; got != want {
		short := func(s string) string { return strings.ReplaceAll(s, strings.Repeat("x", 5000), "x{5000}") }
		t.Errorf("returned message:\n got %q\nwant %q", short(got), short(want))
	}
}

func TestBuildDSN_ReadErrorOfOriginalSurfaces(t *testing.T) {
	m, rs := dsnMessage(queue.RetFull)
	boom := errors.New("disk on fire")
	_, body, err := BuildDSN(fixedDSNConfig(), m, rs, DSNFailure, io.MultiReader(strings.NewReader("Subject: x\r\n"), iotest.ErrReader(boom)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(body); !errors.Is(err, boom) {
		t.Fatalf("reading the DSN: err = %v, want %v", err, boom)
	}
}

func TestDSNStatus(t *testing.T) {
	for _, tc := range []struct {
		kind    DSNKind
		expired bool
		reply   queue.Reply
		want    string
	}{
		{DSNFailure, false, queue.Reply{Code: 550, Enhanced: "5.1.1"}, "5.1.1"},
		{DSNFailure, false, queue.Reply{Code: 550}, "5.0.0"},
		{DSNFailure, false, queue.Reply{Code: 552, Enhanced: "4.2.2"}, "5.0.0"}, // mismatched class
		{DSNFailure, false, queue.Reply{Code: 550, Enhanced: "5.1"}, "5.0.0"},   // malformed
		{DSNFailure, false, queue.Reply{}, "5.0.0"},
		{DSNFailure, true, queue.Reply{Code: 451, Enhanced: "4.4.1"}, "4.4.7"},
		{DSNFailure, true, queue.Reply{}, "4.4.7"},
		{DSNFailure, false, queue.Reply{Code: 450}, "4.0.0"},
		{DSNDelay, false, queue.Reply{Code: 451, Enhanced: "4.4.1"}, "4.4.1"},
		{DSNDelay, false, queue.Reply{Code: 421}, "4.0.0"},
		{DSNDelay, false, queue.Reply{}, "4.0.0"},
		{DSNSuccess, false, queue.Reply{Code: 250, Enhanced: "2.6.0"}, "2.6.0"},
		{DSNSuccess, false, queue.Reply{Code: 250}, "2.0.0"},
		{DSNRelayed, false, queue.Reply{}, "2.0.0"},
		{DSNFailure, false, queue.Reply{Code: 550, Enhanced: "5.1.10"}, "5.1.10"},
	} {
		r := queue.RecipientStatus{Expired: tc.expired, Last: tc.reply}
		if got := dsnStatus(tc.kind, &r); got != tc.want {
			t.Errorf("dsnStatus(%v, expired=%v, %+v) = %s, want %s", tc.kind, tc.expired, tc.reply, got, tc.want)
		}
	}
}

func TestDSNCRLFReader(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"", ""},
		{"a", "a\r\n"},
		{"a\n", "a\r\n"},
		{"a\r", "a\r\n"},
		{"a\r\n", "a\r\n"},
		{"a\r\r\nb", "a\r\n\r\nb\r\n"},
		{"\n\n", "\r\n\r\n"},
		{"a\n\rb", "a\r\n\r\nb\r\n"},
	} {
		for _, one := range []bool{false, true} {
			var r io.Reader = strings.NewReader(tc.in)
			if one {
				r = iotest.OneByteReader(r)
			}
			got, err := io.ReadAll(newDSNCRLFReader(r))
			if err != nil || string(got) != tc.want {
				t.Errorf("crlf(%q, onebyte=%v) = %q, %v; want %q", tc.in, one, got, err, tc.want)
			}
		}
	}
}

func TestDSNHeaderReader(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"A: 1\r\nB: 2\r\n\r\nbody\r\n", "A: 1\r\nB: 2\r\n"},
		{"A: 1\r\n folded\r\n\r\n\r\nbody", "A: 1\r\n folded\r\n"},
		{"A: 1\r\n", "A: 1\r\n"},
		{"\r\nbody\r\n", ""},
	} {
		got, err := io.ReadAll(&dsnHeaderReader{r: iotest.OneByteReader(strings.NewReader(tc.in)), lineStart: true})
		if err != nil || string(got) != tc.want {
			t.Errorf("header(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

func TestBuildDSN_AllocationsDoNotScaleWithOriginal(t *testing.T) {
	allocs := func(size int) float64 {
		orig := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxy\r\n"), size/74)
		orig = append([]byte("Subject: big\r\n\r\n"), orig...)
		m, rs := dsnMessage(queue.RetFull)
		m.Size = int64(len(orig))
		cfg := fixedDSNConfig()
		cfg.MaxReturnBytes = 10 << 20
		return testing.AllocsPerRun(5, func() {
			_, body, err := BuildDSN(cfg, m, rs, DSNFailure, bytes.NewReader(orig))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, body); err != nil {
				t.Fatal(err)
			}
		})
	}
	// AllocsPerRun counts every goroutine's allocations, so leave room for
	// background noise; an allocation per chunk of the original would add
	// hundreds for 1 MB.
	small, large := allocs(5<<10), allocs(1<<20)
	if large > small+50 {
		t.Errorf("allocations grow with the original: %.0f for 5 KB, %.0f for 1 MB", small, large)
	}
}

func BenchmarkBuildDSN(b *testing.B) {
	for _, bc := range []struct {
		name string
		size int
		ret  queue.Ret
	}{
		{"5KB/full", 5 << 10, queue.RetFull},
		{"1MB/full", 1 << 20, queue.RetFull},
		{"1MB/hdrs", 1 << 20, queue.RetHeaders},
	} {
		b.Run(bc.name, func(b *testing.B) {
			orig := bytes.Repeat([]byte("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxy\r\n"), bc.size/74)
			orig = append([]byte("Subject: big\r\nFrom: a@example.test\r\n\r\n"), orig...)
			m, rs := dsnMessage(bc.ret)
			m.Size = int64(len(orig))
			cfg := DSNConfig{ReportingMTA: "relay.example.test"}
			b.SetBytes(int64(len(orig)))
			b.ReportAllocs()
			for b.Loop() {
				_, body, err := BuildDSN(cfg, m, rs, DSNFailure, bytes.NewReader(orig))
				if err != nil {
					b.Fatal(err)
				}
				if _, err := io.Copy(io.Discard, body); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// Go-side parsing with go-message.

type dsnPart struct {
	typ  string
	body string // decoded body
	raw  string
}

func dsnReadEntity(t *testing.T, raw []byte) *message.Entity {
	t.Helper()
	e, err := message.Read(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("go-message cannot read the DSN: %v", err)
	}
	ct, params, err := e.Header.ContentType()
	if err != nil || ct != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("Content-Type %s %v %v", ct, params, err)
	}
	return e
}

func dsnReadParts(t *testing.T, e *message.Entity) []dsnPart {
	t.Helper()
	mr := e.MultipartReader()
	if mr == nil {
		t.Fatal("not multipart")
	}
	var parts []dsnPart
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("next part: %v", err)
		}
		ct, _, _ := p.Header.ContentType()
		b, err := io.ReadAll(p.Body)
		if err != nil {
			t.Fatalf("part body: %v", err)
		}
		parts = append(parts, dsnPart{typ: ct, body: string(b), raw: string(b)})
	}
	return parts
}

// dsnStatusGroups splits a message/delivery-status body into its field groups.
func dsnStatusGroups(t *testing.T, body string) []textproto.Header {
	t.Helper()
	br := bufio.NewReader(strings.NewReader(body))
	var groups []textproto.Header
	for {
		// Skip blank lines between groups.
		b, err := br.Peek(2)
		if err == nil && string(b) == "\r\n" {
			br.Discard(2)
			continue
		}
		if len(b) == 0 {
			break
		}
		h, err := textproto.ReadHeader(br)
		if err != nil {
			t.Fatalf("status group: %v", err)
		}
		groups = append(groups, h)
	}
	return groups
}

func TestBuildDSN_EightBitOriginal_Declared8bit(t *testing.T) {
	t.Parallel()
	m, rs := dsnMessage(queue.RetFull)
	m.Envelope.EightBit = true
	orig := "Subject: caf\xc3\xa9\r\n\r\nna\xc3\xafve body\r\n"
	m.Size = int64(len(orig))
	env, raw := buildDSNBytes(t, fixedDSNConfig(), m, rs, DSNFailure, strings.NewReader(orig))
	if !env.EightBit || env.SMTPUTF8 {
		t.Errorf("envelope EightBit=%v SMTPUTF8=%v, want 8BITMIME only", env.EightBit, env.SMTPUTF8)
	}
	_, third, ok := bytes.Cut(raw, []byte("Content-Type: message/rfc822\r\n"))
	if !ok || !bytes.Contains(third, []byte("Content-Transfer-Encoding: 8bit\r\n")) || !bytes.Contains(third, []byte(orig)) {
		t.Errorf("third part not declared 8bit or not the original:\n%s", third)
	}
	v := dsnPythonParse(t, raw)
	if len(v.Defects) != 0 || v.Parts[2].Type != "message/rfc822" || !strings.Contains(v.Parts[2].Body, "naïve") {
		t.Errorf("python view: defects %v, parts %+v", v.Defects, v.Parts)
	}
}
