package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestConfig_ExampleFileParsesAndBuilds keeps relayd.toml true: every
// setting in it is known, and the stages build from it.
func TestConfig_ExampleFileParsesAndBuilds(t *testing.T) {
	cfg, err := loadConfig("relayd.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.SMTP.MaxSize != 26214400 || cfg.Delivery.PerDestination != 20 || cfg.Queue.MaxAge != "120h" {
		t.Fatalf("example settings not read: %+v", cfg)
	}
	if _, ok := cfg.Streams["bulk"]; !ok || cfg.SMTP.StreamHeader != "X-Baton-Stream" {
		t.Fatalf("example streams not read: %+v, %q", cfg.Streams, cfg.SMTP.StreamHeader)
	}
	cfg.DataDir = t.TempDir()
	cfg.Auth.UsersFile, cfg.Auth.APIKeysFile = "", ""
	cfg.fill()
	st, err := buildStages(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	st.close()
}

func TestConfig_UnknownSettingRefused(t *testing.T) {
	p := filepath.Join(t.TempDir(), "bad.toml")
	os.WriteFile(p, []byte("[smtp]\nlisten_on = [\"x\"]\n"), 0o600)
	_, err := loadConfig(p)
	if err == nil || !strings.Contains(err.Error(), "listen_on") {
		t.Fatalf("unknown setting: err = %v", err)
	}
}

func TestConfig_Streams(t *testing.T) {
	p := filepath.Join(t.TempDir(), "streams.toml")
	os.WriteFile(p, []byte(`
[delivery]
workers = 40
[streams.bulk]
workers = 10
per_destination = 4
[[streams.bulk.destinations]]
domain = "gmail.com"
rate = 2
[streams.marketing]
max_in_flight = 8
`), 0o600)
	cfg, err := loadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	streams, err := relayStreams(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if b := streams["bulk"]; b.Workers != 10 || b.Limits.MaxConcurrent != 4 || b.Destinations["gmail.com"].Rate != 2 || streams["marketing"].MaxInFlight != 8 {
		t.Fatalf("streams = %+v", streams)
	}
	if err := checkStream(cfg, "marketing"); err != nil {
		t.Errorf("marketing: %v", err)
	}
	if err := checkStream(cfg, "bulk"); err != nil {
		t.Errorf("bulk: %v", err)
	}
	if err := checkStream(cfg, "nosuch"); err == nil {
		t.Error("checkStream accepted an unconfigured stream")
	}
	cfg.Streams["bulk"].Destinations[0].TLS = "verified"
	if _, err := relayStreams(cfg); err == nil {
		t.Error("a stream destination with tls was accepted")
	}
	cfg.Streams["Bad Name"] = StreamConfig{}
	if _, err := relayStreams(cfg); err == nil {
		t.Error("a malformed stream name was accepted")
	}
}

// user add and apikey create take -stream, refuse an unknown stream, and
// the identity carries it.
func TestUserCmd_Stream(t *testing.T) {
	cfg := defaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.Auth.BcryptCost = 4
	cfg.fill()
	ctx := context.Background()
	var out, errOut strings.Builder
	if err := userCmd(ctx, cfg, []string{"add", "news", "-stream", "bulk"}, strings.NewReader("pw\n"), &out, &errOut); err != nil {
		t.Fatal(err)
	}
	if err := userCmd(ctx, cfg, []string{"add", "typo", "-stream", "blk"}, strings.NewReader("pw\n"), &out, &errOut); err == nil {
		t.Error("user add accepted an unknown stream")
	}
	a, err := buildAuth(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	id, err := a.Authenticator.Authenticate(ctx, "news", "pw")
	if err != nil || id.Stream != "bulk" {
		t.Fatalf("news: %+v, %v", id, err)
	}
	out.Reset()
	if err := runAPIKeyCmd(ctx, cfg, []string{"create", "campaigns", "-stream", "bulk"}, &out, &errOut); err != nil {
		t.Fatal(err)
	}
	var key string
	for _, l := range strings.Split(out.String(), "\n") {
		if v, ok := strings.CutPrefix(l, "key:"); ok {
			key = strings.TrimSpace(v)
		}
	}
	if err := a.Reload(ctx); err != nil {
		t.Fatal(err)
	}
	if id, err := a.Authenticator.Authenticate(ctx, "apikey", key); err != nil || id.Stream != "bulk" {
		t.Fatalf("API key identity: %+v, %v", id, err)
	}
	if err := runAPIKeyCmd(ctx, cfg, []string{"create", "x", "-stream", "nosuch"}, &out, &errOut); err == nil {
		t.Error("apikey create accepted an unknown stream")
	}
}

// The deliverer may open as many connections as there are workers, so no
// stream's share of the workers can hold every connection.
func TestDelivererConfig_ConnectionsCoverWorkers(t *testing.T) {
	cfg := defaultConfig()
	for _, workers := range []int{10, 100, 500} {
		cfg.Delivery.Workers = workers
		got := delivererConfig(cfg, nil).MaxConns
		if got <= 0 {
			got = 200 // the deliverer's default
		}
		if got < workers {
			t.Errorf("delivery.workers = %d: deliverer MaxConns %d", workers, got)
		}
	}
}
