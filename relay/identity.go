package relay

import (
	"slices"

	"github.com/batonmail/baton/auth"
	"github.com/batonmail/baton/policy"
)

// ScopeSend is the API key scope needed to submit mail. Identities without
// scopes (passwords, allow-lists) may submit.
const ScopeSend = "send"

// PolicyClient returns the policy's view of an identity: an authenticated
// client with the identity's name, sender restrictions, size cap, rate,
// scopes and sandbox flag. The caller fills in Addr, HELO and TLS. A nil
// identity gives an unauthenticated client.
func PolicyClient(id *auth.Identity) policy.Client {
	var c policy.Client
	setIdentity(&c, id)
	return c
}

// setIdentity sets the identity fields of c from id (clearing them when id
// is nil) and leaves the connection fields and the policy's own
// per-connection state alone.
func setIdentity(c *policy.Client, id *auth.Identity) {
	if id == nil {
		c.Authenticated, c.Identity = false, ""
		c.SenderDomains, c.SenderAddrs, c.Scopes = nil, nil, nil
		c.MaxSize, c.Rate, c.Sandbox = 0, policy.Rate{}, false
		return
	}
	c.Authenticated = true
	c.Identity = id.Name
	c.SenderDomains = slices.Clone(id.SenderDomains)
	c.SenderAddrs = slices.Clone(id.SenderAddrs)
	c.MaxSize = id.MaxSize
	c.Rate = policy.Rate{Messages: id.Rate.Messages, Recipients: id.Rate.Recipients, Per: id.Rate.Per}
	c.Scopes = slices.Clone(id.Scopes)
	c.Sandbox = id.Sandbox
}

// resetAuth returns c to what the connection is without AUTH: the
// allow-list identity when there is one, unauthenticated otherwise.
func resetAuth(c *policy.Client, allowed *auth.Identity) { setIdentity(c, allowed) }

// maySend reports whether an identity's scopes allow submitting mail: the
// "send" scope, or "send:sandbox" for a sandbox identity (whose mail is
// only captured), as auth.Identity.MaySend decides.
func maySend(c *policy.Client) bool {
	id := auth.Identity{Scopes: c.Scopes, Sandbox: c.Sandbox}
	return id.MaySend()
}
