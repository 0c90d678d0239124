package mx

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestZZHangCorpus(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(os.Getenv("HOME"), ".cache/go-build/fuzz/github.com/batonmail/baton/mx/FuzzNormalizeDomain/*"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		lines := strings.Split(strings.TrimSpace(string(b)), "\n")
		q := strings.TrimSuffix(strings.TrimPrefix(lines[1], "string("), ")")
		s, err := strconv.Unquote(q)
		if err != nil {
			t.Logf("skip %s: %v", f, err)
			continue
		}
		done := make(chan struct{})
		go func() { normalizeDomain(s); close(done) }()
		select {
		case <-done:
		case <-time.After(2 * time.Second):
			t.Fatalf("hang on %q", s)
		}
	}
	t.Logf("%d files", len(files))
}
