package queueadmin

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/batonmail/baton/queue"
)

// CommandConfig tells Run where the queue lives.
type CommandConfig struct {
	// Socket is the admin socket of a running relayd.
	Socket string
	// QueueDir is the queue directory, opened directly (under its lock)
	// when no relayd answers on Socket.
	QueueDir string
	// Schedule is used when the directory is opened directly.
	Schedule queue.Schedule
	// Logger receives the queue's recovery reports when the directory is
	// opened directly; nil discards them.
	Logger *slog.Logger
	// Now is the clock for -older; nil means time.Now.
	Now func() time.Time
	// Open, when set, opens the queue directly instead of QueueDir (for
	// backends other than the directory, such as NATS JetStream).
	Open func(ctx context.Context) (queue.Queue, error)
}

// Connect returns the admin interface of a running relayd, or else the
// queue directory opened directly. The returned close function releases
// it (and the directory lock).
func Connect(ctx context.Context, cfg CommandConfig) (a queue.Admin, closeFn func() error, err error) {
	if cfg.Socket != "" {
		c, err := Dial(ctx, cfg.Socket)
		if err == nil {
			return c, c.Close, nil
		}
		if !errors.Is(err, ErrNoServer) {
			return nil, nil, err
		}
	}
	if cfg.Open != nil {
		q, err := cfg.Open(ctx)
		if err != nil {
			return nil, nil, err
		}
		return q, q.Close, nil
	}
	if cfg.QueueDir == "" {
		return nil, nil, errors.New("no relayd answers on the admin socket and no queue directory is configured")
	}
	if _, err := os.Stat(cfg.QueueDir); err != nil {
		// Do not create a queue where the operator pointed by mistake.
		return nil, nil, fmt.Errorf("no relayd answers on %s and there is no queue at %s: %w", cfg.Socket, cfg.QueueDir, err)
	}
	d, err := queue.OpenDir(queue.DirConfig{Path: cfg.QueueDir, Schedule: cfg.Schedule, Logger: cfg.Logger})
	if err != nil {
		if errors.Is(err, queue.ErrLocked) {
			return nil, nil, fmt.Errorf("the queue %s is locked by a running relayd, but its admin socket %s does not answer: %w", cfg.QueueDir, cfg.Socket, err)
		}
		return nil, nil, err
	}
	return d, d.Close, nil
}

const usage = `Usage: relayd queue <command> [flags] [args]

Commands:
  list [-domain D] [-sender S|-null] [-state S] [-older DURATION] [-json]
                             list queued messages (state: queued, deferred, leased, held)
  show [-json] ID...         show messages with per-recipient history
  hold ID...                 put messages on hold (never delivered until released)
  release ID...              take messages off hold and make them due now
  delete ID...               remove messages without delivering or bouncing them
  retry ID... | -domain D | -all
                             make pending recipients due now
  stats [-json]              count messages by state and recipients by domain
  quarantine [-json]         list damaged files moved aside

The commands talk to a running relayd through its admin socket, or open
the queue directory directly when relayd is not running.
`

// Run executes one "relayd queue" subcommand.
func Run(ctx context.Context, cfg CommandConfig, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return errors.New("missing command")
		}
		return flag.ErrHelp
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	cmd, rest := args[0], args[1:]
	fs := flag.NewFlagSet("queue "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage) }
	var (
		domain, sender, state string
		null, asJSON, all     bool
		older                 time.Duration
	)
	switch cmd {
	case "list":
		fs.StringVar(&domain, "domain", "", "only messages with a pending recipient at this domain")
		fs.StringVar(&sender, "sender", "", "only messages from this envelope sender")
		fs.BoolVar(&null, "null", false, "only messages with the null sender (bounces)")
		fs.StringVar(&state, "state", "", "only messages in this state")
		fs.DurationVar(&older, "older", 0, "only messages received longer ago than this")
		fs.BoolVar(&asJSON, "json", false, "one JSON object per line")
	case "show", "stats", "quarantine":
		fs.BoolVar(&asJSON, "json", false, "JSON output")
	case "retry":
		fs.StringVar(&domain, "domain", "", "retry the recipients at this domain")
		fs.BoolVar(&all, "all", false, "retry every message")
	case "hold", "release", "delete":
	default:
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("unknown command %q", cmd)
	}
	if err := fs.Parse(rest); err != nil {
		return err
	}
	ids := fs.Args()
	needIDs := map[string]bool{"show": true, "hold": true, "release": true, "delete": true}
	if needIDs[cmd] && len(ids) == 0 {
		return fmt.Errorf("%s needs at least one message ID", cmd)
	}
	if cmd == "retry" {
		n := 0
		if len(ids) > 0 {
			n++
		}
		if domain != "" {
			n++
		}
		if all {
			n++
		}
		if n != 1 {
			return errors.New("retry needs exactly one of: message IDs, -domain D, -all")
		}
	}
	var f queue.Filter
	if cmd == "list" {
		f = queue.Filter{Domain: domain, Sender: sender, Null: null}
		if state != "" {
			st, ok := queue.ParseState(state)
			if !ok {
				return fmt.Errorf("unknown state %q (queued, deferred, leased, held)", state)
			}
			f.State = st
		}
		if older > 0 {
			f.ReceivedBefore = cfg.Now().Add(-older)
		}
	}

	a, closeFn, err := Connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer closeFn()

	switch cmd {
	case "list":
		return list(ctx, a, f, asJSON, stdout)
	case "show":
		for _, id := range ids {
			m, err := a.Get(ctx, queue.ID(id))
			if err != nil {
				return err
			}
			if asJSON {
				if err := json.NewEncoder(stdout).Encode(m); err != nil {
					return err
				}
				continue
			}
			show(stdout, m)
		}
		return nil
	case "hold", "release", "delete":
		op := map[string]func(context.Context, queue.ID) error{"hold": a.Hold, "release": a.Release, "delete": a.Delete}[cmd]
		var errs []error
		for _, id := range ids {
			if err := op(ctx, queue.ID(id)); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", id, err))
				continue
			}
			fmt.Fprintf(stdout, "%s: %s\n", id, map[string]string{"hold": "held", "release": "released", "delete": "deleted"}[cmd])
		}
		return errors.Join(errs...)
	case "retry":
		total := 0
		if len(ids) > 0 {
			for _, id := range ids {
				n, err := a.Retry(ctx, queue.Filter{ID: queue.ID(id)})
				if err != nil {
					return err
				}
				if n == 0 {
					fmt.Fprintf(stderr, "%s: not found or held\n", id)
				}
				total += n
			}
		} else {
			n, err := a.Retry(ctx, queue.Filter{Domain: domain})
			if err != nil {
				return err
			}
			total = n
		}
		fmt.Fprintf(stdout, "%d message(s) due now\n", total)
		return nil
	case "stats":
		s, err := a.Stats(ctx)
		if err != nil {
			return err
		}
		if asJSON {
			return json.NewEncoder(stdout).Encode(s)
		}
		printStats(stdout, s)
		return nil
	case "quarantine":
		qa, ok := a.(Quarantiner)
		if !ok {
			return errors.New("this queue backend does not quarantine files")
		}
		files, err := qa.Quarantined(ctx)
		if err != nil {
			return err
		}
		if asJSON {
			return json.NewEncoder(stdout).Encode(files)
		}
		for _, q := range files {
			fmt.Fprintf(stdout, "%s\t%d bytes\t%s\t%s\n", q.Name, q.Size, q.Moved.UTC().Format(time.RFC3339), q.Path)
		}
		fmt.Fprintf(stdout, "%d quarantined file(s)\n", len(files))
		return nil
	}
	return nil
}

