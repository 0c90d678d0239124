package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/queue"
)

const (
	stHost     = "relay.test"
	stUser     = "alice"
	stPassword = "correct horse"
)

// stServer is a Server on 127.0.0.1 with a plaintext/STARTTLS listener
// and an implicit TLS listener, submitting into a memory queue.
type stServer struct {
	t       *testing.T
	srv     *Server
	q       *queue.Memory
	addr    string // Serve (STARTTLS)
	tlsAddr string // ServeTLS
	ca      *testcert.CA
	serveWG sync.WaitGroup
}

// stIdentities are the accounts of the test Authenticator.
var stIdentities = map[string]*auth.Identity{
	stUser:    {Name: stUser},
	"sandbox": {Name: "sandbox", Sandbox: true},
	"readkey": {Name: "readkey", Scopes: []string{"read"}},
	"sendkey": {Name: "sendkey", Scopes: []string{"read", "send"}},
	"broken":  nil, // the authenticator fails for this one
}

func stAuthenticator() auth.Authenticator {
	return auth.AuthenticatorFunc(func(ctx context.Context, username, password string) (*auth.Identity, error) {
		id, ok := stIdentities[username]
		switch {
		case !ok:
			return nil, auth.ErrInvalidCredentials
		case id == nil:
			return nil, errors.New("backend down: /var/lib/secret path")
		case password != stPassword:
			return nil, auth.ErrInvalidCredentials
		}
		c := *id
		return &c, nil
	})
}

// stLoopbackAllowList allow-lists 127.0.0.1.
func stLoopbackAllowList(t testing.TB) auth.AddrAuthenticator {
	l, err := auth.NewAllowList([]auth.AllowEntry{{Identity: auth.Identity{Name: "loopback"}, Networks: []string{"127.0.0.1/32"}}})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// stMemorySubmitter submits into q.
func stMemorySubmitter(q *queue.Memory) Submitter {
	return SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
		return q.Enqueue(ctx, env, body)
	})
}

// startTestServer starts a server; edit adjusts the config (Submitter,
// Hostname, TLSConfig and Authenticator are preset).
func startTestServer(t *testing.T, edit func(*ServerConfig)) *stServer {
	t.Helper()
	ts := &stServer{t: t, q: queue.NewMemory(queue.MemoryConfig{}), ca: testcert.NewCA()}
	cfg := ServerConfig{
		Hostname:      stHost,
		Submitter:     stMemorySubmitter(ts.q),
		Authenticator: stAuthenticator(),
		TLSConfig:     ts.ca.ServerConfig(stHost),
		Logger:        stLogger(t),
	}
	if edit != nil {
		edit(&cfg)
	}
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ts.srv = srv
	l := stListen(t)
	ts.addr = l.Addr().String()
	ts.serveWG.Add(1)
	go func() { defer ts.serveWG.Done(); srv.Serve(l) }()
	if cfg.TLSConfig != nil {
		lt := stListen(t)
		ts.tlsAddr = lt.Addr().String()
		ts.serveWG.Add(1)
		go func() { defer ts.serveWG.Done(); srv.ServeTLS(lt) }()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		ts.serveWG.Wait()
		ts.q.Close()
	})
	return ts
}

func stListen(t testing.TB) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// messages returns the queued messages with their bodies.
func (ts *stServer) messages() []stMessage {
	ts.t.Helper()
	var out []stMessage
	err := ts.q.List(context.Background(), queue.Filter{}, func(m *queue.Message) error {
		rc, err := ts.q.Open(context.Background(), m.ID)
		if err != nil {
			return err
		}
		defer rc.Close()
		b, err := io.ReadAll(rc)
		out = append(out, stMessage{m, string(b)})
		return err
	})
	if err != nil {
		ts.t.Fatal(err)
	}
	return out
}

type stMessage struct {
	*queue.Message
	Body string
}

func (ts *stServer) clientConfig() *tls.Config { return ts.ca.ClientConfig(stHost) }

// stClient speaks SMTP line by line over a real connection.
type stClient struct {
	t testing.TB
	c net.Conn
	r *bufio.Reader
}

// stDial connects and reads the greeting.
func stDial(t testing.TB, addr string) *stClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// A guard against a hung test, not a timing assertion.
	c.SetDeadline(time.Now().Add(60 * time.Second))
	rc := &stClient{t: t, c: c, r: bufio.NewReader(c)}
	if code, text := rc.reply(); code != 220 {
		t.Fatalf("greeting: %d %s", code, text)
	}
	return rc
}

