package main

import (
	"strings"
	"testing"
	"time"
)

// Lines reach the output in order, batched, and all of them by Close.
func TestLogWriter_BatchesAndFlushes(t *testing.T) {
	out := &syncBuffer{}
	lw := newLogWriter(out, time.Hour) // only Close flushes
	var want strings.Builder
	for i := 0; i < 100; i++ {
		line := "line " + strings.Repeat("x", i) + "\n"
		lw.Write([]byte(line))
		want.WriteString(line)
	}
	if out.String() != "" {
		t.Fatal("written before a flush")
	}
	lw.Close()
	if out.String() != want.String() {
		t.Fatal("lines lost or reordered")
	}
	if out.writes != 1 {
		t.Fatalf("%d writes for 100 lines, want 1", out.writes)
	}
}

// The flusher writes buffered lines out on its own.
func TestLogWriter_PeriodicFlush(t *testing.T) {
	out := &syncBuffer{}
	lw := newLogWriter(out, 10*time.Millisecond)
	defer lw.Close()
	lw.Write([]byte("hello\n"))
	deadline := time.Now().Add(5 * time.Second)
	for out.String() != "hello\n" {
		if time.Now().After(deadline) {
			t.Fatal("line never flushed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
