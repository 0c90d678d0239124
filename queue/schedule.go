package queue

import (
	"math/rand/v2"
	"time"
)

// Schedule decides when a temporarily failed recipient is tried again and
// when the queue gives up on it. The zero Schedule means DefaultSchedule.
type Schedule struct {
	// Min is the delay after the first failure (default 5 minutes).
	Min time.Duration
	// Max caps the delay between attempts (default 1 hour).
	Max time.Duration
	// Factor multiplies the delay after each failure (default 2).
	Factor float64
	// Jitter spreads each delay by up to this fraction either way, so
	// messages deferred together do not retry in lockstep (default 0.2;
	// a negative value disables jitter, and WithDefaults keeps it
	// negative so that it stays disabled).
	Jitter float64
	// MaxAge is how long a message may stay in the queue before its
	// pending recipients fail as expired (default 5 days, RFC 5321
	// §4.5.4.1).
	MaxAge time.Duration
}

// DefaultSchedule is the retry schedule used when none is configured.
var DefaultSchedule = Schedule{Min: 5 * time.Minute, Max: time.Hour, Factor: 2, Jitter: 0.2, MaxAge: 5 * 24 * time.Hour}

// WithDefaults returns s with every zero field set from DefaultSchedule.
func (s Schedule) WithDefaults() Schedule {
	d := DefaultSchedule
	if s.Min > 0 {
		d.Min = s.Min
	}
	if s.Max > 0 {
		d.Max = s.Max
	}
	if s.Max > 0 && s.Min > s.Max {
		d.Min = s.Max
	}
	if s.Factor >= 1 {
		d.Factor = s.Factor
	}
	if s.Jitter != 0 {
		d.Jitter = s.Jitter
	}
	if s.MaxAge > 0 {
		d.MaxAge = s.MaxAge
	}
	return d
}

// Delay returns how long to wait after the given number of failed
// attempts (1 for the first failure), with jitter applied.
func (s Schedule) Delay(attempts int) time.Duration {
	s = s.WithDefaults()
	d := float64(s.Min)
	for i := 1; i < attempts && d < float64(s.Max); i++ {
		d *= s.Factor
	}
	d = min(d, float64(s.Max))
	if s.Jitter > 0 {
		d *= 1 + s.Jitter*(2*rand.Float64()-1)
	}
	return time.Duration(d)
}
