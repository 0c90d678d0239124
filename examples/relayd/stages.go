package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/batonmail/baton/internal/prommetrics"
	"github.com/batonmail/baton/mx"
	"github.com/batonmail/baton/policy"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/queue/jetstream"
	"github.com/batonmail/baton/relay"
)

// stages holds the pipeline relayd builds from its configuration.
type stages struct {
	relayConfig  relay.Config
	serverConfig relay.ServerConfig
	queue        queue.Queue
	auth         *authSetup
	metrics      *prommetrics.Metrics
	closers      []func() error
}

func (s *stages) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

// reload re-reads the users and API key files (SIGHUP).
func (s *stages) reload(ctx context.Context, log *slog.Logger) {
	if err := s.auth.Reload(ctx); err != nil {
		log.Error("reload users and API keys", "err", err)
		return
	}
	log.Info("reloaded users and API keys")
}

// buildStages turns the configuration into the relay's stages.
func buildStages(ctx context.Context, cfg *Config, log *slog.Logger) (_ *stages, err error) {
	st := &stages{} // not the named result: "return nil, err" must still close it
	defer func() {
		if err != nil {
			st.close()
		}
	}()

	// Queue and retry schedule.
	sched, err := queueSchedule(cfg.Queue)
	if err != nil {
		return nil, err
	}
	switch cfg.Queue.Backend {
	case "", "file":
		d, err := queue.OpenDir(queue.DirConfig{Path: queueDir(cfg), Schedule: sched, Logger: log})
		if err != nil {
			return nil, err
		}
		st.queue = d
	case "nats":
		node := cfg.Queue.NATS.Node
		if node == "" {
			node, _ = os.Hostname()
		}
		q, err := openNATSQueue(ctx, cfg, sched, node, log)
		if err != nil {
			return nil, err
		}
		st.queue = q
	case "memory":
		st.queue = queue.NewMemory(queue.MemoryConfig{Schedule: sched})
	default:
		return nil, fmt.Errorf("queue.backend %q: want file, nats or memory", cfg.Queue.Backend)
	}
	st.closers = append(st.closers, st.queue.Close)
	st.metrics = newMetrics(st.queue, log)

	// Routing: static routes first, DNS for the rest.
	timeout, err := parseDuration("dns.timeout", cfg.DNS.Timeout, 0)
	if err != nil {
		return nil, err
	}
	dns, err := mx.NewDNS(mx.DNSConfig{Servers: cfg.DNS.Servers, Timeout: timeout, RejectLocal: !cfg.DNS.AllowLocal, Logger: log})
	if err != nil {
		return nil, err
	}
	var resolver mx.Resolver = dns
	if !cfg.DNS.NoMTASTS {
		if resolver, err = mx.NewMTASTS(mx.MTASTSConfig{Next: dns, Logger: log}); err != nil {
			return nil, err
		}
	}
	if len(cfg.Routes) > 0 {
		var routes []mx.StaticRoute
		for i, r := range cfg.Routes {
			mode, err := mx.ParseTLSMode(r.TLS)
			if err != nil {
				return nil, fmt.Errorf("routes[%d]: %w", i, err)
			}
			sr := mx.StaticRoute{Domain: r.Domain, Host: r.Host, Port: r.Port, TLS: mode}
			if r.Username != "" {
				sr.Auth = &mx.Credentials{Username: r.Username, Password: r.Password}
			}
			routes = append(routes, sr)
		}
		resolver, err = mx.NewStatic(mx.StaticConfig{Routes: routes, Next: resolver, Lookup: dns.LookupAddrs, Logger: log})
		if err != nil {
			return nil, err
		}
	}

	// Who may submit.
	st.auth, err = buildAuth(cfg, log)
	if err != nil {
		return nil, err
	}

	// DKIM.
	var signer relay.Signer
	if s, err := newDKIMSigner(cfg, log); err != nil {
		return nil, err
	} else if s != nil {
		signer = s // a nil *dkim.Signer must not become a non-nil interface
	}

	supp, err := openSuppressions(cfg, cfg.Suppress)
	if err != nil {
		return nil, err
	}

	deliverer := relay.NewSMTPDeliverer(delivererConfig(cfg, log))
	st.closers = append(st.closers, deliverer.Close)

	st.relayConfig = relay.Config{
		Hostname:     cfg.Hostname,
		Queue:        st.queue,
		Resolver:     resolver,
		Deliverer:    deliverer,
		Signer:       signer,
		Suppressions: supp,
		Metrics:      st.metrics,
		Logger:       log,
		Workers:      cfg.Delivery.Workers,
		Limits:       relay.Limits{MaxConcurrent: cfg.Delivery.PerDestination, Rate: cfg.Delivery.Rate, MaxRcpts: cfg.Delivery.MaxRcpts},
		Destinations: map[string]relay.Limits{},
		DomainTLS:    map[string]mx.TLSMode{},
	}
	if st.relayConfig.DelayWarning, err = parseDuration("delivery.delay_warning", cfg.Delivery.DelayWarning, 0); err != nil {
		return nil, err
	}
	if st.relayConfig.Streams, err = relayStreams(cfg); err != nil {
		return nil, err
	}
	for _, d := range cfg.Delivery.Destinations {
		if d.Domain == "" {
			return nil, fmt.Errorf("delivery.destinations: an entry has no domain")
		}
		if lim := (relay.Limits{MaxConcurrent: d.PerDestination, Rate: d.Rate, Burst: d.Burst, MaxRcpts: d.MaxRcpts}); lim != (relay.Limits{}) {
			st.relayConfig.Destinations[d.Domain] = lim
		}
		if d.TLS != "" {
			mode, err := mx.ParseTLSMode(d.TLS)
			if err != nil {
				return nil, fmt.Errorf("delivery.destinations %q: %w", d.Domain, err)
			}
			st.relayConfig.DomainTLS[d.Domain] = mode
		}
	}
	if err := addWebhooks(st, cfg, log); err != nil {
		return nil, err
	}
	st.serverConfig = relay.ServerConfig{
		Hostname:          cfg.Hostname,
		Authenticator:     st.auth.Authenticator,
		AddrAuthenticator: st.auth.Allow,
		Policy: policy.Chain{
			policy.NewConnLimit(&policy.ConnLimitConfig{PerIP: cfg.SMTP.MaxConnsPerIP, Logger: log}),
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
		StreamHeader:      cfg.SMTP.StreamHeader,
		Logger:            log,
		Metrics:           st.metrics,
	}
	return st, nil
}

// openNATSQueue opens the JetStream queue named in the configuration.
func openNATSQueue(ctx context.Context, cfg *Config, sched queue.Schedule, node string, log *slog.Logger) (queue.Queue, error) {
	n := cfg.Queue.NATS
	if n.URL == "" {
		return nil, fmt.Errorf("queue.nats.url is required with backend = \"nats\"")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	return jetstream.Open(ctx, jetstream.Config{
		URL: n.URL, Node: node, CredsFile: n.CredsFile, NKeyFile: n.NKeyFile, User: n.User, Password: n.Password,
		Token: n.Token, CAFile: n.CAFile, CertFile: n.CertFile, KeyFile: n.KeyFile, Prefix: n.Prefix,
		Replicas: n.Replicas, MaxBytes: n.MaxBytes, Schedule: sched, Logger: log,
	})
}

// delivererConfig configures the SMTP deliverer. Its connections in all
// are never fewer than delivery.workers (relay.SMTPDelivererConfig.MaxConns):
// with fewer, bulk deliveries could hold every connection while
// transactional ones, holding workers of their own, waited for one.
func delivererConfig(cfg *Config, log *slog.Logger) relay.SMTPDelivererConfig {
	return relay.SMTPDelivererConfig{
		Hostname:        cfg.Hostname,
		MaxConns:        max(200, cfg.Delivery.Workers),
		MaxConnsPerDest: cfg.Delivery.PerDestination,
		Logger:          log,
	}
}

// addObservers adds observers to the relay's, keeping the event log the
// relay writes when it has no Observer of its own.
func (st *stages) addObservers(log *slog.Logger, obs ...relay.Observer) {
	cur := st.relayConfig.Observer
	if cur == nil {
		cur = relay.SlogObserver(log) // what the relay uses when none is set
	}
	st.relayConfig.Observer = relay.Multi(append([]relay.Observer{cur}, obs...)...)
}
