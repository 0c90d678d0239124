package relay

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/queue"
)

// This file holds the scripted destinations the SMTPDeliverer tests talk
// to: go-smtp servers on 127.0.0.1 whose session methods return what a
// test scripts and record what arrived, plus raw listeners for peers that
// misbehave below the SMTP level.

// sdMsg is one transaction as a peer saw it.
type sdMsg struct {
	From     string
	MailOpts smtp.MailOptions
	To       []string
	RcptOpts []smtp.RcptOptions
	Body     []byte
	TLS      bool
	Resumed  bool // the TLS session was resumed
	AuthUser string
}

// sdScript scripts a peer's replies; nil functions accept.
type sdScript struct {
	Mail func(from string, o *smtp.MailOptions) error
	Rcpt func(to string, o *smtp.RcptOptions) error
	// Data runs after the body was read (or, with DataRaw, instead of
	// reading it).
	Data    func(m *sdMsg) error
	DataRaw func(r io.Reader) error
}

// sdPeerConfig configures a peer.
type sdPeerConfig struct {
	Script     sdScript
	TLS        *tls.Config // enables STARTTLS
	SMTPUTF8   bool
	REQUIRETLS bool
	DSN        bool
	// Users enables AUTH PLAIN with these user → password pairs.
	Users map[string]string
	// InsecureAuth allows AUTH without TLS.
	InsecureAuth    bool
	MaxLineLength   int
	MaxMessageBytes int64
	// Discard drops messages instead of recording them (benchmarks).
	Discard bool
}

// sdPeer is a scripted go-smtp destination.
type sdPeer struct {
	cfg  sdPeerConfig
	srv  *smtp.Server
	Addr netip.AddrPort

	mu       sync.Mutex
	conns    int // TCP connections accepted
	open     int // open now
	maxOpen  int // most open at once
	sessions int
	msgs     []*sdMsg
	live     map[net.Conn]bool
	changed  chan struct{}
}

func newSDPeer(t testing.TB, cfg sdPeerConfig) *sdPeer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &sdPeer{cfg: cfg, live: make(map[net.Conn]bool), changed: make(chan struct{})}
	p.Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	p.srv = smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		p.mu.Lock()
		p.sessions++
		p.mu.Unlock()
		return &sdSession{p: p, c: c}, nil
	}))
	p.srv.Domain = "peer.example.test"
	p.srv.TLSConfig = cfg.TLS
	p.srv.EnableSMTPUTF8 = cfg.SMTPUTF8
	p.srv.EnableREQUIRETLS = cfg.REQUIRETLS
	p.srv.EnableDSN = cfg.DSN
	p.srv.AllowInsecureAuth = cfg.InsecureAuth
	p.srv.MaxLineLength = cfg.MaxLineLength
	p.srv.MaxMessageBytes = cfg.MaxMessageBytes
	p.srv.ErrorLog = sdNopLogger{}
	go p.srv.Serve(&sdCountListener{Listener: ln, p: p})
	t.Cleanup(func() { p.srv.Close() })
	return p
}

type sdNopLogger struct{}

func (sdNopLogger) Printf(string, ...interface{}) {}
func (sdNopLogger) Println(...interface{})        {}

// host returns an mx.Host for the peer under name.
func (p *sdPeer) host(name string) mx.Host {
	return mx.Host{Name: name, Port: int(p.Addr.Port()), Addrs: []netip.Addr{p.Addr.Addr()}}
}

// stats returns connections accepted, most open at once, and sessions.
func (p *sdPeer) stats() (conns, maxOpen, sessions int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.conns, p.maxOpen, p.sessions
}

// messages returns the transactions received so far.
func (p *sdPeer) messages() []*sdMsg {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]*sdMsg(nil), p.msgs...)
}

// openConns returns the connections open now.
func (p *sdPeer) openConns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.open
}

// waitOpen waits until at most n connections are open (or fails).
func (p *sdPeer) waitOpen(t testing.TB, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		p.mu.Lock()
		open, ch := p.open, p.changed
		p.mu.Unlock()
		if open <= n {
			return
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatalf("peer still has %d open connections, want <= %d", open, n)
		}
	}
}

