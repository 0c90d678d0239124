package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/batonmail/baton/auth"
)

// runUserCmd edits the users file:
//
//	relayd user add NAME [-domains d1,d2] [-addrs a@d] [-sandbox] [-stream bulk] [-generate] ...
//	relayd user passwd NAME [-generate]
//	relayd user remove NAME
//	relayd user list
//
// add and passwd read the password from the first line of standard input,
// or generate one and print it once when standard input is a terminal or
// -generate is given.
func runUserCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	return userCmd(ctx, cfg, args, os.Stdin, stdout, stderr)
}

func userCmd(ctx context.Context, cfg *Config, args []string, stdin io.Reader, stdout, stderr io.Writer) error {
	usage := func() {
		fmt.Fprintln(stderr, "usage: relayd user add NAME [flags] | passwd NAME [-generate] | remove NAME | list")
	}
	if len(args) == 0 {
		usage()
		return errors.New("user: missing subcommand")
	}
	fs := flag.NewFlagSet("user "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("file", authFile(cfg, cfg.Auth.UsersFile, "users"), "users file")
	var (
		domains, addrs *string
		stream         *string
		sandbox        *bool
		maxSize        *int64
		messages, rcpt *int
		per            *time.Duration
		generate       *bool
	)
	switch args[0] {
	case "add":
		domains = fs.String("domains", "", "comma-separated sender domains the user may use (empty: any)")
		addrs = fs.String("addrs", "", "comma-separated sender addresses the user may use")
		sandbox = fs.Bool("sandbox", false, "capture the user's mail instead of delivering it")
		stream = fs.String("stream", "", "mail stream of all the user's messages (empty: the message's stream header decides)")
		maxSize = fs.Int64("max-size", 0, "maximum message size in bytes (0: server limit)")
		messages = fs.Int("messages", 0, "messages allowed per -per (0: unlimited)")
		rcpt = fs.Int("recipients", 0, "recipients allowed per -per (0: unlimited)")
		per = fs.Duration("per", time.Hour, "rate limit window")
		fallthrough
	case "passwd":
		generate = fs.Bool("generate", false, "generate a password and print it once")
	case "remove", "list":
	default:
		usage()
		return fmt.Errorf("user: unknown subcommand %q", args[0])
	}
	name, err := parseCmdArgs(fs, args[1:], args[0] != "list")
	if err != nil {
		return err
	}
	pf, err := auth.OpenPasswordFile(*file, &auth.PasswordFileConfig{Cost: cfg.Auth.BcryptCost, CheckInterval: -1})
	if err != nil {
		return err
	}
	switch args[0] {
	case "add", "passwd":
		u, exists := pf.User(name)
		if args[0] == "add" && exists {
			return fmt.Errorf("user %q exists (use \"relayd user passwd\" to change the password, or remove it first)", name)
		}
		if args[0] == "passwd" && !exists {
			return fmt.Errorf("%w: %q", auth.ErrNoUser, name)
		}
		if strings.EqualFold(name, apiKeyUser(cfg)) {
			return fmt.Errorf("user name %q is reserved for API keys", name)
		}
		if args[0] == "add" {
			if err := checkStream(cfg, *stream); err != nil {
				return err
			}
			u = auth.User{
				Name:          name,
				SenderDomains: splitComma(*domains),
				SenderAddrs:   splitComma(*addrs),
				Sandbox:       *sandbox,
				Stream:        *stream,
				MaxSize:       *maxSize,
				Rate:          auth.Rate{Messages: *messages, Recipients: *rcpt},
			}
			if u.Rate.Messages > 0 || u.Rate.Recipients > 0 {
				u.Rate.Per = *per
			}
		}
		password, generated, err := readPassword(stdin, *generate)
		if err != nil {
			return err
		}
		if err := pf.SetUser(ctx, u, password); err != nil {
			return err
		}
		if generated {
			fmt.Fprintf(stdout, "password for %s (shown once): %s\n", name, password)
		} else {
			fmt.Fprintf(stdout, "password set for %s\n", name)
		}
		return nil
	case "remove":
		if err := pf.RemoveUser(ctx, name); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "removed %s\n", name)
		return nil
	default: // list
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "NAME\tSENDERS\tMAX SIZE\tRATE\tSANDBOX\tSTREAM")
		for _, u := range pf.Users() {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%s\n", u.Name, senders(u.SenderDomains, u.SenderAddrs), sizeString(u.MaxSize), rateString(u.Rate), u.Sandbox, streamString(u.Stream))
		}
		return tw.Flush()
	}
}

