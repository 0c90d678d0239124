package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// suppressionDir is where relayd keeps its suppression list.
func suppressionDir(cfg *Config) string { return filepath.Join(cfg.DataDir, "suppressions") }

// SuppressConfig configures the suppression list: recipients that failed
// permanently as unknown are not attempted again until their entry
// expires (see relay.ShouldSuppress). It is meant as the [suppress]
// section of the configuration file.
type SuppressConfig struct {
	// Disabled turns the suppression list off: every recipient is
	// attempted, however often it failed before.
	Disabled bool `toml:"disabled"`
	// TTL is how long an address stays suppressed, as a Go duration
	// (default 720h, 30 days).
	TTL string `toml:"ttl"`
}

// openSuppressions opens relayd's suppression list for the relay
// (relay.Config.Suppressions); it returns nil when sc disables it.
func openSuppressions(cfg *Config, sc SuppressConfig) (relay.Suppressions, error) {
	if sc.Disabled {
		return nil, nil
	}
	ttl, err := parseDuration("suppress.ttl", sc.TTL, relay.DefaultSuppressionTTL)
	if err != nil {
		return nil, err
	}
	s, err := relay.OpenSuppressionDir(suppressionDir(cfg), relay.SuppressionConfig{TTL: ttl})
	if err != nil {
		return nil, err
	}
	return s, nil
}

const suppressUsage = `usage: relayd suppress list [-json]
       relayd suppress add [-ttl DURATION] [-reason TEXT] ADDR...
       relayd suppress remove ADDR...
       relayd suppress prune

Manages the list of recipient addresses that failed permanently as unknown
and are not attempted again until their entry expires. The list lives in
DATA_DIR/suppressions and may be changed while relayd runs.
`

// runSuppressCmd implements "relayd suppress".
func runSuppressCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, suppressUsage)
		return errors.New("suppress: missing action")
	}
	action, args := args[0], args[1:]
	fset := flag.NewFlagSet("suppress "+action, flag.ContinueOnError)
	fset.SetOutput(stderr)
	fset.Usage = func() { fmt.Fprint(stderr, suppressUsage) }
	asJSON := fset.Bool("json", false, "list: print one JSON object per line")
	ttl := fset.Duration("ttl", relay.DefaultSuppressionTTL, "add: how long the entry lasts")
	reason := fset.String("reason", "added by operator", "add: text recorded as the reason")
	if err := fset.Parse(args); err != nil {
		return err
	}
	store, err := relay.OpenSuppressionDir(suppressionDir(cfg), relay.SuppressionConfig{TTL: *ttl})
	if err != nil {
		return err
	}
	switch action {
	case "list":
		n := 0
		enc := json.NewEncoder(stdout)
		err := store.List(ctx, func(s relay.Suppression) error {
			n++
			if *asJSON {
				return enc.Encode(s)
			}
			_, err := fmt.Fprintf(stdout, "%s\t%s\t%s\t%s\n", s.Addr,
				s.Created.UTC().Format(time.RFC3339), s.Expires.UTC().Format(time.RFC3339), s.Reply.String())
			return err
		})
		if err == nil && !*asJSON {
			fmt.Fprintf(stderr, "%d suppressed address(es)\n", n)
		}
		return err
	case "add", "remove":
		if fset.NArg() == 0 {
			fset.Usage()
			return fmt.Errorf("suppress %s: no address given", action)
		}
		for _, a := range fset.Args() {
			if action == "add" {
				err = store.Add(ctx, relay.Suppression{Addr: a, Reply: queue.Reply{Code: 550, Enhanced: "5.1.1", Text: *reason}})
			} else {
				err = store.Remove(ctx, a)
			}
			if err != nil {
				return fmt.Errorf("suppress %s %s: %w", action, a, err)
			}
			done := "added"
			if action == "remove" {
				done = "removed"
			}
			fmt.Fprintf(stdout, "%s %s\n", done, a)
		}
		return nil
	case "prune":
		n, err := store.Prune(ctx)
		if err == nil {
			fmt.Fprintf(stdout, "pruned %d expired entries\n", n)
		}
		return err
	}
	fset.Usage()
	return fmt.Errorf("suppress: unknown action %q", action)
}
