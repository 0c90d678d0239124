package queueadmin

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/batonmail/baton/queue"
)

type env struct {
	data string
	qdir string
	q    *queue.Dir
	stop func()
	ctx  context.Context
}

func envelope(from string, to ...string) *queue.Envelope {
	e := &queue.Envelope{From: from}
	for _, a := range to {
		e.To = append(e.To, queue.Recipient{Addr: a})
	}
	return e
}

// newEnv opens a Dir queue in a data directory and serves it, as relayd
// does.
func newEnv(t *testing.T, serve bool) *env {
	t.Helper()
	data := t.TempDir()
	e := &env{data: data, qdir: filepath.Join(data, "queue"), ctx: context.Background()}
	q, err := queue.OpenDir(queue.DirConfig{Path: e.qdir, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	e.q = q
	t.Cleanup(func() { q.Close() })
	if serve {
		stop, err := Serve(e.ctx, q, SocketPath(data), nil)
		if err != nil {
			t.Fatal(err)
		}
		e.stop = stop
		t.Cleanup(stop)
	}
	return e
}

func (e *env) enqueue(t *testing.T, env *queue.Envelope) queue.ID {
	t.Helper()
	id, err := e.q.Enqueue(e.ctx, env, strings.NewReader("Subject: x\r\n\r\nbody\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func (e *env) run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := Run(e.ctx, CommandConfig{Socket: SocketPath(e.data), QueueDir: e.qdir}, args, &out, &errb)
	return out.String() + errb.String(), err
}

func TestClient_AllOperationsOverSocket(t *testing.T) {
	e := newEnv(t, true)
	a := e.enqueue(t, envelope("alice@example.test", "x@one.test", "y@two.test"))
	b := e.enqueue(t, envelope("", "z@two.test"))
	c, err := Dial(e.ctx, SocketPath(e.data))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	m, err := c.Get(e.ctx, a)
	if err != nil || m.ID != a || m.Envelope.From != "alice@example.test" || len(m.Recipients) != 2 || m.State != queue.StateQueued {
		t.Fatalf("Get = %+v, %v", m, err)
	}
	if _, err := c.Get(e.ctx, "NOSUCHID"); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("Get of an unknown ID over the socket = %v, want ErrNotFound", err)
	}
	var ids []queue.ID
	collect := func(m *queue.Message) error { ids = append(ids, m.ID); return nil }
	if err := c.List(e.ctx, queue.Filter{Domain: "two.test"}, collect); err != nil || len(ids) != 2 {
		t.Errorf("List(domain two.test) = %v, %v", ids, err)
	}
	ids = nil
	if err := c.List(e.ctx, queue.Filter{Null: true}, collect); err != nil || !slices.Equal(ids, []queue.ID{b}) {
		t.Errorf("List(null) = %v, %v", ids, err)
	}
	if err := c.Hold(e.ctx, a); err != nil {
		t.Fatal(err)
	}
	ids = nil
	if err := c.List(e.ctx, queue.Filter{State: queue.StateHeld}, collect); err != nil || !slices.Equal(ids, []queue.ID{a}) {
		t.Errorf("List(held) = %v, %v", ids, err)
	}
	s, err := c.Stats(e.ctx)
	if err != nil || s.ByState[queue.StateHeld] != 1 || s.ByState[queue.StateQueued] != 1 || s.ByDomain["two.test"] != 2 {
		t.Errorf("Stats = %+v, %v", s, err)
	}
	if err := c.Release(e.ctx, a); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Retry(e.ctx, queue.Filter{Domain: "one.test"}); err != nil || n != 1 {
		t.Errorf("Retry(domain) = %d, %v", n, err)
	}
	if err := c.Delete(e.ctx, b); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(e.ctx, b); !errors.Is(err, queue.ErrNotFound) {
		t.Errorf("second Delete = %v, want ErrNotFound", err)
	}
	if _, err := e.q.Get(e.ctx, b); !errors.Is(err, queue.ErrNotFound) {
		t.Error("Delete over the socket did not reach the queue")
	}
	qs, err := c.Quarantined(e.ctx)
	if err != nil || len(qs) != 0 {
		t.Errorf("Quarantined = %v, %v", qs, err)
	}
}

func TestServe_SocketMode0600_StaleReplaced_LiveRefused(t *testing.T) {
	e := newEnv(t, true)
	st, err := os.Stat(SocketPath(e.data))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Errorf("socket mode %v, want a 0600 socket", st.Mode())
	}
	if _, err := Serve(e.ctx, e.q, SocketPath(e.data), nil); err == nil {
		t.Fatal("second Serve on a live socket succeeded")
	}
	e.stop()
	if _, err := os.Stat(SocketPath(e.data)); !errors.Is(err, os.ErrNotExist) {
		t.Error("stop left the socket file")
	}
	// A stale file (a crashed relayd) is replaced.
	os.WriteFile(SocketPath(e.data), nil, 0o600)
	stop, err := Serve(e.ctx, e.q, SocketPath(e.data), nil)
	if err != nil {
		t.Fatalf("Serve over a stale socket file: %v", err)
	}
	stop()
	stop() // idempotent
}

func TestServe_StopsWithContext(t *testing.T) {
	data := t.TempDir()
	q := queue.NewMemory(queue.MemoryConfig{})
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := Serve(ctx, q, SocketPath(data), nil); err != nil {
		t.Fatal(err)
	}
	cancel()
	for {
		if _, err := os.Stat(SocketPath(data)); errors.Is(err, os.ErrNotExist) {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if _, err := Dial(context.Background(), SocketPath(data)); !errors.Is(err, ErrNoServer) {
		t.Errorf("Dial after ctx cancelled = %v, want ErrNoServer", err)
	}
}

func TestRun_Commands_ThroughRunningRelay(t *testing.T) {
	e := newEnv(t, true)
	a := e.enqueue(t, envelope("alice@example.test", "x@one.test"))
	b := e.enqueue(t, envelope("bob@example.test", "y@two.test"))

	out, err := e.run(t, "list")
	if err != nil || !strings.Contains(out, string(a)) || !strings.Contains(out, string(b)) || !strings.Contains(out, "2 message(s)") {
		t.Fatalf("list: %v\n%s", err, out)
	}
	out, err = e.run(t, "list", "-sender", "ALICE@example.test", "-json")
	if err != nil {
		t.Fatal(err)
	}
	var m queue.Message
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 1 || json.Unmarshal([]byte(lines[0]), &m) != nil || m.ID != a {
		t.Fatalf("list -sender -json:\n%s", out)
	}
	if !strings.Contains(out, `"State":"queued"`) {
		t.Errorf("JSON state is not a name: %s", out)
	}
	if out, err = e.run(t, "hold", string(a)); err != nil || !strings.Contains(out, "held") {
		t.Fatalf("hold: %v %s", err, out)
	}
	out, _ = e.run(t, "list", "-state", "held")
	if !strings.Contains(out, string(a)) || strings.Contains(out, string(b)) {
		t.Errorf("list -state held:\n%s", out)
	}
	if out, err = e.run(t, "show", string(a)); err != nil || !strings.Contains(out, "x@one.test: pending") || !strings.Contains(out, "State:     held") {
		t.Errorf("show: %v\n%s", err, out)
	}
	if out, err = e.run(t, "stats"); err != nil || !strings.Contains(out, "messages: 2") || !strings.Contains(out, "held:     1") {
		t.Errorf("stats: %v\n%s", err, out)
	}
	if out, err = e.run(t, "release", string(a)); err != nil {
		t.Errorf("release: %v %s", err, out)
	}
	if out, err = e.run(t, "retry", "-all"); err != nil || !strings.Contains(out, "2 message(s) due now") {
		t.Errorf("retry -all: %v %s", err, out)
	}
	if out, err = e.run(t, "delete", string(b), "NOSUCHID"); err == nil || !errors.Is(err, queue.ErrNotFound) || !strings.Contains(out, "deleted") {
		t.Errorf("delete with one unknown ID: %v\n%s", err, out)
	}
	if out, err = e.run(t, "list", "-older", "1h"); err != nil || !strings.Contains(out, "0 message(s)") {
		t.Errorf("list -older 1h: %v\n%s", err, out)
	}
	out, err = e.run(t, "quarantine")
	if err != nil || !strings.Contains(out, "0 quarantined") {
		t.Errorf("quarantine: %v %s", err, out)
	}
}

func TestRun_BadArguments(t *testing.T) {
	e := newEnv(t, true)
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"hold"},
		{"retry"},
		{"retry", "-all", "-domain", "x.test"},
		{"list", "-state", "bogus"},
		{"list", "-nosuchflag"},
	} {
		if out, err := e.run(t, args...); err == nil {
			t.Errorf("%q succeeded:\n%s", args, out)
		}
	}
	if _, err := e.run(t, "-h"); !errors.Is(err, errFlagHelp()) {
		t.Errorf("-h = %v, want flag.ErrHelp", err)
	}
}

func TestRun_NoQueueDirectory_NotCreated(t *testing.T) {
	data := t.TempDir()
	qdir := filepath.Join(data, "queue")
	var out bytes.Buffer
	err := Run(context.Background(), CommandConfig{Socket: SocketPath(data), QueueDir: qdir}, []string{"stats"}, &out, &out)
	if err == nil {
		t.Fatal("stats on a missing queue succeeded")
	}
	if _, err := os.Stat(qdir); !errors.Is(err, os.ErrNotExist) {
		t.Error("the command created a queue directory")
	}
}

func TestRun_NoRelay_OpensDirectoryDirectly(t *testing.T) {
	e := newEnv(t, false)
	a := e.enqueue(t, envelope("alice@example.test", "x@one.test"))
	// While the queue is open (a relayd without a socket), the command
	// refuses rather than racing it.
	if out, err := e.run(t, "list"); !errors.Is(err, queue.ErrLocked) {
		t.Fatalf("list on a locked queue: %v\n%s", err, out)
	}
	e.q.Close()
	out, err := e.run(t, "hold", string(a))
	if err != nil || !strings.Contains(out, "held") {
		t.Fatalf("hold without relayd: %v %s", err, out)
	}
	out, err = e.run(t, "list", "-state", "held")
	if err != nil || !strings.Contains(out, string(a)) {
		t.Fatalf("list without relayd: %v\n%s", err, out)
	}
	// The command released the lock.
	q, err := queue.OpenDir(queue.DirConfig{Path: e.qdir})
	if err != nil {
		t.Fatalf("OpenDir after the command: %v", err)
	}
	defer q.Close()
	if m, err := q.Get(e.ctx, a); err != nil || m.State != queue.StateHeld {
		t.Errorf("hold made without relayd not kept: %v %v", m, err)
	}
}

func errFlagHelp() error { return flag.ErrHelp }

// statsFails is a queue whose Stats fails with an internal error naming
// a path.
type statsFails struct{ queue.Admin }

func (statsFails) Stats(context.Context) (*queue.Stats, error) {
	return nil, errors.New("open /secret/queue/index: permission denied")
}

func (statsFails) List(context.Context, queue.Filter, func(*queue.Message) error) error {
	return errors.New("read /secret/queue/msg: I/O error")
}

// An internal error is answered 500 without its text, which only the log
// gets; a queue sentinel error keeps its status, kind and text.
func TestHandler_InternalErrorsHideDetails(t *testing.T) {
	var logBuf bytes.Buffer
	h := Handler(statsFails{queue.NewMemory(queue.MemoryConfig{})}, slog.New(slog.NewTextHandler(&logBuf, nil)))
	for _, path := range []string{"/v1/stats", "/v1/list"} {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if rec.Code != http.StatusInternalServerError {
			t.Fatalf("%s: status %d, want 500", path, rec.Code)
		}
		if strings.Contains(rec.Body.String(), "/secret") || !strings.Contains(rec.Body.String(), InternalErrorText) {
			t.Errorf("%s: body %q", path, rec.Body.String())
		}
	}
	if !strings.Contains(logBuf.String(), "/secret/queue/index") || !strings.Contains(logBuf.String(), "/secret/queue/msg") {
		t.Errorf("log lacks the errors: %s", logBuf.String())
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/get?id=nosuch", nil))
	var body errorBody
	if err := json.NewDecoder(rec.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	if rec.Code != http.StatusNotFound || body.Kind != "not_found" || body.Error == InternalErrorText {
		t.Errorf("get of a missing ID: %d %+v", rec.Code, body)
	}
}