// runAPIKeyCmd manages API keys:
//
//	relayd apikey create NAME [-scopes send] [-domains d1,d2] [-addrs a@d] [-sandbox] [-stream bulk]
//	relayd apikey revoke ID
//	relayd apikey list
//
// create prints the key once; only its hash is stored.
func runAPIKeyCmd(ctx context.Context, cfg *Config, args []string, stdout, stderr io.Writer) error {
	usage := func() {
		fmt.Fprintln(stderr, "usage: relayd apikey create NAME [flags] | revoke ID | list")
	}
	if len(args) == 0 {
		usage()
		return errors.New("apikey: missing subcommand")
	}
	fs := flag.NewFlagSet("apikey "+args[0], flag.ContinueOnError)
	fs.SetOutput(stderr)
	file := fs.String("file", authFile(cfg, cfg.Auth.APIKeysFile, "apikeys"), "API keys file")
	var (
		scopes, domains, addrs *string
		stream                 *string
		sandbox                *bool
		maxSize                *int64
		messages, rcpt         *int
		per                    *time.Duration
	)
	switch args[0] {
	case "create":
		scopes = fs.String("scopes", auth.ScopeSend, "comma-separated scopes: send, send:sandbox")
		domains = fs.String("domains", "", "comma-separated sender domains the key may use (empty: any)")
		addrs = fs.String("addrs", "", "comma-separated sender addresses the key may use")
		sandbox = fs.Bool("sandbox", false, "capture the key's mail instead of delivering it")
		stream = fs.String("stream", "", "mail stream of all the key's messages (empty: the message's stream header decides)")
		maxSize = fs.Int64("max-size", 0, "maximum message size in bytes (0: server limit)")
		messages = fs.Int("messages", 0, "messages allowed per -per (0: unlimited)")
		rcpt = fs.Int("recipients", 0, "recipients allowed per -per (0: unlimited)")
		per = fs.Duration("per", time.Hour, "rate limit window")
	case "revoke", "list":
	default:
		usage()
		return fmt.Errorf("apikey: unknown subcommand %q", args[0])
	}
	arg, err := parseCmdArgs(fs, args[1:], args[0] != "list")
	if err != nil {
		return err
	}
	keys, err := auth.OpenAPIKeys(*file, &auth.APIKeysConfig{User: cfg.Auth.APIKeyUser, CheckInterval: -1})
	if err != nil {
		return err
	}
	switch args[0] {
	case "create":
		if err := checkStream(cfg, *stream); err != nil {
			return err
		}
		spec := auth.NewAPIKey{
			Name:          arg,
			Scopes:        splitComma(*scopes),
			SenderDomains: splitComma(*domains),
			SenderAddrs:   splitComma(*addrs),
			MaxSize:       *maxSize,
			Rate:          auth.Rate{Messages: *messages, Recipients: *rcpt},
			Sandbox:       *sandbox,
			Stream:        *stream,
		}
		if spec.Rate.Messages > 0 || spec.Rate.Recipients > 0 {
			spec.Rate.Per = *per
		}
		key, rec, err := keys.Create(ctx, spec)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "id:   %s\nuser: %s\nkey:  %s\n(the key is shown once; store it now)\n", rec.ID, keys.User(), key)
		return nil
	case "revoke":
		if err := keys.Revoke(ctx, arg); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "revoked %s\n", arg)
		return nil
	default: // list
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tNAME\tSCOPES\tSENDERS\tRATE\tSTREAM\tCREATED\tREVOKED")
		for _, k := range keys.Keys() {
			revoked := "-"
			if k.Revoked != nil {
				revoked = k.Revoked.Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", k.ID, k.Name, strings.Join(k.Scopes, ","), senders(k.SenderDomains, k.SenderAddrs), rateString(k.Rate), streamString(k.Stream), k.Created.Format(time.RFC3339), revoked)
		}
		return tw.Flush()
	}
}

// authSetup is what relayd's server needs from the auth configuration.
type authSetup struct {
	// Passwords and APIKeys are kept for Reload (SIGHUP); both also reload
	// by themselves when their files change.
	Passwords *auth.PasswordFile
	APIKeys   *auth.APIKeys
	// Authenticator tries API keys, then passwords: API keys refuse other
	// user names at once, so password logins cost one bcrypt.
	Authenticator auth.Authenticator
	// Allow recognises allow-listed clients; nil when none are configured.
	Allow auth.AddrAuthenticator
}

// Reload re-reads the users and API key files.
func (a *authSetup) Reload(ctx context.Context) error {
	return errors.Join(a.Passwords.Reload(ctx), a.APIKeys.Reload(ctx))
}

