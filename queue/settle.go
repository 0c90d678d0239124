package queue

import (
	"strings"
	"time"
)

// ApplyOutcomes records outcomes into m as Settle must, at time now, using
// s for retry times; it is exported so that every backend applies the
// contract the same way. It returns whether every recipient of m is now
// final (the message should leave the queue). Outcomes for addresses that
// m does not have, or that are already final, are ignored.
func ApplyOutcomes(m *Message, outcomes []Outcome, now time.Time, s Schedule) (done bool) {
	for _, o := range outcomes {
		i := m.recipientIndex(o.Rcpt)
		if i < 0 || m.Recipients[i].State != RcptPending {
			continue
		}
		r := &m.Recipients[i]
		r.Attempts++
		r.Last = o.Reply
		res := o.Result
		switch res {
		case Delivered:
			r.State = RcptDelivered
		case Failed:
			r.State = RcptFailed
		default:
			res = Retry
			next := o.RetryAt
			if next.IsZero() {
				next = now.Add(s.Delay(r.Attempts))
			}
			if !m.Expires.IsZero() && !next.Before(m.Expires) {
				if now.Before(m.Expires) {
					// One last attempt at the deadline itself.
					next = m.Expires
				} else {
					res = Failed
					r.State = RcptFailed
					r.Expired = true
				}
			}
			r.NextAttempt = next
		}
		r.History = append(r.History, Attempt{At: now, Result: res, Reply: o.Reply})
		if n := len(r.History); n > MaxHistory {
			r.History = append(r.History[:0:0], r.History[n-MaxHistory:]...)
		}
	}
	done = true
	tried := false
	for _, r := range m.Recipients {
		if r.State == RcptPending {
			done = false
		}
		if r.Attempts > 0 {
			tried = true
		}
	}
	if m.State != StateHeld {
		m.State = StateQueued
		if tried {
			m.State = StateDeferred
		}
	}
	return done
}

func (m *Message) recipientIndex(addr string) int {
	for i, r := range m.Recipients {
		if r.Addr == addr {
			return i
		}
	}
	for i, r := range m.Recipients {
		if strings.EqualFold(r.Addr, addr) {
			return i
		}
	}
	return -1
}

// DueRecipients returns the indexes of pending recipients due at now.
func (m *Message) DueRecipients(now time.Time) []int {
	var due []int
	for i, r := range m.Recipients {
		if r.State == RcptPending && !r.NextAttempt.After(now) {
			due = append(due, i)
		}
	}
	return due
}

// NewMessage builds the initial record of an enqueued message.
func NewMessage(id ID, env *Envelope, size int64, now time.Time, s Schedule) *Message {
	s = s.WithDefaults()
	m := &Message{ID: id, Envelope: *env, Received: now, Expires: now.Add(s.MaxAge), Size: size, State: StateQueued}
	m.Envelope.To = append([]Recipient(nil), env.To...)
	m.Recipients = make([]RecipientStatus, len(env.To))
	for i, r := range env.To {
		m.Recipients[i] = RecipientStatus{Recipient: r, NextAttempt: now}
	}
	if env.Held {
		m.State = StateHeld
	}
	return m
}
