package main

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/dkim"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// stages holds the pipeline relayd builds from its configuration.
type stages struct {
	relayConfig  relay.Config
	serverConfig relay.ServerConfig
	queue        queue.Queue
	passwords    *auth.PasswordFile
	apiKeys      *auth.APIKeys
	closers      []func() error
}

func (s *stages) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

// reload re-reads the users and API key files (SIGHUP).
func (s *stages) reload(ctx context.Context, log *slog.Logger) {
	if err := s.passwords.Reload(ctx); err != nil {
		log.Error("reload users", "err", err)
	}
	if err := s.apiKeys.Reload(ctx); err != nil {
		log.Error("reload API keys", "err", err)
	}
	log.Info("reloaded users and API keys")
}

func parseTLSMode(s string) (mx.TLSMode, error) {
	switch strings.ToLower(s) {
	case "", "opportunistic", "may":
		return mx.TLSOpportunistic, nil
	case "none":
		return mx.TLSNone, nil
	case "required", "encrypt":
		return mx.TLSRequired, nil
	case "verified", "verify":
		return mx.TLSVerified, nil
	}
	return 0, fmt.Errorf("unknown tls mode %q (opportunistic, none, required, verified)", s)
}

// buildStages turns the configuration into the relay's stages.
func buildStages(ctx context.Context, cfg *Config, log *slog.Logger) (st *stages, err error) {
	st = &stages{}
	defer func() {
		if err != nil {
			st.close()
		}
	}()

	// Queue and retry schedule.
	var sched queue.Schedule
	if sched.Min, err = parseDuration("queue.retry_min", cfg.Queue.RetryMin, 0); err != nil {
		return nil, err
	}
	if sched.Max, err = parseDuration("queue.retry_max", cfg.Queue.RetryMax, 0); err != nil {
		return nil, err
	}
	if sched.MaxAge, err = parseDuration("queue.max_age", cfg.Queue.MaxAge, 0); err != nil {
		return nil, err
	}
	switch cfg.Queue.Backend {
	case "", "file":
		d, err := queue.OpenDir(queue.DirConfig{Path: filepath.Join(cfg.DataDir, "queue"), Schedule: sched, Logger: log})
		if err != nil {
			return nil, err
		}
		st.queue = d
	case "memory":
		st.queue = queue.NewMemory(queue.MemoryConfig{Schedule: sched})
	default:
		return nil, fmt.Errorf("queue.backend %q: want file or memory", cfg.Queue.Backend)
	}
	st.closers = append(st.closers, st.queue.Close)

	// Routing: static routes first, DNS for the rest.
	timeout, err := parseDuration("dns.timeout", cfg.DNS.Timeout, 0)
	if err != nil {
		return nil, err
	}
	dns, err := mx.NewDNS(mx.DNSConfig{Servers: cfg.DNS.Servers, Timeout: timeout, Logger: log})
	if err != nil {
		return nil, err
	}
	var resolver mx.Resolver = dns
	if len(cfg.Routes) > 0 {
		var routes []mx.StaticRoute
		for i, r := range cfg.Routes {
			mode, err := parseTLSMode(r.TLS)
			if err != nil {
				return nil, fmt.Errorf("routes[%d]: %w", i, err)
			}
			sr := mx.StaticRoute{Domain: r.Domain, Host: r.Host, Port: r.Port, TLS: mode}
			if r.Username != "" {
				sr.Auth = &mx.Credentials{Username: r.Username, Password: r.Password}
			}
			routes = append(routes, sr)
		}
		resolver, err = mx.NewStatic(mx.StaticConfig{Routes: routes, Next: dns, Lookup: dns.LookupAddrs, Logger: log})
		if err != nil {
			return nil, err
		}
	}

	// Who may submit.
	st.passwords, err = auth.OpenPasswordFile(cfg.Auth.UsersFile, nil)
	if err != nil {
		return nil, err
	}
	st.apiKeys, err = auth.OpenAPIKeys(cfg.Auth.APIKeysFile, nil)
	if err != nil {
		return nil, err
	}
	var allow auth.AddrAuthenticator
	if len(cfg.Auth.Allow) > 0 {
		var entries []auth.AllowEntry
		for _, a := range cfg.Auth.Allow {
			entries = append(entries, auth.AllowEntry{
				Identity: auth.Identity{Name: a.Name, SenderDomains: a.SenderDomains},
				Networks: a.CIDR,
			})
		}
		al, err := auth.NewAllowList(entries)
		if err != nil {
			return nil, err
		}
		allow = al
	}

	// DKIM.
	var signer relay.Signer
	if len(cfg.DKIM.Keys) > 0 {
		var files []dkim.KeyFile
		for _, k := range cfg.DKIM.Keys {
			files = append(files, dkim.KeyFile{Domain: k.Domain, Selector: k.Selector, Path: k.KeyFile})
		}
		ks, err := dkim.LoadKeyStore(files)
		if err != nil {
			return nil, err
		}
		s, err := dkim.NewSigner(dkim.SignerConfig{Keys: ks, ParentDomains: true, Logger: log})
		if err != nil {
			return nil, err
		}
		signer = s
	}

	supp, err := relay.OpenSuppressionDir(suppressionDir(cfg), relay.SuppressionConfig{})
	if err != nil {
		return nil, err
	}

	deliverer := relay.NewSMTPDeliverer(relay.SMTPDelivererConfig{
		Hostname:        cfg.Hostname,
		MaxConnsPerDest: cfg.Delivery.PerDestination,
		Logger:          log,
	})
	st.closers = append(st.closers, deliverer.Close)

	st.relayConfig = relay.Config{
		Hostname:     cfg.Hostname,
		Queue:        st.queue,
		Resolver:     resolver,
		Deliverer:    deliverer,
		Signer:       signer,
		Suppressions: supp,
		Logger:       log,
		Workers:      cfg.Delivery.Workers,
		Limits:       relay.Limits{MaxConcurrent: cfg.Delivery.PerDestination},
	}
	st.serverConfig = relay.ServerConfig{
		Hostname:          cfg.Hostname,
		Authenticator:     auth.Multi(st.passwords, st.apiKeys),
		AddrAuthenticator: allow,
		Policy: policy.Chain{
			policy.NewConnLimit(nil),
			policy.NewAuthThrottle(&policy.AuthThrottleConfig{Logger: log}),
			policy.NewClosedRelay(nil),
			policy.SendScope{},
			policy.NewSenders(nil),
			policy.NewLimits(&policy.LimitsConfig{MaxRecipients: cfg.SMTP.MaxRecipients, MaxSize: cfg.SMTP.MaxSize}),
			policy.NewRateLimit(&policy.RateLimitConfig{Logger: log}),
		},
		AllowInsecureAuth: cfg.SMTP.InsecureAuth,
		MaxMessageBytes:   cfg.SMTP.MaxSize,
		MaxRecipients:     cfg.SMTP.MaxRecipients,
		Logger:            log,
	}
	return st, nil
}
