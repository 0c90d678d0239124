package relay

import (
	"sync"
	"sync/atomic"
	"time"
)

// stackPool runs functions on goroutines that outlive them.
//
// A goroutine starts with a small stack that the runtime copies to a
// larger one each time a call chain outgrows it. A message's way through
// the relay (the DATA phase: header parsing, policy, Submit, the queue's
// group commit, logging; a delivery: the SMTP client, the queue's Settle,
// the event observers) is deep, so a goroutine started per session or per
// delivery paid for two or three such copies every time: about 5% of
// relayd's CPU under load. A worker here keeps its grown stack from one
// function to the next, and exits after idle without work.
type stackPool struct {
	idle time.Duration
	work chan *stackJob
	live atomic.Int32 // workers running
}

// stackJob is one function handed to a worker; done is signalled when it
// has returned, with the value of a panic if it panicked.
type stackJob struct {
	f     func()
	done  chan any
	async bool
}

var stackJobs = sync.Pool{New: func() any { return &stackJob{done: make(chan any, 1)} }}

func newStackPool(idle time.Duration) *stackPool {
	return &stackPool{idle: idle, work: make(chan *stackJob)}
}

// do runs f on a worker and waits for it to return. A panic in f is
// raised again in the caller, as if f had run there.
func (p *stackPool) do(f func()) {
	j := stackJobs.Get().(*stackJob)
	j.f, j.async = f, false
	p.hand(j)
	v := <-j.done
	j.f = nil
	stackJobs.Put(j)
	if v != nil {
		panic(v)
	}
}

// goAsync runs f on a worker without waiting, like a go statement.
func (p *stackPool) goAsync(f func()) {
	p.hand(&stackJob{f: f, async: true})
}

// hand gives j to an idle worker, or to a new one when none is idle.
func (p *stackPool) hand(j *stackJob) {
	select {
	case p.work <- j:
	default:
		p.live.Add(1)
		go p.worker(j)
	}
}

func (p *stackPool) worker(j *stackJob) {
	t := time.NewTimer(p.idle)
	defer t.Stop()
	defer p.live.Add(-1)
	for {
		if j.async {
			j.f() // a panic ends the program, as in a plain goroutine
		} else {
			j.done <- run(j.f)
		}
		t.Reset(p.idle)
		select {
		case j = <-p.work:
		case <-t.C:
			return
		}
	}
}

// run calls f and returns the value of its panic, or nil.
func run(f func()) (v any) {
	defer func() { v = recover() }()
	f()
	return nil
}
