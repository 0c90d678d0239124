package jetstream

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/batonmail/baton/queue"
)

// TestRecordEncode_TrimsHistoryToFit: a record too big for one NATS
// message loses its oldest history first; one that cannot fit is refused
// as invalid.
func TestRecordEncode_TrimsHistoryToFit(t *testing.T) {
	env := &queue.Envelope{From: "s@example.test"}
	for i := range 50 {
		env.To = append(env.To, queue.Recipient{Addr: fmt.Sprintf("r%d@example.test", i)})
	}
	m := queue.NewMessage("ID", env, 10, t0, queue.Schedule{})
	for i := range m.Recipients {
		for a := range queue.MaxHistory {
			m.Recipients[i].History = append(m.Recipients[i].History, queue.Attempt{At: t0, Result: queue.Retry,
				Reply: queue.Reply{Code: 451, Text: fmt.Sprintf("attempt %d %s", a, strings.Repeat("x", 200))}})
		}
	}
	r := &record{Msg: m}
	const limit = 64 << 10
	data, err := r.encode(limit)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) > limit {
		t.Fatalf("encoded %d bytes, limit %d", len(data), limit)
	}
	back, err := decodeRecord(data)
	if err != nil {
		t.Fatal(err)
	}
	h := back.Msg.Recipients[0].History
	if len(h) == 0 || len(h) == queue.MaxHistory || !strings.HasPrefix(h[len(h)-1].Reply.Text, fmt.Sprintf("attempt %d ", queue.MaxHistory-1)) {
		t.Fatalf("history kept %d entries ending %q; want the newest, trimmed", len(h), h[len(h)-1].Reply.Text)
	}
	if _, err := (&record{Msg: m}).encode(100); !errors.Is(err, queue.ErrInvalid) {
		t.Fatalf("record that cannot fit: %v, want ErrInvalid", err)
	}
}
