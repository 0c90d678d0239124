package auth

import (
	"context"
	"errors"
	"net/netip"
)

// Multi is an Authenticator that tries several in order and returns the
// first identity. It answers ErrInvalidCredentials only when every member
// refused the credentials; when none accepted and some member failed to
// check (any other error), that error is returned so the server answers
// with a temporary failure instead of a misleading "wrong password".
//
// Put cheap, narrowly matching authenticators first: APIKeys refuses every
// user name but its own in nanoseconds, while a PasswordFile spends a
// bcrypt comparison even on unknown users. Multi(keys, users) therefore
// costs one hash for API-key logins and one bcrypt for password logins.
//
// A nil member is skipped, so optional authenticators can be listed as
// they are.
func Multi(auths ...Authenticator) Authenticator {
	var list []Authenticator
	for _, a := range auths {
		if a != nil {
			list = append(list, a)
		}
	}
	return multi(list)
}

type multi []Authenticator

// Authenticate asks each member in turn.
func (m multi) Authenticate(ctx context.Context, username, password string) (*Identity, error) {
	var failure error
	for _, a := range m {
		id, err := a.Authenticate(ctx, username, password)
		if err == nil && id != nil {
			return id, nil
		}
		if err == nil || errors.Is(err, ErrInvalidCredentials) {
			continue
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if failure == nil {
			failure = err
		}
	}
	if failure != nil {
		return nil, failure
	}
	return nil, ErrInvalidCredentials
}

// MultiAddr is an AddrAuthenticator that asks several in order and returns
// the first identity; it returns ErrNotAllowed when all said so, or the
// first other error. Nil members are skipped.
func MultiAddr(auths ...AddrAuthenticator) AddrAuthenticator {
	var list []AddrAuthenticator
	for _, a := range auths {
		if a != nil {
			list = append(list, a)
		}
	}
	return multiAddr(list)
}

type multiAddr []AddrAuthenticator

// AuthenticateAddr asks each member in turn.
func (m multiAddr) AuthenticateAddr(ctx context.Context, addr netip.Addr) (*Identity, error) {
	var failure error
	for _, a := range m {
		id, err := a.AuthenticateAddr(ctx, addr)
		if err == nil && id != nil {
			return id, nil
		}
		if err != nil && !errors.Is(err, ErrNotAllowed) && failure == nil {
			failure = err
		}
	}
	if failure != nil {
		return nil, failure
	}
	return nil, ErrNotAllowed
}