func list(ctx context.Context, a queue.Admin, f queue.Filter, asJSON bool, w io.Writer) error {
	enc := json.NewEncoder(w)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if !asJSON {
		fmt.Fprintln(tw, "ID\tSTATE\tSIZE\tRECEIVED\tSENDER\tPENDING")
	}
	n := 0
	err := a.List(ctx, f, func(m *queue.Message) error {
		n++
		if asJSON {
			return enc.Encode(m)
		}
		var pending []string
		for _, r := range m.Recipients {
			if r.State == queue.RcptPending {
				pending = append(pending, r.Addr)
			}
		}
		from := m.Envelope.From
		if from == "" {
			from = "<>"
		}
		_, err := fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", m.ID, m.State, m.Size, m.Received.UTC().Format(time.RFC3339), from, strings.Join(pending, ","))
		return err
	})
	if !asJSON {
		tw.Flush()
		fmt.Fprintf(w, "%d message(s)\n", n)
	}
	return err
}

func show(w io.Writer, m *queue.Message) {
	from := m.Envelope.From
	if from == "" {
		from = "<>"
	}
	fmt.Fprintf(w, "ID:        %s\nState:     %s\nSender:    %s\nReceived:  %s\nExpires:   %s\nSize:      %d\n",
		m.ID, m.State, from, m.Received.UTC().Format(time.RFC3339), m.Expires.UTC().Format(time.RFC3339), m.Size)
	if m.Envelope.Identity != "" {
		fmt.Fprintf(w, "Identity:  %s\n", m.Envelope.Identity)
	}
	for _, r := range m.Recipients {
		fmt.Fprintf(w, "  %s: %s, %d attempt(s)", r.Addr, r.State, r.Attempts)
		if r.State == queue.RcptPending {
			fmt.Fprintf(w, ", next %s", r.NextAttempt.UTC().Format(time.RFC3339))
		}
		if r.Expired {
			fmt.Fprint(w, ", expired")
		}
		fmt.Fprintln(w)
		for _, h := range r.History {
			fmt.Fprintf(w, "    %s %s: %s\n", h.At.UTC().Format(time.RFC3339), h.Result, h.Reply)
		}
	}
	fmt.Fprintln(w)
}

func printStats(w io.Writer, s *queue.Stats) {
	total := 0
	for _, n := range s.ByState {
		total += n
	}
	fmt.Fprintf(w, "messages: %d\n", total)
	for _, st := range queue.States() {
		fmt.Fprintf(w, "  %-9s %d\n", st.String()+":", s.ByState[st])
	}
	if s.Quarantined > 0 {
		fmt.Fprintf(w, "quarantined files: %d\n", s.Quarantined)
	}
	domains := make([]string, 0, len(s.ByDomain))
	for d := range s.ByDomain {
		domains = append(domains, d)
	}
	sort.Slice(domains, func(i, j int) bool {
		if s.ByDomain[domains[i]] != s.ByDomain[domains[j]] {
			return s.ByDomain[domains[i]] > s.ByDomain[domains[j]]
		}
		return domains[i] < domains[j]
	})
	fmt.Fprintf(w, "pending recipients by domain:\n")
	for _, d := range domains {
		fmt.Fprintf(w, "  %-30s %d\n", d, s.ByDomain[d])
	}
}

// SocketPath returns the admin socket path in a data directory.
func SocketPath(dataDir string) string { return filepath.Join(dataDir, SocketName) }