// stDialNoGreeting connects without reading the greeting.
func stDialNoGreeting(t testing.TB, addr string) *stClient {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	return &stClient{t: t, c: c, r: bufio.NewReader(c)}
}

// stDialTLS connects with implicit TLS.
func stDialTLS(t testing.TB, addr string, cfg *tls.Config) *stClient {
	t.Helper()
	c, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	rc := &stClient{t: t, c: c, r: bufio.NewReader(c)}
	if code, text := rc.reply(); code != 220 {
		t.Fatalf("greeting: %d %s", code, text)
	}
	return rc
}

func (rc *stClient) send(s string) {
	rc.t.Helper()
	if _, err := io.WriteString(rc.c, s); err != nil {
		rc.t.Fatalf("write %q: %v", s, err)
	}
}

// reply reads one reply and returns its code and its lines joined by
// "\n" (without codes). A closed connection gives code 0.
func (rc *stClient) reply() (int, string) {
	rc.t.Helper()
	var lines []string
	for {
		line, err := rc.r.ReadString('\n')
		if err != nil {
			if line == "" {
				return 0, strings.Join(lines, "\n")
			}
			rc.t.Fatalf("partial reply line %q: %v", line, err)
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 4 {
			rc.t.Fatalf("malformed reply line %q", line)
		}
		code, err := strconv.Atoi(line[:3])
		if err != nil {
			rc.t.Fatalf("malformed reply line %q", line)
		}
		lines = append(lines, line[4:])
		if line[3] == ' ' {
			stCheckEnhanced(rc.t, code, line[4:])
			return code, strings.Join(lines, "\n")
		}
		if line[3] != '-' {
			rc.t.Fatalf("malformed reply line %q", line)
		}
	}
}

// stCheckEnhanced fails when text starts with an enhanced status code whose
// class differs from code's.
func stCheckEnhanced(t testing.TB, code int, text string) {
	t.Helper()
	if err := stEnhancedMismatch(code, text); err != nil {
		t.Errorf("%d %s: %v", code, text, err)
	}
}

func stEnhancedMismatch(code int, text string) error {
	f, _, _ := strings.Cut(text, " ")
	parts := strings.Split(f, ".")
	if len(parts) != 3 {
		return nil
	}
	for _, p := range parts {
		if _, err := strconv.Atoi(p); err != nil {
			return nil
		}
	}
	if parts[0] != strconv.Itoa(code/100) {
		return errors.New("enhanced code class differs from the reply code")
	}
	return nil
}

// cmd sends a command line and returns the reply.
func (rc *stClient) cmd(line string) (int, string) {
	rc.t.Helper()
	rc.send(line + "\r\n")
	return rc.reply()
}

// expect sends a command and fails unless the reply has code (and, when
// given, starts with the enhanced code).
func (rc *stClient) expect(line string, code int, enhanced string) string {
	rc.t.Helper()
	got, text := rc.cmd(line)
	if got != code || enhanced != "" && !strings.HasPrefix(text, enhanced+" ") {
		rc.t.Fatalf("%s: got %d %s, want %d %s", line, got, text, code, enhanced)
	}
	return text
}

// startTLS upgrades the connection after STARTTLS was accepted.
func (rc *stClient) startTLS(cfg *tls.Config) {
	rc.t.Helper()
	rc.expect("STARTTLS", 220, "2.0.0")
	tc := tls.Client(rc.c, cfg)
	if err := tc.Handshake(); err != nil {
		rc.t.Fatal(err)
	}
	rc.c = tc
	rc.r = bufio.NewReader(tc)
}

// closed reports whether the server closed the connection (reading
// returns EOF or a reset), after reading any replies left.
func (rc *stClient) waitClosed() []string {
	rc.t.Helper()
	var got []string
	for {
		line, err := rc.r.ReadString('\n')
		if line != "" {
			got = append(got, strings.TrimRight(line, "\r\n"))
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				rc.t.Fatalf("connection still open; read %q", got)
			}
			return got
		}
	}
}

// stLogger logs to the test's log.
// It stops logging when the test ends, as the server's goroutines may
// outlive it by a moment.
func stLogger(t testing.TB) *slog.Logger {
	w := &stLogWriter{t: t}
	t.Cleanup(func() { w.mu.Lock(); w.done = true; w.mu.Unlock() })
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type stLogWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *stLogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}
