package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/batonmail/baton/relay"
	"github.com/batonmail/baton/relay/webhook"
)

// TestWebhooks_ExampleParses keeps the commented [[webhooks]] example in
// relayd.toml true: uncommented, every setting in it is known.
func TestWebhooks_ExampleParses(t *testing.T) {
	b, err := os.ReadFile("relayd.toml")
	if err != nil {
		t.Fatal(err)
	}
	var block []string
	for _, line := range strings.Split(string(b), "\n") {
		if line == "# [[webhooks]]" || len(block) > 0 && strings.HasPrefix(line, "# ") {
			block = append(block, strings.TrimPrefix(line, "# "))
		} else if len(block) > 0 {
			break
		}
	}
	if len(block) < 2 {
		t.Fatal("no [[webhooks]] example in relayd.toml")
	}
	var cfg Config
	md, err := toml.Decode(strings.Join(block, "\n"), &cfg)
	if err != nil {
		t.Fatalf("%v in\n%s", err, strings.Join(block, "\n"))
	}
	if und := md.Undecoded(); len(und) > 0 {
		t.Fatalf("unknown setting %q", und[0].String())
	}
	if len(cfg.Webhooks) != 1 || cfg.Webhooks[0].URL == "" || cfg.Webhooks[0].SecretFile == "" || cfg.Webhooks[0].BatchSize != 100 ||
		cfg.Webhooks[0].RetryWindow != "1h" || cfg.Webhooks[0].MaxBuffered != 100000 {
		t.Errorf("example webhook = %+v", cfg.Webhooks)
	}
}

// TestWebhooks_WiredIntoRelay builds relayd's stages from a configuration
// with a webhook and checks the relay's observer feeds it, the event
// filter applies, and closing the stages flushes it.
func TestWebhooks_WiredIntoRelay(t *testing.T) {
	var mu sync.Mutex
	var got []webhook.Event
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if err := webhook.Verify("from-a-file", r.Header.Get(webhook.SignatureHeader), body, time.Minute); err != nil {
			t.Errorf("webhook request: %v", err)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		var b webhook.Batch
		if err := json.Unmarshal(body, &b); err != nil {
			t.Error(err)
		}
		mu.Lock()
		got = append(got, b.Events...)
		mu.Unlock()
	}))
	defer srv.Close()

	dir := t.TempDir()
	secretFile := filepath.Join(dir, "webhook.secret")
	os.WriteFile(secretFile, []byte("from-a-file\n"), 0o600)
	cfgFile := filepath.Join(dir, "relayd.toml")
	os.WriteFile(cfgFile, []byte(`data_dir = "`+filepath.Join(dir, "data")+`"
[queue]
backend = "memory"
[[webhooks]]
url = "`+srv.URL+`/hook"
secret_file = "`+secretFile+`"
events = ["delivered", "failed"]
flush_interval = "1h"
`), 0o600)
	cfg, err := loadConfig(cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	st, err := buildStages(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	obs := st.relayConfig.Observer
	if obs == nil {
		st.close()
		t.Fatal("no observer")
	}
	ctx := context.Background()
	obs.Observe(ctx, relay.Event{Kind: relay.EventAccepted, ID: "Q1", Rcpt: "a@example.test"})
	obs.Observe(ctx, relay.Event{Kind: relay.EventDelivered, ID: "Q1", Rcpt: "a@example.test"})
	obs.Observe(ctx, relay.Event{Kind: relay.EventFailed, ID: "Q2", Rcpt: "b@example.test"})
	st.close() // flushes, although the flush interval is an hour
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[0].Kind != "delivered" || got[0].QueueID != "Q1" || got[1].Kind != "failed" || got[1].QueueID != "Q2" {
		t.Errorf("webhook got %+v", got)
	}
	// The sender's counts are exported with the relay's metrics.
	rec := httptest.NewRecorder()
	st.metrics.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if !strings.Contains(rec.Body.String(), `baton_webhook_events_sent_total{webhook="0"} 2`) {
		t.Errorf("webhook metrics missing from /metrics:\n%s", grepLines(rec.Body.String(), "baton_webhook"))
	}
}

func grepLines(s, substr string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestWebhooks_BadConfigRefused(t *testing.T) {
	for name, w := range map[string]WebhookConfig{
		"no secret":    {URL: "http://127.0.0.1:1/"},
		"both secrets": {URL: "http://127.0.0.1:1/", Secret: "x", SecretFile: "/dev/null"},
		"missing file": {URL: "http://127.0.0.1:1/", SecretFile: filepath.Join(t.TempDir(), "none")},
		"bad event":    {URL: "http://127.0.0.1:1/", Secret: "x", Events: []string{"bounced"}},
		"bad duration": {URL: "http://127.0.0.1:1/", Secret: "x", RetryWindow: "soon"},
		"bad url":      {URL: "hooks.example.com", Secret: "x"},
	} {
		cfg := defaultConfig()
		cfg.DataDir = t.TempDir()
		cfg.Queue.Backend = "memory"
		cfg.fill()
		cfg.Webhooks = []WebhookConfig{w}
		st, err := buildStages(context.Background(), cfg, slog.New(slog.DiscardHandler))
		if err == nil {
			st.close()
			t.Errorf("%s: accepted", name)
		} else if !strings.Contains(err.Error(), "webhooks[0]") {
			t.Errorf("%s: error %q does not name the entry", name, err)
		}
	}
}
