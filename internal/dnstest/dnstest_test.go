package dnstest

import (
	"fmt"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func query(t *testing.T, s *Server, network, name string, qtype uint16, edns uint16) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	if edns > 0 {
		m.SetEdns0(edns, false)
	}
	r, _, err := c.Exchange(m, s.Addr())
	if err != nil {
		t.Fatalf("exchange %s %s over %s: %v", name, dns.TypeToString[qtype], network, err)
	}
	return r
}

func TestServer_AnswersKnownRecords(t *testing.T) {
	s := Start(t)
	s.Add("Example.TEST. 300 IN MX 10 mx.example.test.", "mx.example.test 300 IN A 192.0.2.1")
	for _, network := range []string{"udp", "tcp"} {
		r := query(t, s, network, "example.test", dns.TypeMX, 0)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
			t.Fatalf("%s: got rcode %d, %d answers", network, r.Rcode, len(r.Answer))
		}
		mx, ok := r.Answer[0].(*dns.MX)
		if !ok || mx.Mx != "mx.example.test." || mx.Preference != 10 {
			t.Fatalf("%s: got %v", network, r.Answer[0])
		}
		if !r.Authoritative {
			t.Errorf("%s: AA not set", network)
		}
	}
	if got := s.Queries("udp"); got != 1 {
		t.Errorf("udp queries = %d, want 1", got)
	}
	if got := s.Queries("tcp"); got != 1 {
		t.Errorf("tcp queries = %d, want 1", got)
	}
	if got := s.Queries(""); got != 2 {
		t.Errorf("total queries = %d, want 2", got)
	}
}

func TestServer_NXDOMAINvsNODATA(t *testing.T) {
	s := Start(t)
	s.Add("a.b.example.test. 300 IN A 192.0.2.1")
	tests := []struct {
		name  string
		qtype uint16
		rcode int
	}{
		{"a.b.example.test", dns.TypeA, dns.RcodeSuccess},
		{"a.b.example.test", dns.TypeMX, dns.RcodeSuccess}, // NODATA
		{"b.example.test", dns.TypeA, dns.RcodeSuccess},    // empty non-terminal
		{"nowhere.example.test", dns.TypeA, dns.RcodeNameError},
	}
	for _, tt := range tests {
		r := query(t, s, "udp", tt.name, tt.qtype, 0)
		if r.Rcode != tt.rcode {
			t.Errorf("%s %s: rcode %s, want %s", tt.name, dns.TypeToString[tt.qtype],
				dns.RcodeToString[r.Rcode], dns.RcodeToString[tt.rcode])
		}
		if tt.name != "a.b.example.test" || tt.qtype != dns.TypeA {
			if len(r.Answer) != 0 {
				t.Errorf("%s %s: unexpected answers %v", tt.name, dns.TypeToString[tt.qtype], r.Answer)
			}
		}
	}
}

func TestServer_FollowsCNAME(t *testing.T) {
	s := Start(t)
	s.Add(
		"alias.example.test. 300 IN CNAME alias2.example.test.",
		"alias2.example.test. 300 IN CNAME real.example.test.",
		"real.example.test. 300 IN A 192.0.2.7",
		"dangling.example.test. 300 IN CNAME gone.example.test.",
		"loop1.example.test. 300 IN CNAME loop2.example.test.",
		"loop2.example.test. 300 IN CNAME loop1.example.test.",
	)
	r := query(t, s, "udp", "alias.example.test", dns.TypeA, 0)
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 3 {
		t.Fatalf("got rcode %d answers %v", r.Rcode, r.Answer)
	}
	if a, ok := r.Answer[2].(*dns.A); !ok || a.A.String() != "192.0.2.7" {
		t.Fatalf("last answer %v", r.Answer[2])
	}
	r = query(t, s, "udp", "alias.example.test", dns.TypeCNAME, 0)
	if len(r.Answer) != 1 {
		t.Fatalf("CNAME query: answers %v", r.Answer)
	}
	r = query(t, s, "udp", "dangling.example.test", dns.TypeA, 0)
	if r.Rcode != dns.RcodeNameError || len(r.Answer) != 1 {
		t.Fatalf("dangling: rcode %d answers %v", r.Rcode, r.Answer)
	}
	r = query(t, s, "udp", "loop1.example.test", dns.TypeA, 0)
	if r.Rcode != dns.RcodeServerFailure {
		t.Fatalf("loop: rcode %d", r.Rcode)
	}
}

