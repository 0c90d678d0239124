// Package dnstest runs an in-process authoritative DNS server on the
// loopback interface for tests.
//
// A Server answers from the resource records a test gives it, over UDP and
// TCP on the same port of 127.0.0.1. It never recurses and never asks
// another server: a name it has no records for (and that is not the parent
// of a name it has) is NXDOMAIN; a known name without records of the asked
// type is NOERROR with an empty answer (NODATA). CNAME records are followed
// within the server's own data, the way an authoritative server answers for
// names in its zone, and the chain is returned in the answer section.
//
// UDP answers larger than 512 bytes (RFC 1035 §4.2.1), or than the
// client's EDNS0 buffer size when the query carries an OPT record
// (RFC 6891), are truncated and have the TC bit set, so a client's fallback
// to TCP can be tested; Queries counts queries per transport to prove it.
//
// Records and forced response codes may be changed while the server runs;
// all methods are safe for concurrent use. Use test names under .test or
// .invalid (RFC 2606) so that a lookup that escapes to a real resolver
// cannot reach the Internet's DNS with meaningful data.
package dnstest

import (
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/miekg/dns"
)

// Drop, given to SetRcode as the response code, makes the server read the
// matching queries and never answer them, to test client timeouts.
const Drop = -1

// maxCNAMEChain bounds how many CNAME records are followed in one answer.
const maxCNAMEChain = 8

type rrKey struct {
	name  string
	qtype uint16
}

// Server is an in-process DNS server. The zero value is not usable; call
// Start.
type Server struct {
	tb   testing.TB
	addr string
	udp  *dns.Server
	tcp  *dns.Server

	mu      sync.RWMutex
	records map[rrKey][]dns.RR
	rcodes  map[rrKey]int

	udpQueries atomic.Int64
	tcpQueries atomic.Int64
	rejectEDNS atomic.Bool

	closeOnce sync.Once
}

// Start starts a Server on a random port of 127.0.0.1, listening on UDP
// and TCP on the same port. The server is shut down by tb.Cleanup; Close
// stops it earlier.
func Start(tb testing.TB) *Server {
	tb.Helper()
	s := &Server{
		tb:      tb,
		records: make(map[rrKey][]dns.RR),
		rcodes:  make(map[rrKey]int),
	}
	var (
		pc  net.PacketConn
		ln  net.Listener
		err error
	)
	// The UDP port the kernel picks may be taken for TCP; try a few times.
	for range 20 {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			tb.Fatalf("dnstest: listen udp: %v", err)
		}
		ln, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
	}
	if err != nil {
		tb.Fatalf("dnstest: listen tcp: %v", err)
	}
	s.addr = pc.LocalAddr().String()

	handler := dns.HandlerFunc(s.serveDNS)
	udpStarted := make(chan struct{})
	tcpStarted := make(chan struct{})
	s.udp = &dns.Server{PacketConn: pc, Handler: handler, NotifyStartedFunc: func() { close(udpStarted) }}
	s.tcp = &dns.Server{Listener: ln, Handler: handler, NotifyStartedFunc: func() { close(tcpStarted) }}
	udpDone := make(chan struct{})
	tcpDone := make(chan struct{})
	go func() {
		defer close(udpDone)
		s.udp.ActivateAndServe()
	}()
	go func() {
		defer close(tcpDone)
		s.tcp.ActivateAndServe()
	}()
	<-udpStarted
	<-tcpStarted
	tb.Cleanup(func() {
		s.Close()
		<-udpDone
		<-tcpDone
	})
	return s
}

// Addr returns the server's address, "127.0.0.1:port", the same port for
// UDP and TCP.
func (s *Server) Addr() string { return s.addr }

// Close stops the server, so that later queries to Addr fail as they would
// for a server that is down. It is safe to call more than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.udp.Shutdown()
		s.tcp.Shutdown()
	})
}

