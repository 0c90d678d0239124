package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/batonmail/baton/queue"
)

// TestMetrics_ServedFromStages builds relayd's stages from the example
// configuration with a /metrics listener on loopback and checks that the
// relay and the server get the metrics and that the endpoint serves them,
// with the queue gauges read from the stages' queue.
func TestMetrics_ServedFromStages(t *testing.T) {
	cfg, err := loadConfig("relayd.toml")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Metrics.Listen != "" {
		t.Fatalf("the example serves metrics by default on %q", cfg.Metrics.Listen)
	}
	cfg.DataDir = t.TempDir()
	cfg.Auth.UsersFile, cfg.Auth.APIKeysFile = "", ""
	cfg.fill()
	cfg.Queue.Backend = "memory"
	cfg.Metrics.Listen = "127.0.0.1:0"
	log := slog.New(slog.DiscardHandler)
	st, err := buildStages(context.Background(), cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	if st.relayConfig.Metrics != st.metrics || st.serverConfig.Metrics != st.metrics || st.metrics == nil {
		t.Fatal("relay and server configs do not carry the stages' metrics")
	}
	env := &queue.Envelope{From: "a@example.test", Held: true, To: []queue.Recipient{{Addr: "b@example.test"}}}
	if _, err := st.queue.Enqueue(context.Background(), env, strings.NewReader("Subject: x\r\n\r\nx\r\n")); err != nil {
		t.Fatal(err)
	}
	st.metrics.ServerReply(250)

	addr, stop, err := serveMetrics(cfg.Metrics, st.metrics.Handler(), log)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	get := func(path string) (int, string) {
		resp, err := http.Get("http://" + addr.String() + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("/metrics")
	for _, want := range []string{`baton_queue_messages{state="held"} 1`, `baton_smtp_replies_total{class="2xx"} 1`, "go_goroutines "} {
		if code != 200 || !strings.Contains(body, want) {
			t.Errorf("GET /metrics: %d, no %q in:\n%s", code, want, body)
		}
	}
	if code, _ := get("/"); code != http.StatusNotFound {
		t.Errorf("GET /: %d, want 404", code)
	}
}

func TestMetrics_NoListenerWhenEmpty(t *testing.T) {
	addr, stop, err := serveMetrics(MetricsConfig{}, http.NotFoundHandler(), slog.New(slog.DiscardHandler))
	if err != nil || addr != nil {
		t.Fatalf("addr %v err %v", addr, err)
	}
	stop()
}
