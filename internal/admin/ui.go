package admin

import (
	"bytes"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"math"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

//go:embed templates/*.html
var templateFS embed.FS

// titles holds every page's title, by template name.
var titles = map[string]string{"login": "Sign in", "overview": "Overview", "destinations": "Destinations", "search": "Search",
	"message": "Message", "sandbox": "Sandbox", "sandbox_view": "Sandbox message", "suppressions": "Suppressions", "error": "Error"}

var funcs = template.FuncMap{
	"ago": func(t time.Time) string {
		if t.IsZero() {
			return "–"
		}
		d := time.Since(t).Round(time.Second)
		if d < 0 {
			return "in " + (-d).String()
		}
		return d.String() + " ago"
	},
	"stamp": func(t time.Time) string {
		if t.IsZero() {
			return "–"
		}
		return t.UTC().Format("2006-01-02 15:04:05Z")
	},
	"reply": func(r queue.Reply) string {
		if r.Code == 0 && r.Text == "" {
			return "–"
		}
		return r.String()
	},
	"join": strings.Join,
	"size": func(n int64) string {
		switch {
		case n >= 1<<20:
			return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
		case n >= 1<<10:
			return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
		}
		return fmt.Sprintf("%d B", n)
	},
	// No query escaping function: html/template escapes a value in a URL
	// itself, and would escape an escaped one again.
	"list": func(s ...string) []string { return s },
}

var pages = func() map[string]*template.Template {
	m := map[string]*template.Template{}
	for name := range titles {
		m[name] = template.Must(template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+name+".html"))
	}
	return m
}()

// pageData is what every page template gets.
type pageData struct {
	Title string
	// Nav names the current section for the menu.
	Nav string
	// CSRF is the session's CSRF token for forms.
	CSRF     string
	LoggedIn bool
	Data     any
}

type loginPage struct {
	Next   string
	Failed bool
	// RetryAfter, when not 0, is how many seconds the client must wait
	// after too many wrong tokens.
	RetryAfter int
}

