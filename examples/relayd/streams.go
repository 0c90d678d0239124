package main

import (
	"fmt"

	"github.com/batonmail/baton/relay"
)

// relayStreams turns the [streams.NAME] sections into the relay's stream
// settings.
func relayStreams(cfg *Config) (map[string]relay.StreamConfig, error) {
	out := make(map[string]relay.StreamConfig, len(cfg.Streams))
	for name, s := range cfg.Streams {
		if err := relay.ValidStreamName(name); err != nil {
			return nil, fmt.Errorf("streams: %w", err)
		}
		if s.Workers < 0 || s.MaxInFlight < 0 || s.PerDestination < 0 || s.Rate < 0 || s.Burst < 0 || s.MaxRcpts < 0 {
			return nil, fmt.Errorf("streams.%s: negative limit", name)
		}
		rs := relay.StreamConfig{
			Workers:     s.Workers,
			Reserved:    s.Reserved,
			MaxInFlight: s.MaxInFlight,
			Limits:      relay.Limits{MaxConcurrent: s.PerDestination, Rate: s.Rate, Burst: s.Burst, MaxRcpts: s.MaxRcpts},
		}
		for _, d := range s.Destinations {
			if d.Domain == "" {
				return nil, fmt.Errorf("streams.%s.destinations: an entry has no domain", name)
			}
			if d.TLS != "" {
				return nil, fmt.Errorf("streams.%s.destinations %q: tls is set per domain in [[delivery.destinations]], not per stream", name, d.Domain)
			}
			if rs.Destinations == nil {
				rs.Destinations = map[string]relay.Limits{}
			}
			rs.Destinations[d.Domain] = relay.Limits{MaxConcurrent: d.PerDestination, Rate: d.Rate, Burst: d.Burst, MaxRcpts: d.MaxRcpts}
		}
		out[name] = rs
	}
	return out, nil
}

// checkStream reports an error unless name is empty or a stream relayd
// delivers: the built-in ones or one with a [streams.NAME] section.
func checkStream(cfg *Config, name string) error {
	if name == "" || name == relay.StreamTransactional || name == relay.StreamBulk {
		return nil
	}
	if err := relay.ValidStreamName(name); err != nil {
		return err
	}
	if _, ok := cfg.Streams[name]; !ok {
		return fmt.Errorf("unknown stream %q: add a [streams.%s] section to the configuration first", name, name)
	}
	return nil
}
