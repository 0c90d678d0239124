package main

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"

	"github.com/batonmail/baton/internal/queueadmin"
	"github.com/batonmail/baton/queue"
)

// queueDir is where relayd keeps its file-backed queue.
func queueDir(cfg *Config) string { return filepath.Join(cfg.DataDir, "queue") }

// queueSchedule builds the retry schedule from the [queue] section.
func queueSchedule(c QueueConfig) (queue.Schedule, error) {
	var s queue.Schedule
	var err error
	if s.Min, err = parseDuration("queue.retry_min", c.RetryMin, 0); err != nil {
		return s, err
	}
	if s.Max, err = parseDuration("queue.retry_max", c.RetryMax, 0); err != nil {
		return s, err
	}
	if s.MaxAge, err = parseDuration("queue.max_age", c.MaxAge, 0); err != nil {
		return s, err
	}
	return s.WithDefaults(), nil
}

// serveQueueAdmin serves q's Admin operations on dataDir/admin.sock (mode
// 0600) for "relayd queue" until stop is called or ctx is done.
func serveQueueAdmin(ctx context.Context, q queue.Queue, dataDir string, log *slog.Logger) (stop func(), err error) {
	return queueadmin.Serve(ctx, q, queueadmin.SocketPath(dataDir), log)
}

// runQueueCmd implements "relayd queue ...": through the admin socket of a
// running relayd, or on the queue directory directly when none runs.
func runQueueCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	s, err := queueSchedule(cfg.Queue)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	cc := queueadmin.CommandConfig{
		Socket:   queueadmin.SocketPath(cfg.DataDir),
		QueueDir: queueDir(cfg),
		Schedule: s,
		Logger:   log,
	}
	if cfg.Queue.Backend == "nats" {
		// Shared queue: any node's view is the queue itself. No Node
		// name, so opening it frees nobody's leases.
		cc.Open = func(ctx context.Context) (queue.Queue, error) { return openNATSQueue(ctx, cfg, s, "", log) }
	}
	return queueadmin.Run(ctx, cc, args, stdout, stderr)
}
