package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// syncBuffer is an output that goroutines may write while a test reads
// it; writes counts the Write calls.
type syncBuffer struct {
	mu     sync.Mutex
	b      bytes.Buffer
	writes int
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// relayd with [admin] listen set serves the API there, authenticated by a
// token it creates in the data directory and prints once.
func TestServe_AdminListener(t *testing.T) {
	cfg := defaultConfig()
	cfg.DataDir = t.TempDir()
	cfg.SMTP.Listen, cfg.SMTP.ListenTLS = []string{freeAddr(t)}, nil
	cfg.Queue.Backend = "memory"
	cfg.DNS.NoMTASTS = true
	cfg.Admin.Listen = freeAddr(t)
	cfg.fill()

	ctx, cancel := context.WithCancel(context.Background())
	var out syncBuffer
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, slog.New(slog.DiscardHandler), &out, 5*time.Second) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()

	tokenRE := regexp.MustCompile(`created admin token (\S+)`)
	url := "http://" + cfg.Admin.Listen + "/api/v1/stats"
	var token string
	deadline := time.Now().Add(20 * time.Second)
	for {
		if m := tokenRE.FindStringSubmatch(out.String()); m != nil {
			token = m[1]
			if resp, err := http.Get(url); err == nil {
				resp.Body.Close()
				if resp.StatusCode != http.StatusUnauthorized {
					t.Fatalf("without the token: %s", resp.Status)
				}
				break
			}
		}
		select {
		case err := <-done:
			t.Fatalf("serve returned %v:\n%s", err, out.String())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("admin listener not up:\n%s", out.String())
		}
	}
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), `"last_hour"`) {
		t.Fatalf("with the token: %s %s", resp.Status, body)
	}
	// Prometheus metrics are served behind the same token.
	murl := strings.Replace(url, "/api/v1/stats", "/metrics", 1)
	if resp, err := http.Get(murl); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("metrics without the token: %v %v", resp, err)
	}
	req, _ = http.NewRequest("GET", murl, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "baton_queue_messages") {
		t.Fatalf("metrics with the token: %s %.300s", resp.Status, body)
	}

	fi, err := os.Stat(cfg.Admin.TokenFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("token file: %v %v", fi, err)
	}
	// Later starts read the file and print nothing.
	var again bytes.Buffer
	tok2, err := adminToken(cfg, &again)
	if err != nil || tok2 != token || again.Len() != 0 {
		t.Fatalf("second start: token %q (want %q), err %v, printed %q", tok2, token, err, again.String())
	}
}
