package relay

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/queue"
)

// BenchmarkServer_Intake measures SMTP intake over loopback: 5 KB
// messages from 1 and 16 concurrent clients (one connection each, several
// messages per connection; plaintext, and implicit TLS for 16) into a
// Submitter that discards the body.
//
//	go test -run '^$' -bench BenchmarkServer_Intake -benchtime 5000x ./relay/
func BenchmarkServer_Intake(b *testing.B) {
	line := strings.Repeat("x", 76) + "\r\n"
	body := "From: a@sender.test\r\nTo: b@dest.test\r\nSubject: bench\r\n\r\n" + strings.Repeat(line, 5000/len(line))
	ca := testcert.NewCA()
	for _, bc := range []struct {
		clients int
		tls     bool
	}{{1, false}, {16, false}, {16, true}} {
		clients := bc.clients
		name := fmt.Sprintf("clients=%d", clients)
		if bc.tls {
			name += ",tls"
		}
		b.Run(name, func(b *testing.B) {
			var got atomic.Int64
			srv, err := NewServer(ServerConfig{
				Hostname: stHost,
				Submitter: SubmitterFunc(func(ctx context.Context, env *queue.Envelope, r io.Reader) (queue.ID, error) {
					n, err := io.Copy(io.Discard, r)
					got.Add(n)
					return "BENCH", err
				}),
				AddrAuthenticator: stLoopbackAllowList(b),
				TLSConfig:         ca.ServerConfig(stHost),
				MaxConns:          -1,
			})
			if err != nil {
				b.Fatal(err)
			}
			l := stListen(b)
			if bc.tls {
				go srv.ServeTLS(l)
			} else {
				go srv.Serve(l)
			}
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				srv.Shutdown(ctx)
			}()
			conns := make([]*smtp.Client, clients)
			for i := range conns {
				var c *smtp.Client
				var err error
				if bc.tls {
					c, err = smtp.DialTLS(l.Addr().String(), ca.ClientConfig(stHost))
				} else {
					c, err = smtp.Dial(l.Addr().String())
				}
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Hello("bench.test"); err != nil {
					b.Fatal(err)
				}
				conns[i] = c
			}
			b.SetBytes(int64(len(body)))
			b.ResetTimer()
			start := time.Now()
			var next atomic.Int64
			var wg sync.WaitGroup
			for _, c := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						if err := c.SendMail("a@sender.test", []string{"b@dest.test"}, strings.NewReader(body)); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.StopTimer()
			for _, c := range conns {
				c.Quit()
			}
			if got.Load() < int64(b.N*len(body)) {
				b.Fatalf("submitter got %d bytes, want at least %d", got.Load(), b.N*len(body))
			}
		})
	}
}

// BenchmarkServer_Intake_GoSMTPBaseline is the same load against a bare
// go-smtp server whose session discards the body: the cost of Server's
// checks is the difference.
func BenchmarkServer_Intake_GoSMTPBaseline(b *testing.B) {
	line := strings.Repeat("x", 76) + "\r\n"
	body := "From: a@sender.test\r\nTo: b@dest.test\r\nSubject: bench\r\n\r\n" + strings.Repeat(line, 5000/len(line))
	for _, clients := range []int{1, 16} {
		b.Run(fmt.Sprintf("clients=%d", clients), func(b *testing.B) {
			ss := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) { return discardSession{}, nil }))
			ss.Domain = stHost
			l := stListen(b)
			go ss.Serve(l)
			defer ss.Close()
			conns := make([]*smtp.Client, clients)
			for i := range conns {
				c, err := smtp.Dial(l.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				conns[i] = c
			}
			b.SetBytes(int64(len(body)))
			b.ResetTimer()
			start := time.Now()
			var next atomic.Int64
			var wg sync.WaitGroup
			for _, c := range conns {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						if err := c.SendMail("a@sender.test", []string{"b@dest.test"}, strings.NewReader(body)); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.StopTimer()
			for _, c := range conns {
				c.Quit()
			}
		})
	}
}

type discardSession struct{}

func (discardSession) Reset()                                         {}
func (discardSession) Logout() error                                  { return nil }
func (discardSession) Mail(from string, opts *smtp.MailOptions) error { return nil }
func (discardSession) Rcpt(to string, opts *smtp.RcptOptions) error   { return nil }
func (discardSession) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}
