package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/batonmail/baton/relay"
	"github.com/batonmail/baton/relay/webhook"
)

// WebhookConfig is one [[webhooks]] entry: an endpoint that receives the
// relay's events (see the webhook package).
type WebhookConfig struct {
	URL string `toml:"url"`
	// Secret signs the requests; SecretFile names a file holding it
	// instead (surrounding white space is ignored).
	Secret     string `toml:"secret"`
	SecretFile string `toml:"secret_file"`
	// Events lists the kinds to send by name ("delivered", "failed",
	// "*" for all); empty means webhook.DefaultKinds.
	Events []string `toml:"events"`
	// BatchSize, MaxBuffered and the Go durations below tune the sender;
	// zero or empty means the webhook package's defaults.
	BatchSize     int    `toml:"batch_size"`
	MaxBuffered   int    `toml:"max_buffered"`
	FlushInterval string `toml:"flush_interval"`
	RetryWindow   string `toml:"retry_window"`
	Timeout       string `toml:"timeout"`
}

// webhookFlushTimeout bounds how long shutdown waits for the webhooks to
// send what they hold, after the relay has stopped.
const webhookFlushTimeout = 10 * time.Second

// addWebhooks starts a webhook.Sender per [[webhooks]] entry and adds them
// to the relay's observers, next to the event log; the stages' closers
// flush them at shutdown.
func addWebhooks(st *stages, cfg *Config, log *slog.Logger) error {
	if len(cfg.Webhooks) == 0 {
		return nil
	}
	var senders []*webhook.Sender
	var obs []relay.Observer
	for i, w := range cfg.Webhooks {
		name := fmt.Sprintf("webhooks[%d]", i)
		secret := w.Secret
		if w.SecretFile != "" {
			if secret != "" {
				return fmt.Errorf("%s: set secret or secret_file, not both", name)
			}
			b, err := os.ReadFile(w.SecretFile)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			secret = strings.TrimSpace(string(b))
		}
		kinds, err := webhook.ParseKinds(w.Events)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		c := webhook.Config{URL: w.URL, Secret: secret, Kinds: kinds, BatchSize: w.BatchSize, MaxBuffered: w.MaxBuffered, Logger: log}
		if c.FlushInterval, err = parseDuration(name+".flush_interval", w.FlushInterval, 0); err != nil {
			return err
		}
		if c.RetryWindow, err = parseDuration(name+".retry_window", w.RetryWindow, 0); err != nil {
			return err
		}
		if c.Timeout, err = parseDuration(name+".timeout", w.Timeout, 0); err != nil {
			return err
		}
		s, err := webhook.New(c)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		st.closers = append(st.closers, func() error {
			ctx, cancel := context.WithTimeout(context.Background(), webhookFlushTimeout)
			defer cancel()
			err := s.Close(ctx)
			if stats := s.Stats(); stats.Dropped > 0 {
				log.Warn("webhook events dropped", "webhook", name, "dropped", stats.Dropped, "sent", stats.Sent)
			}
			return err
		})
		obs = append(obs, s)
		senders = append(senders, s)
	}
	st.addObservers(log, obs...)
	if st.metrics != nil {
		if err := st.metrics.Registry().Register(webhookCollector(senders)); err != nil {
			return fmt.Errorf("webhook metrics: %w", err)
		}
	}
	return nil
}

// webhookCollector exports each webhook Sender's Stats to Prometheus,
// labelled by the sender's index in the configuration (the URL may carry
// secrets).
type webhookCollector []*webhook.Sender

var (
	webhookSentDesc = prometheus.NewDesc("baton_webhook_events_sent_total",
		"Events in webhook batches the receiver accepted.", []string{"webhook"}, nil)
	webhookDroppedDesc = prometheus.NewDesc("baton_webhook_events_dropped_total",
		"Webhook events that will never be sent (buffer full, rejected, retry window over).", []string{"webhook"}, nil)
	webhookRetriesDesc = prometheus.NewDesc("baton_webhook_retries_total",
		"Webhook POSTs that failed and were retried.", []string{"webhook"}, nil)
	webhookPendingDesc = prometheus.NewDesc("baton_webhook_events_pending",
		"Webhook events buffered or being posted.", []string{"webhook"}, nil)
)

// Describe implements prometheus.Collector.
func (c webhookCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- webhookSentDesc
	ch <- webhookDroppedDesc
	ch <- webhookRetriesDesc
	ch <- webhookPendingDesc
}

// Collect implements prometheus.Collector.
func (c webhookCollector) Collect(ch chan<- prometheus.Metric) {
	for i, s := range c {
		st := s.Stats()
		label := strconv.Itoa(i)
		ch <- prometheus.MustNewConstMetric(webhookSentDesc, prometheus.CounterValue, float64(st.Sent), label)
		ch <- prometheus.MustNewConstMetric(webhookDroppedDesc, prometheus.CounterValue, float64(st.Dropped), label)
		ch <- prometheus.MustNewConstMetric(webhookRetriesDesc, prometheus.CounterValue, float64(st.Retries), label)
		ch <- prometheus.MustNewConstMetric(webhookPendingDesc, prometheus.GaugeValue, float64(st.Pending), label)
	}
}
