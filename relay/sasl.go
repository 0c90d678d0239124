package relay

import (
	"bytes"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/batonmail/baton/policy"
)

// SASL mechanisms offered by the server (RFC 4954). go-sasl has no server
// side for LOGIN, and its PLAIN server puts its own error text in replies,
// so both live here.

// credentialsFunc checks a user name and password and returns nil or the
// *smtp.SMTPError to answer.
type credentialsFunc func(username, password string) error

var errSASLMalformed = policy.Reject(501, [3]int{5, 5, 2}, "Malformed authentication response")

// plainServer is the PLAIN mechanism (RFC 4616): one message
// "authzid NUL authcid NUL passwd". An authorization identity other than
// the user's own is refused: the server does not act on behalf of others.
type plainServer struct {
	check credentialsFunc
	done  bool
}

func newPlainServer(check credentialsFunc) sasl.Server { return &plainServer{check: check} }

// Next implements sasl.Server.
func (p *plainServer) Next(response []byte) (challenge []byte, done bool, err error) {
	if p.done {
		return nil, true, errSASLMalformed
	}
	if response == nil {
		// No initial response: ask for it with an empty challenge.
		return []byte{}, false, nil
	}
	p.done = true
	parts := bytes.Split(response, []byte{0})
	if len(parts) != 3 {
		return nil, true, errSASLMalformed
	}
	authz, user, pass := string(parts[0]), string(parts[1]), string(parts[2])
	if authz != "" && authz != user {
		return nil, true, smtp.ErrAuthFailed
	}
	return nil, true, p.check(user, pass)
}

// loginServer is the LOGIN mechanism (draft-murchison-sasl-login): the
// server asks "Username:" and "Password:" in turn. An initial response is
// taken as the user name.
type loginServer struct {
	check    credentialsFunc
	step     int
	username string
}

func newLoginServer(check credentialsFunc) sasl.Server { return &loginServer{check: check} }

// Next implements sasl.Server.
func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.step {
	case 0:
		if response == nil {
			l.step = 1
			return []byte("Username:"), false, nil
		}
		l.username = string(response)
		l.step = 2
		return []byte("Password:"), false, nil
	case 1:
		l.username = string(response)
		l.step = 2
		return []byte("Password:"), false, nil
	case 2:
		l.step = 3
		return nil, true, l.check(l.username, string(response))
	}
	return nil, true, errSASLMalformed
}
