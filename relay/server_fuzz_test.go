package relay

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/internal/testcert"
	"github.com/batonmail/baton/queue"
)

// FuzzServerSession sends whole SMTP sessions to a live listener. The
// input is split into lines at CRLF; each line is written on its own
// (keeping any bare CR or LF inside it), then the client half-closes.
// Invariants: the server does not panic, every reply line is well-formed
// with an enhanced code of the same class as the reply code, no reply
// reports an internal error, and a fresh client is served afterwards.
//
// The seed corpus is in testdata/fuzz/FuzzServerSession; a plain go test
// runs the seeds only. Fuzz with
//
//	go test -run '^$' -fuzz FuzzServerSession -fuzztime 60s ./relay/
func FuzzServerSession(f *testing.F) {
	ca := testcert.NewCA()
	srv, err := NewServer(ServerConfig{
		Hostname: stHost,
		Submitter: SubmitterFunc(func(ctx context.Context, env *queue.Envelope, body io.Reader) (queue.ID, error) {
			_, err := io.Copy(io.Discard, body)
			return "FUZZ", err
		}),
		Authenticator:     stAuthenticator(),
		AddrAuthenticator: stLoopbackAllowList(f),
		AllowInsecureAuth: true,
		TLSConfig:         ca.ServerConfig(stHost),
		MaxMessageBytes:   4096,
		MaxHeaderBytes:    1024,
		MaxRecipients:     5,
		IdleTimeout:       5 * time.Second,
	})
	if err != nil {
		f.Fatal(err)
	}
	l := stListen(f)
	go srv.Serve(l)
	f.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	addr := l.Addr().String()

	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second)) // hang guard
		replies := make(chan []string, 1)
		go func() {
			var lines []string
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if line != "" {
					lines = append(lines, line)
				}
				if err != nil {
					break
				}
			}
			replies <- lines
		}()
		for _, line := range bytes.SplitAfter(in, []byte("\r\n")) {
			if _, err := c.Write(line); err != nil {
				break // the server may close early (421, too many errors)
			}
		}
		c.(*net.TCPConn).CloseWrite()
		for _, line := range <-replies {
			if err := checkReplyLine(line); err != nil {
				t.Errorf("reply %q: %v", line, err)
			}
		}

		fresh, err := smtp.Dial(addr)
		if err != nil {
			t.Fatalf("fresh client: %v", err)
		}
		defer fresh.Close()
		if err := fresh.Hello("fresh.test"); err != nil {
			t.Fatalf("fresh client EHLO: %v", err)
		}
		if err := fresh.Quit(); err != nil {
			t.Fatalf("fresh client QUIT: %v", err)
		}
	})
}

// checkReplyLine checks one reply line: "ddd" then ' ' or '-', an
// enhanced code (when present) of the reply's class, CRLF at the end, and
// no sign of a recovered panic.
func checkReplyLine(line string) error {
	if !strings.HasSuffix(line, "\r\n") {
		return errorString("not terminated by CRLF")
	}
	line = strings.TrimSuffix(line, "\r\n")
	if len(line) < 4 || line[3] != ' ' && line[3] != '-' {
		return errorString("malformed")
	}
	code, err := strconv.Atoi(line[:3])
	if err != nil || code < 200 || code > 599 {
		return errorString("bad code")
	}
	if strings.ContainsAny(line, "\r\n") {
		return errorString("CR or LF inside")
	}
	if strings.Contains(line, "Internal server error") {
		return errorString("server panicked")
	}
	return stEnhancedMismatch(code, line[4:])
}

type errorString string

func (e errorString) Error() string { return string(e) }

// FuzzCheckPath checks that an address checkPath accepts survives the
// trip through go-smtp's form (local part unquoted) and canonicalAddr:
// the canonical address is accepted again and names the same mailbox.
func FuzzCheckPath(f *testing.F) {
	for _, s := range []string{
		"<a@b.test>", `<"a b"@c.test>`, `<"a\"b\\c"@d.test>`, `<"x@y"@z.test>`, "<@r.test:a@b.test>",
		"<a@[IPv6:2001:db8::1]>", "<jörg@bücher.test> SMTPUTF8", "<>", "a@b.test",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, arg string) {
		if checkPath(arg, false) != nil {
			return
		}
		s := strings.TrimPrefix(arg, "<")
		if strings.HasPrefix(s, "@") {
			s = s[strings.IndexByte(s, ':')+1:]
		}
		local, rest, _ := splitLocal(s)
		domain := rest[1:]
		if i := strings.IndexAny(domain, "> \t"); i >= 0 {
			domain = domain[:i]
		}
		unquoted := local
		if strings.HasPrefix(local, `"`) {
			var b strings.Builder
			for i := 1; i < len(local)-1; i++ {
				if local[i] == '\\' {
					i++
				}
				b.WriteByte(local[i])
			}
			unquoted = b.String()
		}
		canon := canonicalAddr(unquoted + "@" + domain)
		if err := checkPath("<"+canon+">", false); err != nil {
			t.Fatalf("%q: canonical form %q refused", arg, canon)
		}
		again, _, _ := splitLocal(canon)
		if again != local && !(strings.HasPrefix(local, `"`) && isDotString(unquoted) && again == unquoted) {
			if strings.HasPrefix(local, `"`) && again == quoteLocal(unquoted) {
				return // the same quoted string, escaped only where needed
			}
			t.Fatalf("%q: local part %q became %q", arg, local, again)
		}
	})
}
