package queue

import (
	"context"
	"reflect"
	"strings"
	"testing"
	"time"
)

// utcTimes puts every time in m in UTC: a time read back from JSON
// carries a different *time.Location for the same instant.
func utcTimes(m *Message) {
	m.Received, m.Expires = m.Received.UTC(), m.Expires.UTC()
	for i := range m.Recipients {
		r := &m.Recipients[i]
		r.NextAttempt = r.NextAttempt.UTC()
		for j := range r.History {
			r.History[j].At = r.History[j].At.UTC()
		}
	}
}

// TestDir_FreshMessage_SameAsFile checks that the message Enqueue keeps
// for the first lease is the one readFile finds in the file, for
// envelopes using every field.
func TestDir_FreshMessage_SameAsFile(t *testing.T) {
	q := openFileDir(t, t.TempDir())
	envs := []*Envelope{
		testEnv("a@example.test"),
		{From: "", To: []Recipient{{Addr: "b@example.test", Notify: NotifySuccess | NotifyFailure, ORCPT: "rfc822;b@example.test"}, {Addr: "c@other.test", Notify: NotifyNever}},
			Ret: RetHeaders, EnvID: "env-1", SMTPUTF8: true, EightBit: true, RequireTLS: true, Identity: "user", Stream: "bulk"},
		{From: "jörg@example.test", To: []Recipient{{Addr: "ü@example.test"}}, SMTPUTF8: true, Ret: RetFull, Sandbox: false},
	}
	for i, env := range envs {
		id, err := q.Enqueue(context.Background(), env, strings.NewReader(strings.Repeat("body\r\n", i*1000)))
		if err != nil {
			t.Fatal(err)
		}
		q.mu.Lock()
		fresh := q.idx[id].fresh
		q.mu.Unlock()
		if fresh == nil {
			t.Fatalf("message %d: no fresh message kept", i)
		}
		disk, err := q.readFile(id, false)
		if err != nil {
			t.Fatal(err)
		}
		got, want := *fresh, *disk
		got.msg, want.msg = fresh.msg.Clone(), disk.msg.Clone()
		utcTimes(got.msg)
		utcTimes(want.msg)
		if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(got.msg, want.msg) {
			t.Errorf("message %d:\nfresh %+v %+v\nfile  %+v %+v", i, got, got.msg, want, want.msg)
		}
	}
}

// TestDir_FreshMessage_DroppedOnChange checks that a change to the file
// before the first lease (a hold and release) is what Lease returns, and
// that held mail and messages beyond maxFresh are not kept.
func TestDir_FreshMessage_DroppedOnChange(t *testing.T) {
	q := openFileDir(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id := mustEnqueue(t, q, "x\r\n")
	if err := q.Hold(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := q.Release(ctx, id); err != nil {
		t.Fatal(err)
	}
	q.mu.Lock()
	fresh, n := q.idx[id].fresh, q.nfresh
	q.mu.Unlock()
	if fresh != nil || n != 0 {
		t.Fatalf("fresh message kept across Hold (%d kept)", n)
	}
	ls, err := q.Lease(ctx, 1, time.Minute)
	if err != nil || len(ls) != 1 {
		t.Fatalf("Lease = %v, %v", ls, err)
	}
	disk, err := q.readFile(id, false)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(ls[0].Message.Recipients[0].History, disk.msg.Recipients[0].History) {
		t.Errorf("leased %+v, file has %+v", ls[0].Message.Recipients[0], disk.msg.Recipients[0])
	}

	held := testEnv("h@example.test")
	held.Held = true
	hid, err := q.Enqueue(ctx, held, strings.NewReader("h\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	q.mu.Lock()
	if q.idx[hid].fresh != nil {
		t.Error("held message kept in memory")
	}
	q.nfresh = maxFresh // as if full
	q.mu.Unlock()
	full := mustEnqueue(t, q, "f\r\n")
	q.mu.Lock()
	if q.idx[full].fresh != nil {
		t.Error("message kept beyond maxFresh")
	}
	q.nfresh = 0
	q.mu.Unlock()
}
