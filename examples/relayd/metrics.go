package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/batonmail/baton/internal/prommetrics"
	"github.com/batonmail/baton/queue"
)

// MetricsConfig configures the Prometheus endpoint. relayd always keeps
// its metrics; this only says where they are served.
type MetricsConfig struct {
	// Listen is the address of a plain HTTP listener that serves GET
	// /metrics in the Prometheus text format, such as "127.0.0.1:9465";
	// empty (the default) serves none. The endpoint has no
	// authentication: keep it on loopback or a private network.
	Listen string `toml:"listen"`
}

// newMetrics makes relayd's Prometheus metrics; the queue gauges read q.
func newMetrics(q queue.Queue, log *slog.Logger) *prommetrics.Metrics {
	return prommetrics.New(prommetrics.Config{Queue: q, Logger: log})
}

// serveMetrics starts the /metrics listener when cfg names one, serving
// h. It returns the listener's address (nil when there is none) and a
// function that stops it.
func serveMetrics(cfg MetricsConfig, h http.Handler, log *slog.Logger) (addr net.Addr, stop func(), err error) {
	if cfg.Listen == "" {
		return nil, func() {}, nil
	}
	l, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", h)
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      time.Minute,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	log.Info("metrics listening", "addr", l.Addr().String())
	return l.Addr(), serveHTTP(srv, l, "metrics listener", log), nil
}

// serveHTTP serves srv on l in the background and returns the function
// that shuts it down (giving requests in progress 5 s) and waits for it.
func serveHTTP(srv *http.Server, l net.Listener, what string, log *slog.Logger) (stop func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error(what+" stopped", "err", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
		<-done
	}
}