func TestServer_TruncatesLargeUDPAnswers(t *testing.T) {
	s := Start(t)
	for i := range 60 {
		s.Add(fmt.Sprintf("big.example.test. 300 IN MX %d mx%02d.some-longer-name.example.test.", i, i))
	}
	r := query(t, s, "udp", "big.example.test", dns.TypeMX, 0)
	if !r.Truncated {
		t.Fatalf("UDP answer without EDNS0 not truncated (%d answers)", len(r.Answer))
	}
	r.Compress = true
	if n := r.Len(); n > 512 || len(r.Answer) >= 60 {
		t.Fatalf("truncated answer is %d bytes", n)
	}
	r = query(t, s, "udp", "big.example.test", dns.TypeMX, 1232)
	if !r.Truncated {
		t.Fatalf("UDP answer with EDNS0 1232 not truncated (%d answers)", len(r.Answer))
	}
	r = query(t, s, "udp", "big.example.test", dns.TypeMX, 8192)
	if r.Truncated || len(r.Answer) != 60 {
		t.Fatalf("UDP answer with EDNS0 8192: truncated=%v answers=%d", r.Truncated, len(r.Answer))
	}
	r = query(t, s, "tcp", "big.example.test", dns.TypeMX, 0)
	if r.Truncated || len(r.Answer) != 60 {
		t.Fatalf("TCP answer: truncated=%v answers=%d", r.Truncated, len(r.Answer))
	}
	small := query(t, s, "udp", "big.example.test", dns.TypeA, 0)
	if small.Truncated {
		t.Fatalf("small answer truncated")
	}
}

func TestServer_SetRcodeAndRemove(t *testing.T) {
	s := Start(t)
	s.Add("example.test. 300 IN A 192.0.2.1", "example.test. 300 IN MX 0 example.test.")
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeServerFailure)
	if r := query(t, s, "udp", "example.test", dns.TypeMX, 0); r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 {
		t.Fatalf("forced SERVFAIL: rcode %d answers %v", r.Rcode, r.Answer)
	}
	if r := query(t, s, "udp", "example.test", dns.TypeA, 0); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("A after MX SERVFAIL: rcode %d answers %v", r.Rcode, r.Answer)
	}
	s.SetRcode("example.test", dns.TypeANY, dns.RcodeRefused)
	if r := query(t, s, "udp", "example.test", dns.TypeA, 0); r.Rcode != dns.RcodeRefused {
		t.Fatalf("ANY override: rcode %d", r.Rcode)
	}
	s.SetRcode("example.test", dns.TypeANY, dns.RcodeSuccess)
	s.SetRcode("example.test", dns.TypeMX, dns.RcodeSuccess)
	if r := query(t, s, "udp", "example.test", dns.TypeMX, 0); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("cleared override: rcode %d answers %v", r.Rcode, r.Answer)
	}
	s.Remove("example.test", dns.TypeMX)
	if r := query(t, s, "udp", "example.test", dns.TypeMX, 0); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Fatalf("removed MX: rcode %d answers %v", r.Rcode, r.Answer)
	}
	s.Remove("example.test", dns.TypeANY)
	if r := query(t, s, "udp", "example.test", dns.TypeA, 0); r.Rcode != dns.RcodeNameError {
		t.Fatalf("removed all: rcode %d", r.Rcode)
	}
}

func TestServer_DropNeverAnswers(t *testing.T) {
	s := Start(t)
	s.SetRcode("slow.example.test", dns.TypeA, Drop)
	c := &dns.Client{Net: "udp", Timeout: 200 * time.Millisecond}
	m := new(dns.Msg)
	m.SetQuestion("slow.example.test.", dns.TypeA)
	if _, _, err := c.Exchange(m, s.Addr()); err == nil {
		t.Fatal("got an answer to a dropped query")
	}
	if s.Queries("udp") != 1 {
		t.Fatalf("udp queries = %d", s.Queries("udp"))
	}
}

func TestServer_Close(t *testing.T) {
	s := Start(t)
	s.Add("example.test. 300 IN A 192.0.2.1")
	s.Close()
	c := &dns.Client{Net: "tcp", Timeout: 2 * time.Second}
	m := new(dns.Msg)
	m.SetQuestion("example.test.", dns.TypeA)
	if _, _, err := c.Exchange(m, s.Addr()); err == nil {
		t.Fatal("closed server answered over TCP")
	}
	s.Close() // idempotent
}

func TestServer_ConcurrentUpdates(t *testing.T) {
	s := Start(t)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 200 {
			s.Add(fmt.Sprintf("c.example.test. 300 IN A 192.0.2.%d", i%250+1))
			if i%10 == 0 {
				s.Remove("c.example.test", dns.TypeA)
			}
		}
	}()
	for range 50 {
		r := query(t, s, "udp", "c.example.test", dns.TypeA, 4096)
		if r.Rcode != dns.RcodeSuccess && r.Rcode != dns.RcodeNameError {
			t.Fatalf("rcode %d", r.Rcode)
		}
	}
	<-done
}

func TestServer_RejectEDNS(t *testing.T) {
	s := Start(t)
	s.Add("example.test. 300 IN A 192.0.2.1")
	s.RejectEDNS(true)
	if r := query(t, s, "udp", "example.test", dns.TypeA, 1232); r.Rcode != dns.RcodeFormatError || len(r.Answer) != 0 {
		t.Fatalf("EDNS0 query: rcode %d answers %v", r.Rcode, r.Answer)
	}
	if r := query(t, s, "udp", "example.test", dns.TypeA, 0); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Fatalf("plain query: rcode %d answers %v", r.Rcode, r.Answer)
	}
	s.RejectEDNS(false)
	if r := query(t, s, "udp", "example.test", dns.TypeA, 1232); r.Rcode != dns.RcodeSuccess || r.IsEdns0() == nil {
		t.Fatalf("EDNS0 query after reset: rcode %d", r.Rcode)
	}
}