// dropAll closes every server-side connection (a destination that
// restarted, or a NAT that forgot the flow).
func (p *sdPeer) dropAll() {
	p.mu.Lock()
	var live []net.Conn
	for c := range p.live {
		live = append(live, c)
	}
	p.mu.Unlock()
	for _, c := range live {
		c.Close()
	}
}

type sdCountListener struct {
	net.Listener
	p *sdPeer
}

func (l *sdCountListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	p := l.p
	p.mu.Lock()
	p.conns++
	p.open++
	p.maxOpen = max(p.maxOpen, p.open)
	cc := &sdCountConn{Conn: c, p: p}
	p.live[cc] = true
	p.mu.Unlock()
	return cc, nil
}

type sdCountConn struct {
	net.Conn
	p    *sdPeer
	once sync.Once
}

func (c *sdCountConn) Close() error {
	c.once.Do(func() {
		p := c.p
		p.mu.Lock()
		p.open--
		delete(p.live, c)
		close(p.changed)
		p.changed = make(chan struct{})
		p.mu.Unlock()
	})
	return c.Conn.Close()
}

type sdSession struct {
	p        *sdPeer
	c        *smtp.Conn
	cur      *sdMsg
	authUser string
}

func (s *sdSession) AuthMechanisms() []string {
	if s.p.cfg.Users == nil {
		return nil
	}
	return []string{sasl.Plain}
}

func (s *sdSession) Auth(mech string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(identity, user, pass string) error {
		if want, ok := s.p.cfg.Users[user]; ok && want == pass {
			s.authUser = user
			return nil
		}
		return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "bad credentials"}
	}), nil
}

func (s *sdSession) Mail(from string, o *smtp.MailOptions) error {
	if f := s.p.cfg.Script.Mail; f != nil {
		if err := f(from, o); err != nil {
			return err
		}
	}
	cs, isTLS := s.c.TLSConnectionState()
	s.cur = &sdMsg{From: from, TLS: isTLS, Resumed: cs.DidResume, AuthUser: s.authUser}
	if o != nil {
		s.cur.MailOpts = *o
	}
	return nil
}

func (s *sdSession) Rcpt(to string, o *smtp.RcptOptions) error {
	if f := s.p.cfg.Script.Rcpt; f != nil {
		if err := f(to, o); err != nil {
			return err
		}
	}
	s.cur.To = append(s.cur.To, to)
	var ro smtp.RcptOptions
	if o != nil {
		ro = *o
	}
	s.cur.RcptOpts = append(s.cur.RcptOpts, ro)
	return nil
}

