package mx

import "fmt"

// ParseTLSMode parses a TLS mode's configuration name, as returned by
// TLSMode.String: "opportunistic" (also the empty string), "none",
// "required" or "verified".
func ParseTLSMode(s string) (TLSMode, error) {
	switch s {
	case "", "opportunistic":
		return TLSOpportunistic, nil
	case "none":
		return TLSNone, nil
	case "required":
		return TLSRequired, nil
	case "verified":
		return TLSVerified, nil
	}
	return 0, fmt.Errorf("mx: unknown TLS mode %q (want opportunistic, none, required or verified)", s)
}

// MarshalText returns the mode's configuration name, so that modes appear
// as words in JSON and TOML.
func (m TLSMode) MarshalText() ([]byte, error) {
	switch m {
	case TLSOpportunistic, TLSNone, TLSRequired, TLSVerified:
		return []byte(m.String()), nil
	}
	return nil, fmt.Errorf("mx: unknown TLS mode %d", int(m))
}

// UnmarshalText parses a configuration name with ParseTLSMode.
func (m *TLSMode) UnmarshalText(text []byte) error {
	v, err := ParseTLSMode(string(text))
	if err != nil {
		return err
	}
	*m = v
	return nil
}
