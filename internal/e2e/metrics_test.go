package e2e

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestRelayd_Metrics_ScrapedOverHTTP runs the built relayd with its
// /metrics listener, submits one message that is delivered and one whose
// recipient the destination refuses (so a bounce goes back to the
// sender's domain, through the same smarthost), and scrapes the endpoint
// until the outcomes are counted.
func TestRelayd_Metrics_ScrapedOverHTTP(t *testing.T) {
	dest := startSink(t, "smarthost.test")
	dest.rcptReply = func(to string) *smtp.SMTPError {
		if strings.HasPrefix(to, "bad@") {
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
		}
		return nil
	}
	metricsAddr := freeAddr(t)
	r := newRelayd(t, filepath.Join(t.TempDir(), "data"), fmt.Sprintf(`
[auth]
allow = [{ name = "app", cidr = ["127.0.0.1/32"] }]
[[routes]]
domain = "*"
host = "127.0.0.1"
port = %d
tls = "none"
[metrics]
listen = %q
`, dest.port, metricsAddr))
	for _, to := range []string{"ok@dest.test", "bad@dest.test"} {
		body := "From: app@sender.test\r\nTo: " + to + "\r\nSubject: metrics\r\n\r\nbody\r\n"
		if err := sendPlain(r.addr, "app@sender.test", to, body); err != nil {
			t.Fatalf("submit to %s: %v", to, err)
		}
	}
	dest.wait(2, 30*time.Second) // ok@ and the bounce

	key := fmt.Sprintf("route:127.0.0.1:%d", dest.port)
	var fams map[string]*dto.MetricFamily
	deadline := time.Now().Add(30 * time.Second)
	for {
		fams = scrapeMetrics(t, "http://"+metricsAddr+"/metrics")
		if counterValue(fams, "baton_recipients_total", map[string]string{"event": "delivered", "dest": key, "stream": "transactional"}) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("delivered count never reached 2; relayd output:\n%s", r.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"baton_recipients_total", map[string]string{"event": "accepted", "stream": "transactional"}, 2},
		{"baton_recipients_total", map[string]string{"event": "failed", "dest": key, "stream": "transactional"}, 1},
		{"baton_recipients_total", map[string]string{"event": "dsn_sent", "stream": "transactional"}, 1},
		{"baton_delivery_replies_total", map[string]string{"class": "5xx"}, 1},
		{"baton_smtp_replies_total", map[string]string{"class": "3xx"}, 2}, // two DATA
	} {
		if got := counterValue(fams, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if fams["baton_delivery_duration_seconds"] == nil || fams["baton_queue_messages"] == nil {
		t.Errorf("latency histogram or queue gauges missing: %v", fams)
	}
}

func scrapeMetrics(t *testing.T, url string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	return parseMetrics(t, resp.Body)
}

// parseMetrics parses the Prometheus text format.
func parseMetrics(t *testing.T, r io.Reader) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(r)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// counterValue returns the counter of family name whose non-empty labels
// are exactly labels (0 when there is none).
func counterValue(fams map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
next:
	for _, m := range fams[name].GetMetric() {
		n := 0
		for _, l := range m.GetLabel() {
			if l.GetValue() == "" {
				continue
			}
			if labels[l.GetName()] != l.GetValue() {
				continue next
			}
			n++
		}
		if n == len(labels) {
			return m.GetCounter().GetValue()
		}
	}
	return 0
}
