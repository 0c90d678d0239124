package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

var keyRE = regexp.MustCompile(`(?m)^id:\s+(\S+)\s*\n.*\nkey:\s+(\S+)`)

// TestRelayd_APIKeys_SendSandboxRevoke drives the built relayd: keys made
// with "relayd apikey create" authenticate with AUTH PLAIN under the user
// "apikey"; a sandbox key's mail is accepted and held, never delivered; a
// revoked key is refused 535 5.7.8 (the running relayd picks the change up
// without a restart).
func TestRelayd_APIKeys_SendSandboxRevoke(t *testing.T) {
	requireExternal(t, "swaks")
	dest := startSink(t, "smarthost.test")
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
`, dest.port))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	create := func(args ...string) (id, key string) {
		out, err := r.runCmd(ctx, nil, append([]string{"apikey", "create"}, args...)...)
		m := keyRE.FindStringSubmatch(out)
		if err != nil || m == nil {
			t.Fatalf("apikey create %v: %v\n%s", args, err, out)
		}
		return m[1], m[2]
	}
	_, sendKey := create("app")
	sbID, sbKey := create("-scopes", "send:sandbox", "staging")

	send := func(key, to string) (string, error) {
		return swaks(t, "--server", r.addr, "--tls", "--auth", "PLAIN", "--auth-user", "apikey", "--auth-password", key,
			"--from", "app@sender.test", "--to", to)
	}
	// The running relayd notices the changed key file within seconds.
	deadline := time.Now().Add(15 * time.Second)
	for {
		out, err := send(sendKey, "live@dest.test")
		if err == nil {
			break
		}
		if !strings.Contains(out, "535 5.7.8") || time.Now().After(deadline) {
			t.Fatalf("send key refused: %v\n%s", err, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	out, err := send(sbKey, "captured@dest.test")
	if err != nil {
		t.Fatalf("sandbox key refused: %v\n%s", err, out)
	}
	m := regexp.MustCompile(`queued as (\S+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no queue ID for the sandbox message:\n%s", out)
	}
	dest.wait(1, 20*time.Second)
	time.Sleep(300 * time.Millisecond)
	for _, msg := range dest.messages() {
		if msg.To[0] == "captured@dest.test" {
			t.Fatal("sandbox mail was delivered")
		}
	}
	show, err := r.runCmd(ctx, nil, "queue", "show", m[1])
	if err != nil || !strings.Contains(show, "held") {
		t.Fatalf("sandbox message not held in the queue: %v\n%s", err, show)
	}

	if out, err := r.runCmd(ctx, nil, "apikey", "revoke", sbID); err != nil {
		t.Fatalf("revoke: %v\n%s", err, out)
	}
	deadline = time.Now().Add(15 * time.Second)
	for {
		out, _ = send(sbKey, "again@dest.test")
		if strings.Contains(out, "535 5.7.8") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("revoked key still accepted:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}