// buildAuth makes relayd's authenticators from cfg.Auth.
func buildAuth(cfg *Config, log *slog.Logger) (*authSetup, error) {
	users, err := auth.OpenPasswordFile(authFile(cfg, cfg.Auth.UsersFile, "users"), &auth.PasswordFileConfig{Cost: cfg.Auth.BcryptCost, Logger: log})
	if err != nil {
		return nil, err
	}
	keys, err := auth.OpenAPIKeys(authFile(cfg, cfg.Auth.APIKeysFile, "apikeys"), &auth.APIKeysConfig{User: cfg.Auth.APIKeyUser, Logger: log})
	if err != nil {
		return nil, err
	}
	a := &authSetup{Passwords: users, APIKeys: keys, Authenticator: auth.Multi(keys, users)}
	if len(cfg.Auth.Allow) == 0 {
		return a, nil
	}
	entries := make([]auth.AllowEntry, 0, len(cfg.Auth.Allow))
	for i, ac := range cfg.Auth.Allow {
		id := auth.Identity{
			Name:          ac.Name,
			SenderDomains: ac.SenderDomains,
			SenderAddrs:   ac.SenderAddrs,
			MaxSize:       ac.MaxSize,
			Sandbox:       ac.Sandbox,
			Stream:        ac.Stream,
			Rate:          auth.Rate{Messages: ac.Messages, Recipients: ac.Recipients},
		}
		if id.Name == "" {
			id.Name = fmt.Sprintf("allow-%d", i+1)
		}
		if err := checkStream(cfg, id.Stream); err != nil {
			return nil, fmt.Errorf("auth.allow %q: %w", id.Name, err)
		}
		if ac.Per != "" {
			if id.Rate.Per, err = time.ParseDuration(ac.Per); err != nil {
				return nil, fmt.Errorf("auth.allow %q: per: %w", id.Name, err)
			}
		} else if id.Rate.Messages > 0 || id.Rate.Recipients > 0 {
			id.Rate.Per = time.Hour
		}
		entries = append(entries, auth.AllowEntry{Identity: id, Networks: ac.CIDR})
	}
	allow, err := auth.NewAllowList(entries)
	if err != nil {
		return nil, err
	}
	a.Allow = allow
	return a, nil
}

func authFile(cfg *Config, path, def string) string {
	if path != "" {
		return path
	}
	return filepath.Join(cfg.DataDir, def)
}

func apiKeyUser(cfg *Config) string {
	if cfg.Auth.APIKeyUser != "" {
		return cfg.Auth.APIKeyUser
	}
	return auth.DefaultAPIKeyUser
}

// parseCmdArgs accepts the single positional argument before or after the
// flags ("add NAME -sandbox" and "add -sandbox NAME").
func parseCmdArgs(fs *flag.FlagSet, args []string, wantArg bool) (string, error) {
	var arg string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		arg, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return "", err
	}
	rest := fs.Args()
	if arg == "" && len(rest) > 0 {
		arg, rest = rest[0], rest[1:]
	}
	switch {
	case len(rest) > 0:
		return "", fmt.Errorf("unexpected arguments: %q", rest)
	case wantArg && arg == "":
		fs.Usage()
		return "", errors.New("missing argument")
	case !wantArg && arg != "":
		return "", fmt.Errorf("unexpected argument %q", arg)
	}
	return arg, nil
}

// readPassword reads the first line of stdin as the password, unless
// generate is set or stdin is a terminal, in which case it makes one.
func readPassword(stdin io.Reader, generate bool) (password string, generated bool, err error) {
	if !generate {
		if f, ok := stdin.(*os.File); ok {
			if st, err := f.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
				generate = true
			}
		}
	}
	if generate {
		return auth.GeneratePassword(), true, nil
	}
	line, err := bufio.NewReader(io.LimitReader(stdin, 1024)).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", false, err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", false, errors.New("no password on standard input (use -generate to make one)")
	}
	return line, false, nil
}

func splitComma(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func senders(domains, addrs []string) string {
	all := append(append([]string(nil), domains...), addrs...)
	if len(all) == 0 {
		return "any"
	}
	return strings.Join(all, ",")
}

func streamString(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func sizeString(n int64) string {
	if n == 0 {
		return "-"
	}
	return fmt.Sprint(n)
}

func rateString(r auth.Rate) string {
	if r.Messages == 0 && r.Recipients == 0 {
		return "-"
	}
	var parts []string
	if r.Messages > 0 {
		parts = append(parts, fmt.Sprintf("%d msgs", r.Messages))
	}
	if r.Recipients > 0 {
		parts = append(parts, fmt.Sprintf("%d rcpts", r.Recipients))
	}
	return strings.Join(parts, ", ") + "/" + r.Per.String()
}
