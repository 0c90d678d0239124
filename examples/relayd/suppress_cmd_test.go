package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/relay"
)

func runSuppress(t *testing.T, cfg *Config, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := runSuppressCmd(context.Background(), cfg, args, &out, &errb)
	return out.String(), errb.String(), err
}

func TestSuppressCmd_AddListRemove(t *testing.T) {
	cfg := &Config{DataDir: t.TempDir()}
	if _, _, err := runSuppress(t, cfg, "add", "-reason", "bounced in 2025", "A@x.test", "b@x.test"); err != nil {
		t.Fatal(err)
	}
	out, _, err := runSuppress(t, cfg, "list")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "A@x.test\t") || !strings.Contains(out, "b@x.test\t") || !strings.Contains(out, "bounced in 2025") {
		t.Errorf("list output:\n%s", out)
	}

	// The relay's store sees what the command wrote, case-insensitively.
	store, err := relay.OpenSuppressionDir(suppressionDir(cfg), relay.SuppressionConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, err := store.Lookup(context.Background(), "a@X.TEST"); !ok || err != nil {
		t.Fatalf("relay store Lookup = %v, %v", ok, err)
	}

	if _, _, err := runSuppress(t, cfg, "remove", "a@x.test"); err != nil {
		t.Fatal(err)
	}
	out, _, err = runSuppress(t, cfg, "list", "-json")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1 {
		t.Fatalf("json list has %d lines:\n%s", len(lines), out)
	}
	var s relay.Suppression
	if err := json.Unmarshal([]byte(lines[0]), &s); err != nil || s.Addr != "b@x.test" {
		t.Errorf("json entry %q: %+v, %v", lines[0], s, err)
	}
	if _, ok, _ := store.Lookup(context.Background(), "a@x.test"); ok {
		t.Error("removed entry still found by the relay store")
	}
}

func TestSuppressCmd_Errors(t *testing.T) {
	cfg := &Config{DataDir: t.TempDir()}
	for _, args := range [][]string{nil, {"bogus"}, {"add"}, {"remove"}, {"list", "-nope"}} {
		_, stderr, err := runSuppress(t, cfg, args...)
		if err == nil {
			t.Errorf("suppress %v: no error", args)
		}
		if !strings.Contains(stderr, "usage: relayd suppress") {
			t.Errorf("suppress %v: usage not printed, stderr %q", args, stderr)
		}
	}
}

func TestSuppressCmd_Prune(t *testing.T) {
	cfg := &Config{DataDir: t.TempDir()}
	if _, _, err := runSuppress(t, cfg, "add", "-ttl", "1ns", "old@x.test"); err != nil {
		t.Fatal(err)
	}
	out, _, err := runSuppress(t, cfg, "prune")
	if err != nil || !strings.Contains(out, "pruned 1 ") {
		t.Errorf("prune = %q, %v", out, err)
	}
}

func TestOpenSuppressions(t *testing.T) {
	cfg := &Config{DataDir: t.TempDir()}
	if s, err := openSuppressions(cfg, SuppressConfig{Disabled: true}); s != nil || err != nil {
		t.Errorf("disabled: %v, %v", s, err)
	}
	if _, err := openSuppressions(cfg, SuppressConfig{TTL: "soon"}); err == nil {
		t.Error("bad ttl accepted")
	}
	s, err := openSuppressions(cfg, SuppressConfig{TTL: "1h"})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Add(context.Background(), relay.Suppression{Addr: "x@y.test"}); err != nil {
		t.Fatal(err)
	}
	got, ok, err := s.Lookup(context.Background(), "x@y.test")
	if !ok || err != nil || got.Expires.Sub(got.Created) != time.Hour {
		t.Errorf("entry = %+v, %v, %v", got, ok, err)
	}
	out, _, err := runSuppress(t, cfg, "list")
	if err != nil || !strings.HasPrefix(out, "x@y.test\t") {
		t.Errorf("the subcommand does not see the relay's entry: %q, %v", out, err)
	}
}