func (s *sdSession) Data(r io.Reader) error {
	m := s.cur
	if f := s.p.cfg.Script.DataRaw; f != nil {
		return f(r)
	}
	if s.p.cfg.Discard {
		_, err := io.Copy(io.Discard, r)
		return err
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	m.Body = b
	if f := s.p.cfg.Script.Data; f != nil {
		if err := f(m); err != nil {
			return err
		}
	}
	s.p.mu.Lock()
	s.p.msgs = append(s.p.msgs, m)
	s.p.mu.Unlock()
	return nil
}

func (s *sdSession) Reset()        { s.cur = nil }
func (s *sdSession) Logout() error { return nil }

// sdRawPeer is a TCP listener on 127.0.0.1 that runs fn on every
// connection, for peers that misbehave below SMTP (stall, close, odd
// greetings).
func sdRawPeer(t testing.TB, fn func(c net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				fn(c)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// sdClosedPort returns an address on 127.0.0.1 where nothing listens.
func sdClosedPort(t testing.TB) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return a
}

func sdHostAt(name string, a netip.AddrPort) mx.Host {
	return mx.Host{Name: name, Port: int(a.Port()), Addrs: []netip.Addr{a.Addr()}}
}

// sdPKI is a throw-away certificate authority with one server certificate.
type sdPKI struct {
	Roots  *x509.CertPool
	Server *tls.Config
}

// newSDPKI makes a CA and a certificate for names, valid now.
func newSDPKI(t testing.TB, names ...string) *sdPKI {
	t.Helper()
	ca := testcert.NewCA()
	return &sdPKI{Roots: ca.Pool, Server: ca.ServerConfig(names...)}
}

// sdDelivery builds a delivery of body to rcpts over route.
func sdDelivery(route *mx.Route, env *queue.Envelope, body []byte) *Delivery {
	return &Delivery{
		ID:       "test",
		Envelope: env,
		Rcpts:    env.To,
		Route:    route,
		Size:     int64(len(body)),
		Open: func(context.Context) (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(body)), nil
		},
	}
}

// sdEnv is an envelope from sender@example.test to rcpts.
func sdEnv(rcpts ...string) *queue.Envelope {
	env := &queue.Envelope{From: "sender@example.test"}
	for _, r := range rcpts {
		env.To = append(env.To, queue.Recipient{Addr: r})
	}
	return env
}

// sdRoute is a route over hosts with TLS mode m.
func sdRoute(key string, m mx.TLSMode, hosts ...mx.Host) *mx.Route {
	return &mx.Route{Domain: "example.test", Key: key, Hosts: hosts, TLS: m}
}

var errSDStall = errors.New("stalled peer released")

// sdRawSMTPConfig scripts sdRawSMTP.
type sdRawSMTPConfig struct {
	// Ext lists the EHLO keywords; STARTTLS is refused with 454.
	Ext []string
	// OnConnect runs for every connection.
	OnConnect func()
	// OnCommand sees every command line, without CRLF.
	OnCommand func(line string)
	// Drop, when it returns true for a command (upper case, trimmed),
	// closes the connection instead of replying; prev is the command
	// before it on the same connection.
	Drop func(prev, cmd string) bool
	// Override, when it returns a non-empty reply for a command, sends
	// that reply line instead of the usual one; "stall" stops answering
	// (until the client closes the connection).
	Override func(prev, cmd string) string
	// AfterData runs after the reply to the final dot; returning false
	// closes the connection.
	AfterData func(c net.Conn) bool
}

// sdRawSMTP is a minimal hand-written SMTP server for behaviour go-smtp's
// server cannot script (refusing STARTTLS, unsolicited replies).
func sdRawSMTP(t testing.TB, cfg sdRawSMTPConfig) netip.AddrPort {
	return sdRawPeer(t, func(c net.Conn) {
		if cfg.OnConnect != nil {
			cfg.OnConnect()
		}
		br := bufio.NewReader(c)
		w := func(s string) { fmt.Fprintf(c, "%s\r\n", s) }
		w("220 raw.example.test ESMTP")
		prev := ""
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if cfg.OnCommand != nil {
				cfg.OnCommand(strings.TrimRight(line, "\r\n"))
			}
			cmd := strings.ToUpper(strings.TrimSpace(line))
			if cfg.Drop != nil && cfg.Drop(prev, cmd) {
				return
			}
			if cfg.Override != nil {
				if r := cfg.Override(prev, cmd); r == "stall" {
					io.Copy(io.Discard, br)
					return
				} else if r != "" {
					prev = cmd
					w(r)
					continue
				}
			}
			prev = cmd
			switch {
			case strings.HasPrefix(cmd, "EHLO"):
				lines := append([]string{"raw.example.test"}, cfg.Ext...)
				for i, l := range lines {
					sep := "-"
					if i == len(lines)-1 {
						sep = " "
					}
					w("250" + sep + l)
				}
			case cmd == "STARTTLS":
				w("454 4.7.0 TLS not available")
			case strings.HasPrefix(cmd, "MAIL"), strings.HasPrefix(cmd, "RCPT"), cmd == "RSET", cmd == "NOOP":
				w("250 2.0.0 ok")
			case cmd == "DATA":
				w("354 go ahead")
				for {
					l, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
				}
				w("250 2.0.0 queued as 42")
				if cfg.AfterData != nil && !cfg.AfterData(c) {
					return
				}
			case cmd == "QUIT":
				w("221 2.0.0 bye")
				return
			default:
				w("500 5.5.1 what")
			}
		}
	})
}