// Add adds resource records given in zone-file syntax, e.g.
// "example.test. 300 IN MX 10 mx.example.test.". Names are absolute
// whether or not they end in a dot. A record that does not parse fails
// the test.
func (s *Server) Add(records ...string) {
	s.tb.Helper()
	parsed := make([]dns.RR, 0, len(records))
	for _, text := range records {
		rr, err := dns.NewRR(text)
		if err != nil {
			s.tb.Fatalf("dnstest: bad record %q: %v", text, err)
			return
		}
		if rr == nil {
			s.tb.Fatalf("dnstest: empty record %q", text)
			return
		}
		rr.Header().Name = canonical(rr.Header().Name)
		parsed = append(parsed, rr)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rr := range parsed {
		k := rrKey{rr.Header().Name, rr.Header().Rrtype}
		s.records[k] = append(s.records[k], rr)
	}
}

// Remove deletes the records of type qtype owned by name; dns.TypeANY
// deletes all of the name's records. Forced response codes are kept.
func (s *Server) Remove(name string, qtype uint16) {
	name = canonical(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.records {
		if k.name == name && (qtype == dns.TypeANY || k.qtype == qtype) {
			delete(s.records, k)
		}
	}
}

// SetRcode makes queries for name and qtype answer with rcode (e.g.
// dns.RcodeServerFailure) and no records, whatever records exist; qtype
// dns.TypeANY applies it to every type of the name. The rcode Drop makes
// the server never answer. dns.RcodeSuccess removes the override.
func (s *Server) SetRcode(name string, qtype uint16, rcode int) {
	k := rrKey{canonical(name), qtype}
	s.mu.Lock()
	defer s.mu.Unlock()
	if rcode == dns.RcodeSuccess {
		delete(s.rcodes, k)
		return
	}
	s.rcodes[k] = rcode
}

// RejectEDNS makes the server answer FORMERR to every query that carries
// an EDNS0 OPT record, like servers that predate RFC 6891, when reject is
// true.
func (s *Server) RejectEDNS(reject bool) { s.rejectEDNS.Store(reject) }

// Queries returns how many queries the server has received over network,
// "udp" or "tcp"; any other value gives the total.
func (s *Server) Queries(network string) int {
	switch network {
	case "udp":
		return int(s.udpQueries.Load())
	case "tcp":
		return int(s.tcpQueries.Load())
	}
	return int(s.udpQueries.Load() + s.tcpQueries.Load())
}

func canonical(name string) string {
	return dns.CanonicalName(name)
}

func (s *Server) serveDNS(w dns.ResponseWriter, req *dns.Msg) {
	_, isUDP := w.RemoteAddr().(*net.UDPAddr)
	if isUDP {
		s.udpQueries.Add(1)
	} else {
		s.tcpQueries.Add(1)
	}

	m := new(dns.Msg)
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		m.SetRcode(req, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	if s.rejectEDNS.Load() && req.IsEdns0() != nil {
		m.SetRcode(req, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	m.SetReply(req)
	m.Authoritative = true
	q := req.Question[0]

	rcode, drop := s.answer(m, canonical(q.Name), q.Qtype)
	if drop {
		return
	}
	m.Rcode = rcode

	size := dns.MinMsgSize
	if opt := req.IsEdns0(); opt != nil {
		if sz := int(opt.UDPSize()); sz > size {
			size = sz
		}
		m.SetEdns0(opt.UDPSize(), false)
	}
	if isUDP {
		m.Truncate(size)
	} else {
		m.Compress = true
	}
	w.WriteMsg(m)
}

// answer fills m's answer section for name and qtype and returns the
// response code, or drop when the query must not be answered.
func (s *Server) answer(m *dns.Msg, name string, qtype uint16) (rcode int, drop bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	for range maxCNAMEChain {
		if rc, ok := s.forced(name, qtype); ok {
			if rc == Drop {
				return 0, true
			}
			return rc, false
		}
		if rrs := s.records[rrKey{name, qtype}]; len(rrs) > 0 {
			m.Answer = append(m.Answer, copyRRs(rrs)...)
			return dns.RcodeSuccess, false
		}
		cname := s.records[rrKey{name, dns.TypeCNAME}]
		if len(cname) == 0 || qtype == dns.TypeCNAME {
			if s.exists(name) {
				return dns.RcodeSuccess, false
			}
			return dns.RcodeNameError, false
		}
		m.Answer = append(m.Answer, dns.Copy(cname[0]))
		name = canonical(cname[0].(*dns.CNAME).Target)
	}
	// A CNAME chain too long (or a loop): what an authoritative server
	// that gives up would say.
	return dns.RcodeServerFailure, false
}

func (s *Server) forced(name string, qtype uint16) (int, bool) {
	if rc, ok := s.rcodes[rrKey{name, qtype}]; ok {
		return rc, true
	}
	rc, ok := s.rcodes[rrKey{name, dns.TypeANY}]
	return rc, ok
}

// exists reports whether name owns records or is an empty non-terminal
// (the parent of a name that owns records).
func (s *Server) exists(name string) bool {
	for k := range s.records {
		if k.name == name || strings.HasSuffix(k.name, "."+name) {
			return true
		}
	}
	for k := range s.rcodes {
		if k.name == name {
			return true
		}
	}
	return false
}

func copyRRs(rrs []dns.RR) []dns.RR {
	out := make([]dns.RR, len(rrs))
	for i, rr := range rrs {
		out[i] = dns.Copy(rr)
	}
	return out
}
