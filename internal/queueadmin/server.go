// Package queueadmin serves a queue's Admin operations over a Unix socket
// (HTTP with JSON bodies) and implements the client and the "relayd queue"
// subcommands on top of it.
//
// A running relayd owns its queue directory (the directory lock keeps any
// other process out), so administration goes through the daemon: Serve
// listens on a socket in the data directory, readable and writable by the
// owner only, and Client implements queue.Admin by calling it. When no
// relayd is running, Run opens the queue directory itself, under the same
// lock, so the commands work either way and never race with a daemon.
//
// The protocol is private to baton and may change between versions:
//
//	GET  /v1/list?domain=&sender=&null=1&state=&before=RFC3339  NDJSON of queue.Message
//	GET  /v1/get?id=            one queue.Message
//	POST /v1/hold?id=           /v1/release?id=   /v1/delete?id=
//	POST /v1/retry?id=&domain=  {"count": n}; no parameters retries everything
//	GET  /v1/stats              queue.Stats
//	GET  /v1/quarantine         []queue.QuarantinedFile (backends that quarantine)
//
// Errors are JSON {"error": text, "kind": "not_found"|"closed"|...}; the
// client maps kinds back to the queue package's sentinel errors.
package queueadmin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/batonmail/baton/queue"
)

// Quarantiner is implemented by backends that move damaged files aside
// (queue.Dir does).
type Quarantiner interface {
	Quarantined(ctx context.Context) ([]queue.QuarantinedFile, error)
}

// SocketName is the admin socket's file name in the data directory.
const SocketName = "admin.sock"

// Serve listens on the Unix socket at path (mode 0600) and serves a's
// operations until stop is called or ctx is done. A stale socket file left
// by a crashed process is replaced; a socket that still answers means
// another daemon is running, and Serve fails.
func Serve(ctx context.Context, a queue.Admin, path string, log *slog.Logger) (stop func(), err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("queueadmin: %s is in use by a running process", path)
	}
	os.Remove(path)
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("queueadmin: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("queueadmin: %w", err)
	}
	srv := &http.Server{
		Handler:           Handler(a, log),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return ctx },
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("queue admin socket stopped", "err", err)
		}
	}()
	var once sync.Once
	stopped := make(chan struct{})
	stop = func() {
		// Concurrent callers wait in Do until the first one is done.
		once.Do(func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			srv.Shutdown(sctx)
			<-done
			os.Remove(path)
			close(stopped)
		})
	}
	go func() {
		select {
		case <-ctx.Done():
			stop()
		case <-stopped:
		}
	}()
	return stop, nil
}

// Handler returns the HTTP handler that Serve uses, for tests and for
// programs that serve it elsewhere.
func Handler(a queue.Admin, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &handler{a: a, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/list", h.list)
	mux.HandleFunc("GET /v1/get", h.get)
	mux.HandleFunc("POST /v1/hold", h.idOp(a.Hold))
	mux.HandleFunc("POST /v1/release", h.idOp(a.Release))
	mux.HandleFunc("POST /v1/delete", h.idOp(a.Delete))
	mux.HandleFunc("POST /v1/retry", h.retry)
	mux.HandleFunc("GET /v1/stats", h.stats)
	mux.HandleFunc("GET /v1/quarantine", h.quarantine)
	return mux
}

type handler struct {
	a   queue.Admin
	log *slog.Logger
}

type errorBody struct {
	Error string `json:"error"`
	Kind  string `json:"kind,omitempty"`
}

var kinds = []struct {
	err    error
	kind   string
	status int
}{
	{queue.ErrNotFound, "not_found", http.StatusNotFound},
	{queue.ErrClosed, "closed", http.StatusServiceUnavailable},
	{queue.ErrInvalid, "invalid", http.StatusBadRequest},
	{queue.ErrNoSpace, "no_space", http.StatusInsufficientStorage},
}

// ErrorStatus maps a queue error to the HTTP status and error kind the
// queue API answers with: 500 and no kind for an error that is not one of
// the queue's sentinel errors.
func ErrorStatus(err error) (status int, kind string) {
	for _, k := range kinds {
		if errors.Is(err, k.err) {
			return k.status, k.kind
		}
	}
	return http.StatusInternalServerError, ""
}

// InternalErrorText is what the queue API (and the admin API that mounts
// it) answers for an internal error, whose details (paths, backend
// messages) go to the log only.
const InternalErrorText = "internal error; the details are in relayd's log"

func (h *handler) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, body := h.errorBody(r, err)
	writeJSON(w, status, body)
}

// errorBody is the answer to err; an internal error is logged in full and
// answered with InternalErrorText.
func (h *handler) errorBody(r *http.Request, err error) (int, errorBody) {
	status, kind := ErrorStatus(err)
	if status == http.StatusInternalServerError {
		h.log.Error("queue admin request failed", "path", r.URL.Path, "err", err)
		return status, errorBody{Error: InternalErrorText}
	}
	return status, errorBody{Error: err.Error(), Kind: kind}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// filterFromQuery decodes the list/retry filter parameters.
func filterFromQuery(r *http.Request) (queue.Filter, error) {
	v := r.URL.Query()
	f := queue.Filter{ID: queue.ID(v.Get("id")), Domain: v.Get("domain"), Sender: v.Get("sender"), Null: v.Get("null") == "1"}
	if s := v.Get("state"); s != "" {
		st, ok := queue.ParseState(s)
		if !ok {
			return f, fmt.Errorf("%w: unknown state %q", queue.ErrInvalid, s)
		}
		f.State = st
	}
	if s := v.Get("before"); s != "" {
		t, err := time.Parse(time.RFC3339Nano, s)
		if err != nil {
			return f, fmt.Errorf("%w: bad time %q", queue.ErrInvalid, s)
		}
		f.ReceivedBefore = t
	}
	return f, nil
}

func (h *handler) list(w http.ResponseWriter, r *http.Request) {
	f, err := filterFromQuery(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	started := false
	err = h.a.List(r.Context(), f, func(m *queue.Message) error {
		started = true
		return enc.Encode(m)
	})
	if err != nil {
		if !started {
			h.fail(w, r, err)
			return
		}
		// Headers are gone: end the stream with an error line.
		_, body := h.errorBody(r, err)
		enc.Encode(map[string]string{"error": body.Error})
	}
}

func (h *handler) get(w http.ResponseWriter, r *http.Request) {
	m, err := h.a.Get(r.Context(), queue.ID(r.URL.Query().Get("id")))
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, m)
}

func (h *handler) idOp(op func(context.Context, queue.ID) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := op(r.Context(), queue.ID(r.URL.Query().Get("id"))); err != nil {
			h.fail(w, r, err)
			return
		}
		writeJSON(w, http.StatusOK, struct{}{})
	}
}

func (h *handler) retry(w http.ResponseWriter, r *http.Request) {
	f, err := filterFromQuery(r)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	n, err := h.a.Retry(r.Context(), f)
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]int{"count": n})
}

func (h *handler) stats(w http.ResponseWriter, r *http.Request) {
	s, err := h.a.Stats(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, s)
}

func (h *handler) quarantine(w http.ResponseWriter, r *http.Request) {
	qa, ok := h.a.(Quarantiner)
	if !ok {
		writeJSON(w, http.StatusOK, []queue.QuarantinedFile{})
		return
	}
	files, err := qa.Quarantined(r.Context())
	if err != nil {
		h.fail(w, r, err)
		return
	}
	if files == nil {
		files = []queue.QuarantinedFile{}
	}
	writeJSON(w, http.StatusOK, files)
}
