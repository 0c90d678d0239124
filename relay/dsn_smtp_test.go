package relay

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// dsnMX is a go-smtp server on loopback that stands for every destination
// of a test: it refuses unknown@dest.test at RCPT with 550 5.1.1, accepts
// everyone else and keeps what it received.
type dsnMX struct {
	mu   sync.Mutex
	msgs []dsnMXMessage
}

type dsnMXMessage struct {
	from string
	to   []string
	data []byte
}

type dsnMXSession struct {
	mx  *dsnMX
	cur dsnMXMessage
}

func (m *dsnMX) NewSession(*smtp.Conn) (smtp.Session, error) { return &dsnMXSession{mx: m}, nil }

func (s *dsnMXSession) Reset()        { s.cur = dsnMXMessage{} }
func (s *dsnMXSession) Logout() error { return nil }
func (s *dsnMXSession) Mail(from string, _ *smtp.MailOptions) error {
	s.cur = dsnMXMessage{from: from}
	return nil
}
func (s *dsnMXSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.EqualFold(to, "unknown@dest.test") {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user here"}
	}
	s.cur.to = append(s.cur.to, to)
	return nil
}
func (s *dsnMXSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.cur.data = b
	s.mx.mu.Lock()
	s.mx.msgs = append(s.mx.msgs, s.cur)
	s.mx.mu.Unlock()
	return nil
}

func (m *dsnMX) received() []dsnMXMessage {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]dsnMXMessage(nil), m.msgs...)
}

// TestDSN_OverSMTP_BounceReachesSender runs the whole path on loopback: a
// message whose recipient a real SMTP server refuses is bounced, and the
// DSN travels back over SMTP to the sender's server (the same go-smtp
// peer), where Python's email parser checks it.
func TestDSN_OverSMTP_BounceReachesSender(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	peer := &dsnMX{}
	srv := smtp.NewServer(peer)
	srv.Domain = "mx.test"
	srv.AllowInsecureAuth = true
	srv.EnableSMTPUTF8 = true
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Close()
	port := ln.Addr().(*net.TCPAddr).Port

	events := newEventLog()
	r, err := New(Config{
		Hostname: "relay.example.test",
		Observer: events,
		Resolver: mx.ResolverFunc(func(ctx context.Context, domain string) (*mx.Route, error) {
			return &mx.Route{Domain: domain, Key: "mx:" + domain, TLS: mx.TLSNone,
				Hosts: []mx.Host{{Name: "mx." + domain, Port: port, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}}}}, nil
		}),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Shutdown(context.Background())

	// A body with a line that needs dot-stuffing, to check the DSN's
	// returned copy survives the trip.
	body := "From: sender@example.test\r\nTo: unknown@dest.test\r\nSubject: over smtp\r\nMessage-ID: <m1@example.test>\r\n\r\nfirst\r\n.leading dot\r\nlast\r\n"
	env := &queue.Envelope{From: "sender@example.test", Ret: queue.RetFull, EnvID: "E-42",
		To: []queue.Recipient{{Addr: "unknown@dest.test", ORCPT: "rfc822;unknown@dest.test"}, {Addr: "known@dest.test"}}}
	id, err := r.Submit(ctx, env, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	failed := events.wait(ctx, t, "failed", func(e Event) bool { return e.Kind == EventFailed && e.ID == id })
	if failed.Rcpt != "unknown@dest.test" || failed.Reply.Code != 550 || failed.Reply.Enhanced != "5.1.1" {
		t.Errorf("failed event = %+v", failed)
	}
	sent := events.wait(ctx, t, "dsn_sent", func(e Event) bool { return e.Kind == EventDSNSent && e.ID == id })
	events.wait(ctx, t, "DSN delivered", func(e Event) bool { return e.Kind == EventDelivered && e.ID == sent.DSNID })

	var dsn *dsnMXMessage
	for _, m := range peer.received() {
		if m.from == "" {
			dsn = &m
		}
	}
	if dsn == nil || len(dsn.to) != 1 || dsn.to[0] != "sender@example.test" {
		t.Fatalf("no DSN with the null sender to sender@example.test among %d messages (%+v)", len(peer.received()), dsn)
	}
	v := dsnPythonParse(t, dsn.data)
	if len(v.Defects) != 0 || v.ContentType != "multipart/report" || len(v.Parts) != 3 {
		t.Fatalf("DSN as parsed: %+v", v)
	}
	rs := v.Parts[1].Recipients
	if v.Parts[1].PerMessage["Original-Envelope-Id"] != "E-42" || len(rs) != 1 || rs[0]["Status"] != "5.1.1" || rs[0]["Action"] != "failed" ||
		rs[0]["Original-Recipient"] != "rfc822; unknown@dest.test" || !strings.HasPrefix(rs[0]["Diagnostic-Code"], "smtp; 550 5.1.1 No such user here") {
		t.Errorf("delivery-status: %v %v", v.Parts[1].PerMessage, rs)
	}
	if v.Parts[2].Type != "message/rfc822" || v.Parts[2].Subject != "over smtp" || v.Parts[2].Body != "first\r\n.leading dot\r\nlast\r\n" {
		t.Errorf("returned message: %+v", v.Parts[2])
	}
	if !bytes.Contains(dsn.data, []byte("\r\nAuto-Submitted: auto-replied\r\n")) {
		t.Error("no Auto-Submitted header")
	}
}
