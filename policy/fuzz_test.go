package policy

import (
	"strings"
	"testing"
)

// FuzzClosedRelay checks the closed-relay promise on arbitrary recipient
// strings: whatever an unauthenticated client is allowed to reach must,
// by a simple independent reading, be a plain mailbox at a local domain.
// Plain "go test" runs the seeds; "go test -fuzz FuzzClosedRelay" explores.
func FuzzClosedRelay(f *testing.F) {
	for _, s := range openRelayProbes {
		f.Add(s)
	}
	f.Add("user@relay.test")
	f.Add(`"x"@RELAY.test.`)
	f.Add("a@b.sub.relay.test")
	p := NewClosedRelay(&ClosedRelayConfig{LocalDomains: []string{"relay.test", ".sub.relay.test"}})
	c := unauth("198.51.100.1")
	f.Fuzz(func(t *testing.T, to string) {
		err := p.Rcpt(ctx, c, "", to)
		if err != nil {
			if r := reply(err); r != "554 5.7.1" {
				t.Fatalf("Rcpt(%q) = %s, want ok or 554 5.7.1", to, r)
			}
			return
		}
		at := strings.LastIndexByte(to, '@')
		if at <= 0 {
			t.Fatalf("accepted %q without local part and domain", to)
		}
		local, domain := to[:at], strings.ToLower(strings.TrimSuffix(to[at+1:], "."))
		if domain != "relay.test" && !(strings.HasSuffix(domain, ".sub.relay.test") && !strings.ContainsAny(domain, "@%![]: \t\r\n,<>")) {
			t.Fatalf("accepted %q: domain %q is not local", to, domain)
		}
		if strings.ContainsAny(local, "@%!:\r\n") || strings.HasPrefix(to, "@") {
			t.Fatalf("accepted %q: local part %q could route elsewhere", to, local)
		}
	})
}
