package jetstream

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/batonmail/baton/queue"
)

// recordVersion is the format of records this package writes.
const recordVersion = 1

// record is what the records bucket holds for one message: the message
// with its per-recipient state, and the lease on it. Token is empty when
// no worker holds a lease; a lease whose Until has passed is expired but
// stays recorded until someone leases the message again or settles it.
type record struct {
	V     int            `json:"v"`
	Msg   *queue.Message `json:"msg"`
	Token string         `json:"token,omitempty"`
	Until time.Time      `json:"until,omitzero"`
	// Node is the Config.Node of the process holding the lease.
	Node string `json:"node,omitempty"`
	// Body locates the body in the bodies stream.
	Body bodyRef `json:"body"`
}

func decodeRecord(data []byte) (*record, error) {
	var r record
	if err := json.Unmarshal(data, &r); err != nil {
		return nil, fmt.Errorf("jetstream: bad record: %w", err)
	}
	if r.V != recordVersion || r.Msg == nil {
		return nil, fmt.Errorf("jetstream: record version %d not supported", r.V)
	}
	return &r, nil
}

// encode marshals r, dropping the oldest history entries when the record
// would not fit in one NATS message of max bytes.
func (r *record) encode(max int) ([]byte, error) {
	r.V = recordVersion
	for {
		data, err := json.Marshal(r)
		if err != nil {
			return nil, err
		}
		if len(data) <= max {
			return data, nil
		}
		trimmed := false
		for i := range r.Msg.Recipients {
			h := r.Msg.Recipients[i].History
			if len(h) > 1 {
				r.Msg.Recipients[i].History = append(h[:0:0], h[len(h)/2:]...)
				trimmed = true
			}
		}
		if !trimmed {
			return nil, errors.Join(queue.ErrInvalid, fmt.Errorf("record of %d bytes exceeds the NATS payload limit", len(data)))
		}
	}
}

// leased reports whether a live lease holds the message at now.
func (r *record) leased(now time.Time) bool {
	return r.Token != "" && r.Until.After(now)
}

// view is the snapshot Admin calls return: a lease that expired shows as
// the state the message falls back to.
func (r *record) view(now time.Time) *queue.Message {
	m := r.Msg.Clone()
	if m.State == queue.StateLeased && !r.leased(now) {
		m.State = fallbackState(m)
	}
	return m
}

// fallbackState is the state of an unheld, unleased message.
func fallbackState(m *queue.Message) queue.State {
	for _, rc := range m.Recipients {
		if rc.Attempts > 0 {
			return queue.StateDeferred
		}
	}
	return queue.StateQueued
}
