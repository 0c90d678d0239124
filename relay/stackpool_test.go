package relay

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestStackPool_DoRunsAndReusesWorkers(t *testing.T) {
	p := newStackPool(time.Minute)
	var ran atomic.Int64
	for range 100 {
		p.do(func() { ran.Add(1) })
	}
	if ran.Load() != 100 {
		t.Fatalf("ran %d functions, want 100", ran.Load())
	}
	t.Logf("%d workers for 100 sequential calls", p.live.Load())
	var wg sync.WaitGroup
	var done atomic.Int64
	for range 50 {
		wg.Add(1)
		p.goAsync(func() { defer wg.Done(); done.Add(1) })
	}
	wg.Wait()
	if done.Load() != 50 {
		t.Fatalf("async ran %d, want 50", done.Load())
	}
}

func TestStackPool_PanicRaisedInCaller(t *testing.T) {
	p := newStackPool(time.Minute)
	defer func() {
		if v := recover(); v != "boom" {
			t.Fatalf("recovered %v, want the function's panic", v)
		}
		// The pool still works after a panic.
		ok := false
		p.do(func() { ok = true })
		if !ok {
			t.Fatal("pool unusable after a panic")
		}
	}()
	p.do(func() { panic("boom") })
}

func TestStackPool_IdleWorkersExit(t *testing.T) {
	p := newStackPool(10 * time.Millisecond)
	for range 3 {
		p.do(func() {})
		if n := p.live.Load(); n != 1 {
			t.Fatalf("%d workers after a call, want 1", n)
		}
		deadline := time.Now().Add(5 * time.Second)
		for p.live.Load() != 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if n := p.live.Load(); n != 0 {
			t.Fatalf("%d idle workers still running", n)
		}
	}
}
