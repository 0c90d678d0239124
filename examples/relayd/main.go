// Command relayd is baton's reference relay daemon.
//
// Run without arguments it listens on loopback (STARTTLS on
// 127.0.0.1:2525, implicit TLS on 127.0.0.1:2465), keeps its queue and
// state in ./relayd-data, generates a self-signed certificate, and on
// first start creates a user whose password it prints once. Mail is
// delivered by MX lookup unless routes say otherwise.
//
// Subcommands administer a data directory, also while relayd runs:
//
//	relayd [flags]                 run the relay
//	relayd queue list|show|hold|release|delete|retry|stats ...
//	relayd user add|remove|list ...
//	relayd apikey create|revoke|list ...
//	relayd dkim keygen|check ...
//	relayd suppress list|add|remove ...
//
// SIGTERM or SIGINT drains: listeners close, transactions in progress
// finish, deliveries in progress finish (up to -drain), then relayd exits.
// SIGHUP reloads the users and API key files.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"
)

type command struct {
	run   func(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error
	brief string
}

var commands = map[string]command{
	"queue":    {runQueueCmd, "inspect and manage the queue"},
	"user":     {runUserCmd, "add, remove and list users"},
	"apikey":   {runAPIKeyCmd, "create, revoke and list API keys"},
	"dkim":     {runDKIMCmd, "generate DKIM keys and check a sender domain's DNS"},
	"suppress": {runSuppressCmd, "list and edit the suppression list"},
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// Subcommands take -config before their own arguments:
	// relayd [-config FILE] queue list.
	fs := flag.NewFlagSet("relayd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath = fs.String("config", "", "configuration file (TOML); defaults apply without one")
		dataDir    = fs.String("data", "", "data directory (queue, users, keys); default ./relayd-data")
		listen     = fs.String("listen", "", "comma-separated STARTTLS listen addresses (default 127.0.0.1:2525)")
		listenTLS  = fs.String("listen-tls", "", "comma-separated implicit-TLS listen addresses (default 127.0.0.1:2465)")
		hostname   = fs.String("hostname", "", "host name for the greeting, EHLO and Received headers")
		smarthost  = fs.String("smarthost", "", "deliver everything to host:port instead of MX lookup")
		dnsServers = fs.String("dns", "", "comma-separated DNS servers host:port (default /etc/resolv.conf)")
		logLevel   = fs.String("log-level", "", "debug, info, warn or error")
		drain      = fs.Duration("drain", 30*time.Second, "how long SIGTERM waits for deliveries in progress")
		cpuProfile = fs.String("cpuprofile", "", "write a CPU profile to this file until relayd stops (for benchmarks)")
	)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: relayd [flags] [subcommand args...]\n\nbaton's reference SMTP relay daemon.\n\nSubcommands:\n")
		for _, name := range []string{"queue", "user", "apikey", "dkim", "suppress"} {
			fmt.Fprintf(stderr, "  %-9s %s\n", name, commands[name].brief)
		}
		fmt.Fprintf(stderr, "\nFlags (override the configuration file):\n")
		fs.PrintDefaults()
		fmt.Fprintf(stderr, "\nConfiguration file: see examples/relayd/relayd.toml for every setting.\n")
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		fmt.Fprintln(stderr, "relayd:", err)
		return 1
	}
	if *dataDir != "" {
		cfg.DataDir = *dataDir
		cfg.Auth.UsersFile, cfg.Auth.APIKeysFile = "", ""
		cfg.fill()
	}
	if *listen != "" {
		cfg.SMTP.Listen = splitList(*listen)
	}
	if *listenTLS != "" {
		cfg.SMTP.ListenTLS = splitList(*listenTLS)
	}
	if *hostname != "" {
		cfg.Hostname = *hostname
	}
	if *smarthost != "" {
		host, port, err := splitHostPort(*smarthost)
		if err != nil {
			fmt.Fprintln(stderr, "relayd: -smarthost:", err)
			return 2
		}
		cfg.Routes = append([]RouteConfig{{Domain: "*", Host: host, Port: port}}, cfg.Routes...)
	}
	if *dnsServers != "" {
		cfg.DNS.Servers = splitList(*dnsServers)
	}
	if *logLevel != "" {
		cfg.Log.Level = *logLevel
	}

	if rest := fs.Args(); len(rest) > 0 {
		c, ok := commands[rest[0]]
		if !ok {
			fmt.Fprintf(stderr, "relayd: unknown subcommand %q (relayd -h lists them)\n", rest[0])
			return 2
		}
		if err := c.run(ctx, cfg, rest[1:], stdout, stderr); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			fmt.Fprintf(stderr, "relayd %s: %v\n", rest[0], err)
			return 1
		}
		return 0
	}

	lw := newLogWriter(stderr, 200*time.Millisecond)
	defer lw.Close()
	logger, err := newLogger(cfg.Log, lw)
	if err != nil {
		fmt.Fprintln(stderr, "relayd:", err)
		return 2
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(stderr, "relayd:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(stderr, "relayd:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	if err := serve(ctx, cfg, logger, stdout, *drain); err != nil {
		logger.Error("relayd stopped", "err", err)
		return 1
	}
	return 0
}

func newLogger(c LogConfig, w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(strings.ToUpper(c.Level))); err != nil && c.Level != "" {
		return nil, fmt.Errorf("log level %q: %w", c.Level, err)
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}
