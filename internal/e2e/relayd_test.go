package e2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// relaydBin is the relayd binary built once for the tests in this package.
var (
	relaydOnce sync.Once
	relaydPath string
	relaydErr  error
)

func buildRelayd(t testing.TB) string {
	t.Helper()
	relaydOnce.Do(func() {
		dir, err := os.MkdirTemp("", "baton-e2e-bin-")
		if err != nil {
			relaydErr = err
			return
		}
		relaydPath = filepath.Join(dir, "relayd")
		out, err := exec.Command("go", "build", "-o", relaydPath, "github.com/batonmail/baton/examples/relayd").CombinedOutput()
		if err != nil {
			relaydErr = fmt.Errorf("go build relayd: %v\n%s", err, out)
		}
	})
	if relaydErr != nil {
		t.Fatal(relaydErr)
	}
	return relaydPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if relaydPath != "" {
		os.RemoveAll(filepath.Dir(relaydPath))
	}
	if natsBinPath != "" {
		os.RemoveAll(filepath.Dir(natsBinPath))
	}
	os.Exit(code)
}

// requireExternal skips a test whose external program is missing, unless
// BATON_REQUIRE_EXTERNAL is set (as .ci/run does): then it fails.
func requireExternal(t testing.TB, prog string) string {
	t.Helper()
	p, err := exec.LookPath(prog)
	if err != nil {
		if os.Getenv("BATON_REQUIRE_EXTERNAL") != "" {
			t.Fatalf("%s is required (BATON_REQUIRE_EXTERNAL is set) but not installed: %v", prog, err)
		}
		t.Skipf("%s not installed (run .ci/run to install it)", prog)
	}
	return p
}

// relayd is a running relayd process.
type relayd struct {
	t        testing.TB
	cmd      *exec.Cmd
	dir      string // data directory
	cfgPath  string
	addr     string // STARTTLS listener
	tlsAddr  string // implicit TLS listener
	password string // first user's password, from the first start
	out      *lockedBuffer
	done     chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func freeAddr(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// newRelayd writes a configuration (extra is appended TOML) and starts
// relayd on it.
func newRelayd(t testing.TB, dataDir, extra string) *relayd {
	t.Helper()
	bin := buildRelayd(t)
	r := &relayd{t: t, dir: dataDir, addr: freeAddr(t), tlsAddr: freeAddr(t)}
	r.cfgPath = filepath.Join(filepath.Dir(dataDir), filepath.Base(dataDir)+".toml")
	conf := fmt.Sprintf(`hostname = "relay.test"
data_dir = %q
[smtp]
listen = [%q]
listen_tls = [%q]
`, dataDir, r.addr, r.tlsAddr) + extra
	if !strings.Contains(extra, "[log]") {
		conf += "[log]\nlevel = \"info\"\n"
	}
	if err := os.WriteFile(r.cfgPath, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	_ = bin
	r.start()
	t.Cleanup(r.stop)
	return r
}

var passwordRE = regexp.MustCompile(`created user "admin" with password (\S+)`)

func (r *relayd) start() {
	r.t.Helper()
	r.out = &lockedBuffer{}
	r.cmd = exec.Command(relaydPath, "-config", r.cfgPath)
	r.cmd.Stdout = r.out
	r.cmd.Stderr = r.out
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.done = make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) { cmd.Wait(); close(done) }(r.cmd, r.done)
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", r.addr, time.Second)
		if err == nil {
			c.Close()
			if m := passwordRE.FindStringSubmatch(r.out.String()); m != nil && r.password == "" {
				r.password = m[1]
			}
			return
		}
		select {
		case <-r.done:
			r.t.Fatalf("relayd exited at start:\n%s", r.out.String())
		case <-time.After(20 * time.Millisecond):
		}
	}
	r.t.Fatalf("relayd did not listen on %s:\n%s", r.addr, r.out.String())
}

// kill stops relayd with SIGKILL, as a crash would.
func (r *relayd) kill() {
	r.cmd.Process.Signal(syscall.SIGKILL)
	<-r.done
}

// stop stops relayd with SIGTERM and waits for it to drain.
func (r *relayd) stop() {
	if r.cmd == nil || r.cmd.ProcessState != nil {
		return
	}
	select {
	case <-r.done:
		return
	default:
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(40 * time.Second):
		r.cmd.Process.Kill()
		<-r.done
		r.t.Errorf("relayd did not stop on SIGTERM:\n%s", r.out.String())
	}
}

// runCmd runs a relayd subcommand against the same configuration.
func (r *relayd) runCmd(ctx context.Context, stdin io.Reader, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, relaydPath, append([]string{"-config", r.cfgPath}, args...)...)
	cmd.Stdin = stdin
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// swaks runs swaks and returns its transcript.
func swaks(t testing.TB, args ...string) (string, error) {
	t.Helper()
	bin := requireExternal(t, "swaks")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
	return string(out), err
}

// lastReply returns the last server reply line swaks printed that matches
// the given command's answer (lines starting "<~ " or "<** ").
func replyLines(transcript string) []string {
	var out []string
	sc := bufio.NewScanner(strings.NewReader(transcript))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		for _, p := range []string{"<~* ", "<** ", "<~ ", "<- "} {
			if strings.HasPrefix(line, p) {
				out = append(out, strings.TrimSpace(strings.TrimPrefix(line, p)))
			}
		}
	}
	return out
}

