package relay

import "sort"

// DestinationStatus is one destination's delivery slots at a moment.
type DestinationStatus struct {
	// Key names the destination as Event.Dest does ("mx:example.com",
	// "route:smarthost").
	Key string `json:"key"`
	// InFlight counts the deliveries to it holding a slot now.
	InFlight int `json:"in_flight"`
	// Max is its concurrency limit (Limits.MaxConcurrent).
	Max int `json:"max"`
}

// Destinations reports the destinations the relay remembers (those it
// delivered to recently; idle ones are forgotten once there are many),
// sorted by key. It is a snapshot for dashboards and is safe to call at any
// time.
func (r *Relay) Destinations() []DestinationStatus {
	r.mu.Lock()
	out := make([]DestinationStatus, 0, len(r.dests))
	for k, d := range r.dests {
		out = append(out, DestinationStatus{Key: k, InFlight: len(d.sem), Max: cap(d.sem)})
	}
	r.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}
