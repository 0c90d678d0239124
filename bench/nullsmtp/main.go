// Command nullsmtp is a go-smtp server that accepts and discards every
// message: the intake ceiling that bench/relay-vs-postfix compares relayd
// against (what go-smtp itself costs, with no queue behind it).
package main

import (
	"flag"
	"io"
	"log"
	"net"

	"github.com/emersion/go-smtp"
)

type backend struct{}

func (backend) NewSession(*smtp.Conn) (smtp.Session, error) { return session{}, nil }

type session struct{}

func (session) Mail(string, *smtp.MailOptions) error { return nil }
func (session) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (session) Data(r io.Reader) error {
	_, err := io.Copy(io.Discard, r)
	return err
}
func (session) Reset()        {}
func (session) Logout() error { return nil }

func main() {
	addr := flag.String("listen", "127.0.0.1:2600", "listen address (loopback)")
	flag.Parse()
	s := smtp.NewServer(backend{})
	s.Domain = "nullsmtp.test"
	s.MaxMessageBytes = 64 << 20
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	log.Fatal(s.Serve(l))
}
