package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/batonmail/baton/internal/queueadmin"
	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

type errorBody struct {
	Error string `json:"error"`
	Kind  string `json:"kind,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// errStatus maps an error to an HTTP status and an error kind: the queue
// API's for queue errors, the same kinds for the admin API's own.
func errStatus(err error) (int, string) {
	switch {
	case errors.Is(err, errNoSuppressions):
		return http.StatusNotFound, "not_found"
	case errors.Is(err, errBadRequest):
		return http.StatusBadRequest, "invalid"
	}
	return queueadmin.ErrorStatus(err)
}

var (
	errNoSuppressions = errors.New("admin: no suppression list configured")
	errBadRequest     = errors.New("admin: bad request")
)

// errText is what a client is told of err: internal errors are logged in
// full and answered without their details (paths, backend messages).
func (s *Server) errText(r *http.Request, status int, err error) string {
	if status != http.StatusInternalServerError {
		return err.Error()
	}
	s.log.Error("admin request failed", "path", r.URL.Path, "err", err)
	return queueadmin.InternalErrorText
}

func (s *Server) fail(w http.ResponseWriter, r *http.Request, err error) {
	status, kind := errStatus(err)
	writeJSON(w, status, errorBody{Error: s.errText(r, status, err), Kind: kind})
}

// StatsView is the overview: the queue now and the last hour.
type StatsView struct {
	// Time is when the view was taken.
	Time time.Time `json:"time"`
	// Queue is the queue's statistics.
	Queue *queue.Stats `json:"queue"`
	// Depth counts messages in the queue, in every state.
	Depth int `json:"depth"`
	// LastHour is the last hour's activity (empty without a Recorder).
	LastHour Window `json:"last_hour"`
}

// stats samples the queue (recording the depth) and returns the overview.
func (s *Server) stats(ctx context.Context) (*StatsView, error) {
	var st *queue.Stats
	var err error
	if s.cfg.Recorder != nil {
		st, err = s.cfg.Recorder.Sample(ctx)
	}
	if st == nil && err == nil {
		st, err = s.cfg.Queue.Stats(ctx)
	}
	if err != nil {
		return nil, err
	}
	v := &StatsView{Time: s.cfg.Now().UTC(), Queue: st}
	if v.Queue.ByState == nil {
		v.Queue.ByState = map[queue.State]int{}
	}
	for _, state := range queue.States() {
		v.Queue.ByState[state] += 0 // every state is present, zero or not
		v.Depth += v.Queue.ByState[state]
	}
	if s.cfg.Recorder != nil {
		v.LastHour = s.cfg.Recorder.Window()
	} else {
		v.LastHour = NewRecorder(RecorderConfig{Now: s.cfg.Now}).Window()
	}
	return v, nil
}

func (s *Server) apiStats(w http.ResponseWriter, r *http.Request) {
	v, err := s.stats(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// DestinationRow is one line of the destinations table.
type DestinationRow struct {
	DestinationActivity
	// Queued counts pending recipients in the queue at the destination's
	// domains.
	Queued int `json:"queued"`
	// InFlight counts deliveries to it in progress, of at most Max.
	InFlight int `json:"in_flight"`
	Max      int `json:"max"`
}

// destinations joins the Recorder's activity, the relay's slots and the
// queue's pending recipients per domain. A domain with pending recipients
// and no recorded attempt gets a row of its own keyed "domain:NAME".
func (s *Server) destinations(ctx context.Context) ([]DestinationRow, error) {
	st, err := s.cfg.Queue.Stats(ctx)
	if err != nil {
		return nil, err
	}
	rows := map[string]*DestinationRow{}
	row := func(key string) *DestinationRow {
		d := rows[key]
		if d == nil {
			d = &DestinationRow{DestinationActivity: DestinationActivity{Dest: key}}
			rows[key] = d
		}
		return d
	}
	if s.cfg.Recorder != nil {
		for _, a := range s.cfg.Recorder.Destinations() {
			row(a.Dest).DestinationActivity = a
		}
	}
	if s.cfg.Status != nil {
		for _, d := range s.cfg.Status.Destinations() {
			r := row(d.Key)
			// Each stream has its own slots; the row shows them all.
			r.InFlight += d.InFlight
			r.Max += d.Max
			if len(r.Domains) == 0 {
				if dom, ok := strings.CutPrefix(d.Key, "mx:"); ok {
					dom, _, _ = strings.Cut(dom, "|")
					r.Domains = []string{dom}
				}
			}
		}
	}
	covered := map[string]bool{}
	for _, r := range rows {
		for _, dom := range r.Domains {
			r.Queued += st.ByDomain[dom]
			covered[dom] = true
		}
	}
	for dom, n := range st.ByDomain {
		if !covered[dom] && n > 0 {
			r := row("domain:" + dom)
			r.Domains = []string{dom}
			r.Queued = n
		}
	}
	out := make([]DestinationRow, 0, len(rows))
	for _, r := range rows {
		if r.Domains == nil {
			r.Domains = []string{}
		}
		out = append(out, *r)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Queued != out[j].Queued {
			return out[i].Queued > out[j].Queued
		}
		return out[i].Dest < out[j].Dest
	})
	return out, nil
}

func (s *Server) apiDestinations(w http.ResponseWriter, r *http.Request) {
	rows, err := s.destinations(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, rows)
}

// MessageSummary is one search result.
type MessageSummary struct {
	ID   queue.ID `json:"id"`
	From string   `json:"from"`
	To   []string `json:"to"`
	// State is the queue state, or "done" for a message no longer in the
	// queue (known from the Recorder).
	State    string    `json:"state"`
	InQueue  bool      `json:"in_queue"`
	Received time.Time `json:"received"`
	Identity string    `json:"identity,omitempty"`
	Sandbox  bool      `json:"sandbox,omitempty"`
}

// maxResults caps search results.
const maxResults = 100

var errEnough = errors.New("enough")

// search finds messages whose queue ID, sender or a recipient equals q:
// in the queue first, then among recorded messages that left it.
func (s *Server) search(ctx context.Context, q string) ([]MessageSummary, error) {
	q = strings.TrimSpace(q)
	if q == "" {
		return []MessageSummary{}, nil
	}
	out := []MessageSummary{}
	seen := map[queue.ID]bool{}
	add := func(m *queue.Message) {
		if seen[m.ID] {
			return
		}
		seen[m.ID] = true
		sum := MessageSummary{ID: m.ID, From: m.Envelope.From, State: m.State.String(), InQueue: true,
			Received: m.Received, Identity: m.Envelope.Identity, Sandbox: m.Envelope.Sandbox, To: []string{}}
		for _, rc := range m.Envelope.To {
			sum.To = append(sum.To, rc.Addr)
		}
		out = append(out, sum)
	}
	if m, err := s.cfg.Queue.Get(ctx, queue.ID(q)); err == nil {
		add(m)
	} else if !errors.Is(err, queue.ErrNotFound) && !errors.Is(err, queue.ErrInvalid) {
		return nil, err
	}
	err := s.cfg.Queue.List(ctx, queue.Filter{}, func(m *queue.Message) error {
		match := m.Envelope.From != "" && strings.EqualFold(m.Envelope.From, q)
		for _, rc := range m.Envelope.To {
			match = match || strings.EqualFold(rc.Addr, q)
		}
		if match {
			add(m)
		}
		if len(out) >= maxResults {
			return errEnough
		}
		return nil
	})
	if err != nil && !errors.Is(err, errEnough) {
		return nil, err
	}
	if s.cfg.Recorder != nil {
		for _, h := range s.cfg.Recorder.Search(q, maxResults) {
			if seen[h.ID] || len(out) >= maxResults {
				continue
			}
			seen[h.ID] = true
			out = append(out, MessageSummary{ID: h.ID, From: h.From, To: h.recipients(), State: "done",
				Received: h.First, Identity: h.Identity})
		}
	}
	return out, nil
}

// recipients lists the recipients named in the events, in order of first
// appearance.
func (h *MessageHistory) recipients() []string {
	out := []string{}
	seen := map[string]bool{}
	for _, e := range h.Events {
		if e.Rcpt != "" && !seen[strings.ToLower(e.Rcpt)] {
			seen[strings.ToLower(e.Rcpt)] = true
			out = append(out, e.Rcpt)
		}
	}
	return out
}

func (s *Server) apiSearch(w http.ResponseWriter, r *http.Request) {
	res, err := s.search(r.Context(), r.URL.Query().Get("q"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

// MessageDetail is a message with every recipient's history.
type MessageDetail struct {
	ID       queue.ID `json:"id"`
	InQueue  bool     `json:"in_queue"`
	State    string   `json:"state"`
	From     string   `json:"from"`
	Identity string   `json:"identity,omitempty"`
	Stream   string   `json:"stream,omitempty"`
	Size     int64    `json:"size"`
	// Received is when the message was queued (or first recorded).
	Received time.Time `json:"received"`
	Expires  time.Time `json:"expires,omitzero"`
	Sandbox  bool      `json:"sandbox,omitempty"`
	// Recipients holds each recipient's state and history.
	Recipients []RecipientDetail `json:"recipients"`
}

// RecipientDetail is one recipient of a MessageDetail.
type RecipientDetail struct {
	Addr string `json:"addr"`
	// State is "pending", "delivered" or "failed" (or "unknown" for a
	// message that left the queue without a final outcome, as a deleted
	// one does).
	State       string      `json:"state"`
	Attempts    int         `json:"attempts"`
	NextAttempt time.Time   `json:"next_attempt,omitzero"`
	Last        queue.Reply `json:"last"`
	// History lists events oldest first: the Recorder's (acceptance,
	// attempts with TLS and destination, DSNs), and the queue's attempt
	// records from before the Recorder saw the message.
	History []HistoryEvent `json:"history"`
}

var resultKinds = map[queue.Result]string{queue.Delivered: "delivered", queue.Retry: "deferred", queue.Failed: "failed"}

// message merges the queue's record of id with the Recorder's.
func (s *Server) message(ctx context.Context, id queue.ID) (*MessageDetail, error) {
	m, err := s.cfg.Queue.Get(ctx, id)
	if err != nil && !errors.Is(err, queue.ErrNotFound) && !errors.Is(err, queue.ErrInvalid) {
		return nil, err
	}
	var h MessageHistory
	var recorded bool
	if s.cfg.Recorder != nil {
		h, recorded = s.cfg.Recorder.History(id)
	}
	if m == nil && !recorded {
		return nil, fmt.Errorf("%w: %s", queue.ErrNotFound, id)
	}
	events := func(addr string) []HistoryEvent {
		out := []HistoryEvent{}
		for _, e := range h.Events {
			if strings.EqualFold(e.Rcpt, addr) {
				out = append(out, e)
			}
		}
		return out
	}
	d := &MessageDetail{ID: id, Recipients: []RecipientDetail{}}
	if m == nil {
		d.State, d.From, d.Identity, d.Stream, d.Size, d.Received = "done", h.From, h.Identity, h.Stream, h.Size, h.First
		for _, addr := range h.recipients() {
			rd := RecipientDetail{Addr: addr, State: "unknown", History: events(addr)}
			for _, e := range rd.History {
				switch e.Kind {
				case "delivered":
					rd.State = "delivered"
				case "failed", "expired", "suppressed":
					rd.State = "failed"
				}
				if isOutcomeKind(e.Kind) {
					rd.Attempts = max(rd.Attempts, e.Attempts)
					rd.Last = e.Reply
				}
			}
			d.Recipients = append(d.Recipients, rd)
		}
		return d, nil
	}
	d.InQueue, d.State, d.From, d.Identity, d.Stream, d.Size = true, m.State.String(), m.Envelope.From, m.Envelope.Identity, m.Envelope.StreamName(), m.Size
	d.Received, d.Expires, d.Sandbox = m.Received, m.Expires, m.Envelope.Sandbox
	for _, rs := range m.Recipients {
		rd := RecipientDetail{Addr: rs.Addr, State: rs.State.String(), Attempts: rs.Attempts, Last: rs.Last, History: events(rs.Addr)}
		if rs.State == queue.RcptPending {
			rd.NextAttempt = rs.NextAttempt
		}
		// The queue's attempts from before the Recorder knew the message
		// (a restart): later ones are the Recorder's events already.
		for _, a := range rs.History {
			if recorded && !a.At.Before(h.First) {
				continue
			}
			rd.History = append(rd.History, HistoryEvent{Time: a.At, Kind: resultKinds[a.Result], Rcpt: rs.Addr, Reply: a.Reply, Host: a.Reply.Host})
		}
		sort.SliceStable(rd.History, func(i, j int) bool { return rd.History[i].Time.Before(rd.History[j].Time) })
		d.Recipients = append(d.Recipients, rd)
	}
	return d, nil
}

func isOutcomeKind(k string) bool {
	switch k {
	case "delivered", "deferred", "failed", "expired", "suppressed":
		return true
	}
	return false
}

func (s *Server) apiMessage(w http.ResponseWriter, r *http.Request) {
	d, err := s.message(r.Context(), queue.ID(r.URL.Query().Get("id")))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// suppressions lists the suppression list sorted by address.
func (s *Server) suppressions(ctx context.Context) ([]relay.Suppression, error) {
	if s.cfg.Suppressions == nil {
		return nil, errNoSuppressions
	}
	out := []relay.Suppression{}
	err := s.cfg.Suppressions.List(ctx, func(x relay.Suppression) error {
		out = append(out, x)
		return nil
	})
	sort.Slice(out, func(i, j int) bool { return out[i].Addr < out[j].Addr })
	return out, err
}

func (s *Server) apiSuppressions(w http.ResponseWriter, r *http.Request) {
	list, err := s.suppressions(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, list)
}

// apiSuppressionAdd adds ?addr= for ?ttl= (a Go duration; the store's
// default without one), with an optional ?reason= as the recorded reply
// text.
func (s *Server) apiSuppressionAdd(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	var ttl time.Duration
	if t := q.Get("ttl"); t != "" {
		d, err := time.ParseDuration(t)
		if err != nil || d <= 0 {
			s.fail(w, r, fmt.Errorf("%w: bad ttl %q", errBadRequest, t))
			return
		}
		ttl = d
	}
	got, err := s.addSuppression(r.Context(), q.Get("addr"), ttl, q.Get("reason"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, got)
}

// addSuppression suppresses addr for ttl (the store's default when 0),
// recording reason as the reply text, and returns the stored entry. The
// API and the dashboard's form share it.
func (s *Server) addSuppression(ctx context.Context, addr string, ttl time.Duration, reason string) (*relay.Suppression, error) {
	if s.cfg.Suppressions == nil {
		return nil, errNoSuppressions
	}
	x := relay.Suppression{Addr: strings.TrimSpace(addr), Created: s.cfg.Now()}
	if !strings.Contains(x.Addr, "@") || strings.ContainsAny(x.Addr, "\r\n\x00 ") {
		return nil, fmt.Errorf("%w: addr must be an address local@domain", errBadRequest)
	}
	if ttl > 0 {
		x.Expires = x.Created.Add(ttl)
	}
	x.Reply = queue.Reply{Code: 550, Enhanced: "5.1.1", Text: "added by an administrator"}
	if reason != "" {
		x.Reply.Text = reason
	}
	if err := s.cfg.Suppressions.Add(ctx, x); err != nil {
		return nil, err
	}
	s.log.Info("suppression added by administrator", "rcpt", x.Addr)
	got, _, err := s.cfg.Suppressions.Lookup(ctx, x.Addr)
	if err != nil || got == nil {
		got = &x
	}
	return got, nil
}

func (s *Server) apiSuppressionRemove(w http.ResponseWriter, r *http.Request) {
	if err := s.removeSuppression(r.Context(), r.URL.Query().Get("addr")); err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, struct{}{})
}

// removeSuppression lifts addr's suppression; the API and the
// dashboard's form share it.
func (s *Server) removeSuppression(ctx context.Context, addr string) error {
	if s.cfg.Suppressions == nil {
		return errNoSuppressions
	}
	if addr == "" {
		return fmt.Errorf("%w: addr is required", errBadRequest)
	}
	if err := s.cfg.Suppressions.Remove(ctx, addr); err != nil {
		return err
	}
	s.log.Info("suppression removed by administrator", "rcpt", addr)
	return nil
}

func (s *Server) apiSandbox(w http.ResponseWriter, r *http.Request) {
	boxes, err := s.sandboxes(r.Context())
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, boxes)
}

func (s *Server) apiSandboxMessages(w http.ResponseWriter, r *http.Request) {
	list, err := s.sandboxMessages(r.Context(), r.URL.Query().Get("identity"))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, list)
}

func (s *Server) apiSandboxMessage(w http.ResponseWriter, r *http.Request) {
	d, err := s.sandboxMessage(r.Context(), queue.ID(r.URL.Query().Get("id")))
	if err != nil {
		s.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, d)
}

// apiSandboxRaw downloads a captured message as it was submitted.
func (s *Server) apiSandboxRaw(w http.ResponseWriter, r *http.Request) {
	id := queue.ID(r.URL.Query().Get("id"))
	m, err := s.sandboxGet(r.Context(), id)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	rc, err := s.cfg.Queue.Open(r.Context(), m.ID)
	if err != nil {
		s.fail(w, r, err)
		return
	}
	defer rc.Close()
	w.Header().Set("Content-Type", "message/rfc822")
	w.Header().Set("Content-Disposition", `attachment; filename="`+safeFileName(string(m.ID))+`.eml"`)
	w.Header().Set("Content-Length", fmt.Sprint(m.Size))
	if _, err := io.Copy(w, rc); err != nil {
		s.log.Warn("sandbox download interrupted", "id", m.ID, "err", err)
	}
}

// safeFileName keeps the characters of a queue ID that need no quoting in
// a Content-Disposition header.
func safeFileName(s string) string {
	return strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
			return r
		}
		return '_'
	}, s)
}
