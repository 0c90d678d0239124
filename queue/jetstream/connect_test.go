package jetstream_test

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/queue/jetstream"
)

func tryOpen(cfg jetstream.Config) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	q, err := jetstream.Open(ctx, cfg)
	if err == nil {
		q.Close()
	}
	return err
}

// TestOpen_UserPassword: a server with users refuses a wrong password and
// takes the right one.
func TestOpen_UserPassword(t *testing.T) {
	url := startNATS(t, func(o *server.Options) { o.Username, o.Password = "relay", "s3cret" })
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix(), User: "relay", Password: "wrong"}); err == nil {
		t.Fatal("Open with a wrong password succeeded")
	}
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix()}); err == nil {
		t.Fatal("Open without credentials succeeded")
	}
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix(), User: "relay", Password: "s3cret"}); err != nil {
		t.Fatalf("Open with the right password: %v", err)
	}
}

// TestOpen_TLS: a server that requires TLS is reached with CAFile or a
// tls.Config that trusts its CA, and not with one that does not.
func TestOpen_TLS(t *testing.T) {
	ca := testcert.NewCA()
	leaf := ca.Leaf("localhost")
	url := startNATS(t, func(o *server.Options) {
		o.TLS = true
		o.TLSTimeout = 5
		o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12}
	})
	url = strings.Replace(url, "nats://", "tls://", 1)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix(), CAFile: caFile}); err != nil {
		t.Fatalf("Open with CAFile: %v", err)
	}
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix(), TLS: &tls.Config{RootCAs: ca.Pool}}); err != nil {
		t.Fatalf("Open with TLS config: %v", err)
	}
	if err := tryOpen(jetstream.Config{URL: url, Prefix: uniquePrefix(), TLS: &tls.Config{RootCAs: testcert.NewCA().Pool}}); err == nil {
		t.Fatal("Open trusting another CA succeeded")
	}
}
