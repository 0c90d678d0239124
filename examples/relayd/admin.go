package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/internal/admin"
	"github.com/batonmail/baton/relay"
)

// AdminConfig configures the admin HTTP listener: the JSON API and the web
// dashboard (see docs/admin-api.md).
type AdminConfig struct {
	// Listen is the host:port of the listener; empty turns it off. Keep it
	// on loopback (or behind a TLS-terminating proxy) unless TLS is set.
	Listen string `toml:"listen"`
	// TLS serves HTTPS with the SMTP listeners' certificate.
	TLS bool `toml:"tls"`
	// Token authenticates every request (at least 16 characters). Empty
	// means the content of TokenFile.
	Token string `toml:"token"`
	// TokenFile holds the token (default DataDir/admin-token). When it
	// does not exist, relayd creates it with a random token at start and
	// prints the token once.
	TokenFile string `toml:"token_file"`
}

// adminServer is the admin listener's state between its two start steps.
type adminServer struct {
	cfg   *Config
	st    *stages
	rec   *admin.Recorder
	token string
	log   *slog.Logger
	// extra are more handlers to serve behind the admin token, by
	// http.ServeMux pattern (such as "GET /metrics"); set before start.
	extra map[string]http.Handler
}

// newAdmin prepares the admin listener when it is configured: it reads
// (or creates) the token and adds the dashboard's Recorder to the relay's
// observers, so it must run before relay.New. It returns nil when the
// listener is off.
func newAdmin(cfg *Config, st *stages, stdout io.Writer, log *slog.Logger) (*adminServer, error) {
	if cfg.Admin.Listen == "" {
		return nil, nil
	}
	tok, err := adminToken(cfg, stdout)
	if err != nil {
		return nil, fmt.Errorf("admin token: %w", err)
	}
	a := &adminServer{cfg: cfg, st: st, token: tok, log: log.With("component", "admin")}
	a.rec = admin.NewRecorder(admin.RecorderConfig{Queue: st.queue})
	st.addObservers(log, a.rec)
	return a, nil
}

// adminToken returns the configured token, or the token file's, creating
// the file with a random token (printed once) when it does not exist.
func adminToken(cfg *Config, stdout io.Writer) (string, error) {
	if tok := strings.TrimSpace(cfg.Admin.Token); tok != "" {
		return tok, nil
	}
	b, err := os.ReadFile(cfg.Admin.TokenFile)
	if err == nil {
		return strings.TrimSpace(string(b)), nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return "", err
	}
	tok := auth.GeneratePassword() + auth.GeneratePassword()
	if err := os.MkdirAll(filepath.Dir(cfg.Admin.TokenFile), 0o700); err != nil {
		return "", err
	}
	f, err := os.OpenFile(cfg.Admin.TokenFile, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", err
	}
	if _, err := f.WriteString(tok + "\n"); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	fmt.Fprintf(stdout, "relayd: created admin token %s  (shown once; kept in %s)\n", tok, cfg.Admin.TokenFile)
	return tok, nil
}

// start listens and serves the admin handler until stop is called; r
// reports deliveries in flight. A nil adminServer does nothing.
func (a *adminServer) start(ctx context.Context, r *relay.Relay, tlsConfig *tls.Config) (stop func(), err error) {
	if a == nil {
		return func() {}, nil
	}
	h, err := admin.New(admin.Config{Queue: a.st.queue, Suppressions: a.st.relayConfig.Suppressions, Token: a.token,
		Recorder: a.rec, Status: r, Logger: a.log, Extra: a.extra})
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", a.cfg.Admin.Listen)
	if err != nil {
		return nil, fmt.Errorf("admin listener: %w", err)
	}
	scheme := "http"
	if a.cfg.Admin.TLS {
		l = tls.NewListener(l, tlsConfig)
		scheme = "https"
	}
	if ip, ok := l.Addr().(*net.TCPAddr); ok && !ip.IP.IsLoopback() && !a.cfg.Admin.TLS {
		a.log.Warn("admin listener is not on loopback and has no TLS; the token crosses the network in clear", "addr", l.Addr().String())
	}
	a.log.Info("admin listening", "url", scheme+"://"+l.Addr().String()+"/")
	rctx, cancel := context.WithCancel(ctx)
	go a.rec.Run(rctx, time.Minute)
	// Requests are small forms and queries, so a whole request gets a
	// minute; responses have no write timeout, as a sandbox message's
	// download may be large.
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: time.Minute,
		BaseContext: func(net.Listener) context.Context { return rctx }}
	stopHTTP := serveHTTP(srv, l, "admin listener", a.log)
	return func() {
		stopHTTP()
		cancel()
	}, nil
}
