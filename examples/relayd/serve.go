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
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/relay"
)

// serve runs the relay until ctx is cancelled (SIGTERM/SIGINT), then
// drains.
func serve(ctx context.Context, cfg *Config, log *slog.Logger, stdout io.Writer, drain time.Duration) error {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return err
	}
	cert, generated, err := loadCertificate(cfg)
	if err != nil {
		return fmt.Errorf("tls certificate: %w", err)
	}
	if generated {
		log.Info("generated a self-signed certificate", "dir", filepath.Join(cfg.DataDir, "tls"))
	}
	tlsConfig := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}

	if err := firstUser(ctx, cfg, stdout); err != nil {
		return err
	}
	st, err := buildStages(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer st.close()

	adm, err := newAdmin(cfg, st, stdout, log)
	if err != nil {
		return err
	}
	if adm != nil {
		// Prometheus scrapes the admin listener with the token as a
		// bearer token, as well as [metrics] listen without one.
		adm.extra = map[string]http.Handler{"GET /metrics": st.metrics.Handler()}
	}
	r, err := relay.New(st.relayConfig)
	if err != nil {
		return err
	}
	stopAdminHTTP, err := adm.start(ctx, r, tlsConfig)
	if err != nil {
		r.Shutdown(context.Background())
		return err
	}
	defer stopAdminHTTP()
	stopAdmin, err := serveQueueAdmin(ctx, st.queue, cfg.DataDir, log)
	if err != nil {
		r.Shutdown(context.Background())
		return fmt.Errorf("queue admin socket: %w", err)
	}
	defer stopAdmin()
	_, stopMetrics, err := serveMetrics(cfg.Metrics, st.metrics.Handler(), log)
	if err != nil {
		r.Shutdown(context.Background())
		return fmt.Errorf("metrics listener: %w", err)
	}
	defer stopMetrics()

	srvCfg := st.serverConfig
	srvCfg.Submitter = r
	srvCfg.TLSConfig = tlsConfig
	srv, err := relay.NewServer(srvCfg)
	if err != nil {
		r.Shutdown(context.Background())
		return err
	}

	var wg sync.WaitGroup
	errc := make(chan error, len(cfg.SMTP.Listen)+len(cfg.SMTP.ListenTLS))
	listen := func(addr string, implicit bool) error {
		// No TCP keep-alive on SMTP connections: the server's own idle
		// timeouts close dead ones, and Go's default keep-alive costs four
		// setsockopt calls per accepted connection.
		lc := net.ListenConfig{KeepAlive: -1}
		l, err := lc.Listen(context.Background(), "tcp", addr)
		if err != nil {
			return err
		}
		mode := "starttls"
		if implicit {
			mode = "implicit"
		}
		log.Info("listening", "addr", l.Addr().String(), "tls", mode)
		wg.Add(1)
		go func() {
			defer wg.Done()
			var err error
			if implicit {
				err = srv.ServeTLS(l)
			} else {
				err = srv.Serve(l)
			}
			if err != nil && !errors.Is(err, net.ErrClosed) && ctx.Err() == nil {
				errc <- fmt.Errorf("listener %s: %w", addr, err)
			}
		}()
		return nil
	}
	var lerr error
	for _, a := range cfg.SMTP.Listen {
		if lerr = listen(a, false); lerr != nil {
			break
		}
	}
	for _, a := range cfg.SMTP.ListenTLS {
		if lerr == nil {
			lerr = listen(a, true)
		}
	}

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	var runErr error = lerr
	for runErr == nil {
		select {
		case <-ctx.Done():
			log.Info("draining", "timeout", drain)
		case err := <-errc:
			runErr = err
		case <-hup:
			st.reload(ctx, log)
			continue
		}
		break
	}
	dctx, cancel := context.WithTimeout(context.Background(), drain)
	defer cancel()
	if err := srv.Shutdown(dctx); err != nil {
		log.Warn("smtp shutdown", "err", err)
	}
	wg.Wait()
	if err := r.Shutdown(dctx); err != nil {
		log.Warn("deliveries abandoned at shutdown; they will be retried", "err", err)
	}
	log.Info("stopped")
	return runErr
}

// firstUser creates the user "admin" with a random password, printed once,
// when there is no users file yet, so a fresh relayd can be used at once.
func firstUser(ctx context.Context, cfg *Config, stdout io.Writer) error {
	if _, err := os.Stat(cfg.Auth.UsersFile); !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	pf, err := auth.OpenPasswordFile(cfg.Auth.UsersFile, nil)
	if err != nil {
		return err
	}
	pass := auth.GeneratePassword()
	if err := pf.SetUser(ctx, auth.User{Name: "admin"}, pass); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "relayd: created user %q with password %s  (shown once; stored as a bcrypt hash in %s)\n", "admin", pass, cfg.Auth.UsersFile)
	return nil
}

func splitHostPort(s string) (string, int, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return s, 25, nil
	}
	p, err := strconv.Atoi(port)
	if err != nil || p <= 0 || p > 65535 {
		return "", 0, fmt.Errorf("bad port in %q", s)
	}
	return host, p, nil
}
