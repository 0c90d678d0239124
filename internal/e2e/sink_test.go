package e2e

import (
	"bytes"
	"errors"
	"io"
	"log"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// received is one message as a destination saw it.
type received struct {
	From string
	To   []string
	Body []byte
}

// sink is a destination MX: a real go-smtp server on 127.0.0.1 that
// records what it accepts. rcptReply and dataReply script failures.
type sink struct {
	t    testing.TB
	name string
	srv  *smtp.Server
	addr string
	port int

	mu        sync.Mutex
	msgs      []received
	conns     int
	rcptReply func(to string) *smtp.SMTPError
	dataReply func(n int) *smtp.SMTPError // n counts DATA commands so far, from 1
	datas     int
	// onData, when set, runs at the start of each DATA (without the
	// lock), e.g. to stall or to count concurrent transactions.
	onData func()
}

// startSink starts a sink; each setup function adjusts its server (say,
// its timeouts) before it serves.
func startSink(t testing.TB, name string, setup ...func(*smtp.Server)) *sink {
	t.Helper()
	s := &sink{t: t, name: name}
	s.srv = smtp.NewServer(s)
	s.srv.Domain = name
	s.srv.AllowInsecureAuth = true
	s.srv.ReadTimeout = 10 * time.Second
	s.srv.WriteTimeout = 10 * time.Second
	s.srv.EnableSMTPUTF8 = true
	s.srv.ErrorLog = log.New(io.Discard, "", 0)
	for _, f := range setup {
		f(s.srv)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = l.Addr().String()
	s.port = l.Addr().(*net.TCPAddr).Port
	go s.srv.Serve(l)
	t.Cleanup(func() { s.srv.Close() })
	return s
}

func (s *sink) messages() []received {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]received(nil), s.msgs...)
}

// wait waits until the sink holds n messages or the deadline passes.
func (s *sink) wait(n int, d time.Duration) []received {
	s.t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if m := s.messages(); len(m) >= n {
			return m
		}
		time.Sleep(20 * time.Millisecond)
	}
	m := s.messages()
	s.t.Fatalf("%s: got %d messages, want %d", s.name, len(m), n)
	return nil
}

func (s *sink) NewSession(c *smtp.Conn) (smtp.Session, error) {
	s.mu.Lock()
	s.conns++
	s.mu.Unlock()
	return &sinkSession{s: s}, nil
}

type sinkSession struct {
	s    *sink
	from string
	to   []string
}

func (ss *sinkSession) AuthMechanisms() []string { return nil }
func (ss *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	ss.from = from
	return nil
}
func (ss *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	ss.s.mu.Lock()
	f := ss.s.rcptReply
	ss.s.mu.Unlock()
	if f != nil {
		if err := f(to); err != nil {
			return err
		}
	}
	ss.to = append(ss.to, to)
	return nil
}
func (ss *sinkSession) Data(r io.Reader) error {
	ss.s.mu.Lock()
	hook := ss.s.onData
	ss.s.mu.Unlock()
	if hook != nil {
		hook()
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	ss.s.mu.Lock()
	defer ss.s.mu.Unlock()
	ss.s.datas++
	if ss.s.dataReply != nil {
		if err := ss.s.dataReply(ss.s.datas); err != nil {
			return err
		}
	}
	ss.s.msgs = append(ss.s.msgs, received{From: ss.from, To: append([]string(nil), ss.to...), Body: b})
	return nil
}
func (ss *sinkSession) Reset()        { ss.from, ss.to = "", nil }
func (ss *sinkSession) Logout() error { return nil }

// closedPort returns a loopback port with nothing listening on it.
func closedPort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return p
}

func headerValue(body []byte, name string) string {
	hdr, _, _ := bytes.Cut(body, []byte("\r\n\r\n"))
	for _, line := range strings.Split(string(hdr), "\r\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(k, name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

var errNoMsg = errors.New("no message")
