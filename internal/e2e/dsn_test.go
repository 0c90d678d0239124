package e2e

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
)

// Promise 2: a recipient that keeps failing temporarily expires at the
// schedule's maximum age and its sender gets a failure DSN saying so.
func TestPipeline_TemporaryFailureUntilMaxAge_ExpiredAndBounced(t *testing.T) {
	q := queue.NewMemory(queue.MemoryConfig{Schedule: queue.Schedule{Min: 100 * time.Millisecond, Max: 200 * time.Millisecond, Jitter: -1, MaxAge: 800 * time.Millisecond}})
	h := newHarness(t, harnessConfig{queue: q})
	dest := startSink(t, "mx1.dest.test")
	dest.rcptReply = func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "mailbox busy"}
	}
	senderMX := startSink(t, "mx.sender.test")
	h.mx("dest.test", dest)
	h.mx("sender.test", senderMX)
	if err := h.submit("app@sender.test", []string{"rcpt@dest.test"}, testBody); err != nil {
		t.Fatal(err)
	}
	ev := h.waitEvent(relay.EventExpired, "rcpt@dest.test")
	if ev.Attempts < 2 {
		t.Fatalf("expired after %d attempts; want retries first", ev.Attempts)
	}
	dsn := senderMX.wait(1, 10*time.Second)[0]
	if dsn.From != "" || !bytes.Contains(dsn.Body, []byte("4.4.7")) || !bytes.Contains(dsn.Body, []byte("mailbox busy")) {
		t.Fatalf("expiry DSN lacks 4.4.7 or the last reply:\n%s", dsn.Body)
	}
	h.waitEmpty()
}

// NOTIFY=NEVER gets no DSN; a null-sender message is never bounced.
func TestPipeline_NoDSNForNotifyNeverOrNullSender(t *testing.T) {
	h := newHarness(t, harnessConfig{})
	dest := startSink(t, "mx1.dest.test")
	dest.rcptReply = func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	senderMX := startSink(t, "mx.sender.test")
	h.mx("dest.test", dest)
	h.mx("sender.test", senderMX)
	ctx := context.Background()
	if _, err := h.relay.Submit(ctx, &queue.Envelope{From: "app@sender.test", To: []queue.Recipient{{Addr: "a@dest.test", Notify: queue.NotifyNever}}}, strings.NewReader(testBody)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.relay.Submit(ctx, &queue.Envelope{From: "", To: []queue.Recipient{{Addr: "b@dest.test"}}}, strings.NewReader(testBody)); err != nil {
		t.Fatal(err)
	}
	h.waitEvent(relay.EventFailed, "a@dest.test")
	h.waitEvent(relay.EventFailed, "b@dest.test")
	h.waitEmpty()
	time.Sleep(300 * time.Millisecond)
	if n := len(senderMX.messages()); n != 0 {
		t.Fatalf("%d DSNs sent; want none", n)
	}
}
