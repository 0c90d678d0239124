package relay

import "sort"

// DestinationStatus is one destination's delivery slots for one stream at
// a moment.
type DestinationStatus struct {
	// Stream is the stream the slots belong to: each stream has its own
	// slots per destination.
	Stream string `json:"stream"`
	// Key names the destination as Event.Dest does ("mx:example.com",
	// "route:smarthost").
	Key string `json:"key"`
	// InFlight counts the deliveries to it in progress now. Batches that
	// hold one of its slots while they wait for the rate limiter or for a
	// worker of their stream are not counted: nothing is being delivered
	// for them yet.
	InFlight int `json:"in_flight"`
	// Max is its concurrency limit (Limits.MaxConcurrent).
	Max int `json:"max"`
}

// Destinations reports the destinations the relay remembers (those it
// delivered to recently; idle ones are forgotten once there are many),
// one entry per stream and destination, sorted by key and stream. It is a
// snapshot for dashboards and is safe to call at any time.
func (r *Relay) Destinations() []DestinationStatus {
	r.mu.Lock()
	out := make([]DestinationStatus, 0, len(r.dests))
	for k, d := range r.dests {
		out = append(out, DestinationStatus{Stream: k.stream, Key: k.key, InFlight: int(d.active.Load()), Max: cap(d.sem)})
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Key != out[j].Key {
			return out[i].Key < out[j].Key
		}
		return out[i].Stream < out[j].Stream
	})
	return out
}