// render executes a page into a buffer first, so a template error never
// sends half a page.
func (s *Server) render(w http.ResponseWriter, r *http.Request, status int, name string, data any) {
	nav := name
	switch name {
	case "message":
		nav = "search"
	case "sandbox_view":
		nav = "sandbox"
	}
	pd := pageData{Title: titles[name], Nav: nav, Data: data, LoggedIn: name != "login"}
	if pd.LoggedIn {
		pd.CSRF = s.csrfToken(r)
	}
	var buf bytes.Buffer
	if err := pages[name].Execute(&buf, pd); err != nil {
		s.log.Error("admin page failed", "page", name, "err", err)
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}

func (s *Server) pageError(w http.ResponseWriter, r *http.Request, err error) {
	status, _ := errStatus(err)
	s.render(w, r, status, "error", s.errText(r, status, err))
}

type overviewPage struct {
	*StatsView
	States     []stateCount
	DepthChart template.HTML
	RateChart  template.HTML
}

type stateCount struct {
	Name   string
	Count  int
	Oldest time.Time
}

func (s *Server) pageOverview(w http.ResponseWriter, r *http.Request) {
	v, err := s.stats(r.Context())
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	p := overviewPage{StatsView: v}
	for _, st := range queue.States() {
		p.States = append(p.States, stateCount{Name: st.String(), Count: v.Queue.ByState[st], Oldest: v.Queue.Oldest[st]})
	}
	depth := series{Name: "queue depth", Color: "#2563eb"}
	del := series{Name: "delivered", Color: "#16a34a"}
	def := series{Name: "deferred", Color: "#d97706"}
	bnc := series{Name: "bounced", Color: "#dc2626"}
	for _, m := range v.LastHour.Minutes {
		d := math.NaN()
		if m.Depth != nil {
			d = float64(*m.Depth)
		}
		depth.Values = append(depth.Values, d)
		del.Values = append(del.Values, float64(m.Delivered))
		def.Values = append(def.Values, float64(m.Deferred))
		bnc.Values = append(bnc.Values, float64(m.Bounced))
	}
	p.DepthChart = lineChart("depth-chart", "Queue depth over the last hour", []series{depth})
	p.RateChart = lineChart("rate-chart", "Recipients per minute over the last hour", []series{del, def, bnc})
	s.render(w, r, http.StatusOK, "overview", p)
}

func (s *Server) pageDestinations(w http.ResponseWriter, r *http.Request) {
	rows, err := s.destinations(r.Context())
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	s.render(w, r, http.StatusOK, "destinations", rows)
}

type searchPage struct {
	Q       string
	Results []MessageSummary
}

func (s *Server) pageSearch(w http.ResponseWriter, r *http.Request) {
	q := strings.TrimSpace(r.URL.Query().Get("q"))
	res, err := s.search(r.Context(), q)
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	if len(res) == 1 && string(res[0].ID) == q {
		http.Redirect(w, r, "/message?id="+url.QueryEscape(q), http.StatusSeeOther)
		return
	}
	s.render(w, r, http.StatusOK, "search", searchPage{Q: q, Results: res})
}

func (s *Server) pageMessage(w http.ResponseWriter, r *http.Request) {
	d, err := s.message(r.Context(), queue.ID(r.URL.Query().Get("id")))
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	s.render(w, r, http.StatusOK, "message", d)
}

// pageMessageAction runs a queue operation from the message page's
// buttons and shows the message again.
func (s *Server) pageMessageAction(w http.ResponseWriter, r *http.Request) {
	id := queue.ID(r.PostFormValue("id"))
	ctx := r.Context()
	var err error
	switch op := r.PostFormValue("op"); op {
	case "hold":
		err = s.cfg.Queue.Hold(ctx, id)
	case "release":
		err = s.cfg.Queue.Release(ctx, id)
	case "retry":
		_, err = s.cfg.Queue.Retry(ctx, queue.Filter{ID: id})
	case "delete":
		err = s.cfg.Queue.Delete(ctx, id)
	default:
		err = fmt.Errorf("%w: unknown operation %q", errBadRequest, op)
	}
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	s.log.Info("queue operation by administrator", "id", id, "op", r.PostFormValue("op"))
	http.Redirect(w, r, "/message?id="+url.QueryEscape(string(id)), http.StatusSeeOther)
}

type sandboxPage struct {
	Boxes    []Mailbox
	Identity string
	Messages []SandboxMessage
}

func (s *Server) pageSandbox(w http.ResponseWriter, r *http.Request) {
	p := sandboxPage{Identity: r.URL.Query().Get("identity")}
	var err error
	if p.Boxes, err = s.sandboxes(r.Context()); err != nil {
		s.pageError(w, r, err)
		return
	}
	if p.Identity == "" && len(p.Boxes) == 1 {
		p.Identity = p.Boxes[0].Identity
	}
	if p.Identity != "" {
		if p.Messages, err = s.sandboxMessages(r.Context(), p.Identity); err != nil {
			s.pageError(w, r, err)
			return
		}
	}
	s.render(w, r, http.StatusOK, "sandbox", p)
}

func (s *Server) pageSandboxView(w http.ResponseWriter, r *http.Request) {
	d, err := s.sandboxMessage(r.Context(), queue.ID(r.URL.Query().Get("id")))
	if err != nil {
		if errors.Is(err, errBadRequest) {
			http.Redirect(w, r, "/sandbox", http.StatusSeeOther)
			return
		}
		s.pageError(w, r, err)
		return
	}
	s.render(w, r, http.StatusOK, "sandbox_view", d)
}

// maxSuppressionRows bounds the suppressions page: the list can hold
// 100,000 entries, which no page should render at once.
const maxSuppressionRows = 500

type suppressionsPage struct {
	// Configured is false when there is no suppression list.
	Configured bool
	Q          string
	// Total counts the entries that match Q; Rows holds the first
	// maxSuppressionRows of them, by address.
	Total int
	Rows  []relay.Suppression
}

// pageSuppressions lists the suppression list, filtered by a substring of
// the address (case-insensitive).
func (s *Server) pageSuppressions(w http.ResponseWriter, r *http.Request) {
	p := suppressionsPage{Q: strings.TrimSpace(r.URL.Query().Get("q")), Configured: s.cfg.Suppressions != nil}
	if p.Configured {
		list, err := s.suppressions(r.Context())
		if err != nil {
			s.pageError(w, r, err)
			return
		}
		q := strings.ToLower(p.Q)
		for _, x := range list {
			if q != "" && !strings.Contains(strings.ToLower(x.Addr), q) {
				continue
			}
			p.Total++
			if len(p.Rows) < maxSuppressionRows {
				p.Rows = append(p.Rows, x)
			}
		}
	}
	s.render(w, r, http.StatusOK, "suppressions", p)
}

// pageSuppressionAction adds or removes a suppression from the
// suppressions page's forms and shows the page again.
func (s *Server) pageSuppressionAction(w http.ResponseWriter, r *http.Request) {
	addr := strings.TrimSpace(r.PostFormValue("addr"))
	var err error
	switch op := r.PostFormValue("op"); op {
	case "add":
		_, err = s.addSuppression(r.Context(), addr, 0, strings.TrimSpace(r.PostFormValue("reason")))
	case "remove":
		err = s.removeSuppression(r.Context(), addr)
	default:
		err = fmt.Errorf("%w: unknown operation %q", errBadRequest, op)
	}
	if err != nil {
		s.pageError(w, r, err)
		return
	}
	to := "/suppressions"
	if q := r.PostFormValue("q"); q != "" {
		to += "?q=" + url.QueryEscape(q)
	}
	http.Redirect(w, r, to, http.StatusSeeOther)
}
