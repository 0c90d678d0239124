package relay

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/batonmail/baton/mx"
)

// sdBenchBody is a message of about size bytes with 76-character lines.
func sdBenchBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: sender@example.test\r\nTo: rcpt@example.test\r\nSubject: bench\r\n\r\n")
	line := bytes.Repeat([]byte("abcdefghij"), 8)[:76]
	for b.Len() < size {
		b.Write(line)
		b.WriteString("\r\n")
	}
	return b.Bytes()
}

// BenchmarkSMTPDeliver measures deliveries per second over loopback to a
// go-smtp server that discards what it receives, with and without
// connection reuse, in plaintext and with STARTTLS, one delivery at a time
// ("serial") and from several goroutines ("parallel").
func BenchmarkSMTPDeliver(b *testing.B) {
	pki := newSDPKI(b, "mx.example.test")
	for _, tlsOn := range []bool{false, true} {
		for _, reuse := range []bool{true, false} {
			for _, size := range []int{5 << 10, 100 << 10} {
				for _, par := range []bool{false, true} {
					name := fmt.Sprintf("tls=%v/reuse=%v/size=%dKB/parallel=%v", tlsOn, reuse, size>>10, par)
					b.Run(name, func(b *testing.B) {
						cfg := sdPeerConfig{Discard: true}
						if tlsOn {
							cfg.TLS = pki.Server
						}
						p := newSDPeer(b, cfg)
						dcfg := SMTPDelivererConfig{TLSConfig: &tls.Config{RootCAs: pki.Roots}}
						if !reuse {
							dcfg.IdleTimeout = -1
						}
						d := newTestDeliverer(b, dcfg)
						route := sdRoute("bench", mx.TLSOpportunistic, p.host("mx.example.test"))
						body := sdBenchBody(size)
						b.SetBytes(int64(len(body)))
						deliver := func() {
							res := d.Deliver(b.Context(), sdDelivery(route, sdEnv("rcpt@example.test"), body))
							if res.Replies[0].Code != 250 {
								b.Fatalf("delivery failed: %v", res.Replies[0])
							}
						}
						if par {
							b.SetParallelism(4)
							b.RunParallel(func(pb *testing.PB) {
								for pb.Next() {
									deliver()
								}
							})
						} else {
							for b.Loop() {
								deliver()
							}
						}
						b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
						conns, _, _ := p.stats()
						b.ReportMetric(float64(conns)/float64(b.N), "conns/msg")
					})
				}
			}
		}
	}
}