func TestRelayd_Swaks_UnauthenticatedRefused_AuthenticatedDelivered(t *testing.T) {
	requireExternal(t, "swaks")
	dest := startSink(t, "smarthost.test")
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
`, dest.port))
	if r.password == "" {
		t.Fatalf("relayd printed no first password:\n%s", r.out.String())
	}

	// Without AUTH, relaying to a foreign domain is refused with 5.7.x.
	out, err := swaks(t, "--server", r.addr, "--tls", "--from", "app@sender.test", "--to", "victim@foreign.test", "--suppress-data")
	if err == nil {
		t.Fatalf("unauthenticated relay accepted:\n%s", out)
	}
	refused := false
	for _, l := range replyLines(out) {
		if regexp.MustCompile(`^5\d\d 5\.7\.\d+ `).MatchString(l) {
			refused = true
		}
	}
	if !refused {
		t.Fatalf("no 5xx 5.7.x refusal in transcript:\n%s", out)
	}

	// With AUTH PLAIN over STARTTLS it is queued and delivered.
	out, err = swaks(t, "--server", r.addr, "--tls", "--auth", "PLAIN", "--auth-user", "admin", "--auth-password", r.password,
		"--from", "app@sender.test", "--to", "rcpt@dest.test", "--header", "Subject: swaks e2e")
	if err != nil {
		t.Fatalf("authenticated submission failed: %v\n%s", err, out)
	}
	if !strings.Contains(out, "250 2.0.0 OK queued as") {
		t.Fatalf("no queued reply:\n%s", out)
	}
	// AUTH LOGIN over implicit TLS as well.
	out, err = swaks(t, "--server", r.tlsAddr, "--tlsc", "--auth", "LOGIN", "--auth-user", "admin", "--auth-password", r.password,
		"--from", "app@sender.test", "--to", "rcpt2@dest.test")
	if err != nil {
		t.Fatalf("AUTH LOGIN over implicit TLS failed: %v\n%s", err, out)
	}
	msgs := dest.wait(2, 20*time.Second)
	got := map[string]bool{}
	for _, m := range msgs {
		got[m.To[0]] = true
		if m.From != "app@sender.test" {
			t.Errorf("sender at destination = %q", m.From)
		}
	}
	if !got["rcpt@dest.test"] || !got["rcpt2@dest.test"] {
		t.Fatalf("delivered to %v", got)
	}
	if strings.Contains(r.out.String(), r.password) && strings.Count(r.out.String(), r.password) > 1 {
		t.Fatalf("password appears in logs:\n%s", r.out.String())
	}

	// A wrong password is 535 5.7.8.
	out, _ = swaks(t, "--server", r.addr, "--tls", "--auth", "PLAIN", "--auth-user", "admin", "--auth-password", "wrong",
		"--from", "app@sender.test", "--to", "rcpt@dest.test")
	if !strings.Contains(out, "535 5.7.8") {
		t.Fatalf("bad password not answered 535 5.7.8:\n%s", out)
	}
}
