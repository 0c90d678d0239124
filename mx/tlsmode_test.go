package mx

import (
	"encoding/json"
	"testing"
)

func TestTLSMode_TextRoundTrip(t *testing.T) {
	for _, m := range []TLSMode{TLSOpportunistic, TLSNone, TLSRequired, TLSVerified} {
		text, err := m.MarshalText()
		if err != nil {
			t.Fatal(err)
		}
		var back TLSMode
		if err := back.UnmarshalText(text); err != nil || back != m {
			t.Fatalf("%v: round trip gave %v, %v", m, back, err)
		}
	}
	if m, err := ParseTLSMode(""); err != nil || m != TLSOpportunistic {
		t.Fatalf("empty: %v, %v", m, err)
	}
	if _, err := ParseTLSMode("Verified"); err == nil {
		t.Fatal("wrong case accepted")
	}
	if _, err := TLSMode(9).MarshalText(); err == nil {
		t.Fatal("unknown mode marshalled")
	}
	b, err := json.Marshal(struct{ TLS TLSMode }{TLSVerified})
	if err != nil || string(b) != `{"TLS":"verified"}` {
		t.Fatalf("json %s, %v", b, err)
	}
	var v struct{ TLS TLSMode }
	if err := json.Unmarshal([]byte(`{"TLS":"required"}`), &v); err != nil || v.TLS != TLSRequired {
		t.Fatalf("json decode %v, %v", v.TLS, err)
	}
}
