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
