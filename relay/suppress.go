package relay

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/batonmail/baton/queue"
)

// Suppression records a recipient address that failed permanently in a way
// that says the mailbox does not exist (see ShouldSuppress). Later messages
// to a suppressed address are not attempted: the relay fails the recipient
// at once with SuppressedReply, sends the usual DSN and emits an
// EventSuppressed, so the sender learns about it and nothing is silently
// dropped.
type Suppression struct {
	// Addr is the suppressed address, local@domain. Stores compare
	// addresses case-insensitively (see SuppressionKey).
	Addr string `json:"addr"`
	// Reply is the permanent failure that caused the suppression. The
	// reply that fails a suppressed recipient later is SuppressedReply(s).
	Reply queue.Reply `json:"reply"`
	// ID is the queue ID of the message whose delivery failed, if known.
	ID queue.ID `json:"id,omitempty"`
	// Created is when the suppression was recorded; a store sets it to
	// its clock's time when it is zero.
	Created time.Time `json:"created"`
	// Expires is when the suppression lapses; a store sets it to Created
	// plus its TTL when it is zero.
	Expires time.Time `json:"expires"`
}

// Expired reports whether s has lapsed at now.
func (s Suppression) Expired(now time.Time) bool {
	return !s.Expires.IsZero() && !now.Before(s.Expires)
}

// SuppressedReply is the local reply that fails a recipient found on the
// suppression list: 550 with the enhanced code of the original failure
// (5.1.1 when it had none), and a text that names the earlier failure so
// the DSN explains itself. It has no Host, as it is a local decision.
func SuppressedReply(s *Suppression) queue.Reply {
	enh := "5.1.1"
	if e, ok := dsnParseEnhanced(s.Reply.Enhanced); ok && e[0] == 5 {
		enh = s.Reply.Enhanced
	}
	text := suppressedText
	if !s.Created.IsZero() {
		text += " on " + s.Created.UTC().Format(time.DateOnly)
	}
	if s.Reply.Code != 0 {
		prev := s.Reply
		prev.Text = dsnOneLine(prev.Text, 200)
		text += " (" + prev.String() + ")"
	}
	text += "; not attempted"
	return queue.Reply{Code: 550, Enhanced: enh, Text: text}
}

// suppressedText starts every SuppressedReply text.
const suppressedText = "Recipient suppressed after an earlier permanent failure"

// suppressEnhanced lists the RFC 3463 enhanced codes that say an address
// does not (or no longer) exist.
var suppressEnhanced = map[string]bool{
	"5.1.1":  true, // bad destination mailbox address
	"5.1.2":  true, // bad destination system address (domain does not exist / null MX)
	"5.1.6":  true, // destination mailbox has moved, no forwarding address
	"5.1.10": true, // RFC 7505 null MX
	"5.2.1":  true, // mailbox disabled, not accepting messages
}

// suppressTexts are phrases, in lower case, that mark a bare "550" (or a
// "550 5.0.0") as an unknown-user reply.
var suppressTexts = []string{
	"user unknown",
	"unknown user",
	"no such user",
	"no such mailbox",
	"no such recipient",
	"unknown recipient",
	"recipient unknown",
	"mailbox not found",
	"user not found",
	"invalid recipient",
	"invalid mailbox",
	"mailbox does not exist",
	"address does not exist",
	"user does not exist",
	"account does not exist",
}

// ShouldSuppress reports whether a permanent failure means the recipient
// address should be suppressed for later messages. The rule:
//
//   - Only 5xx replies count; a temporary failure or an expiry never
//     suppresses.
//   - With an enhanced code, the code must be one of 5.1.1 (no such
//     mailbox), 5.1.2 (no such domain), 5.1.6 (mailbox moved), 5.1.10 (null
//     MX, RFC 7505) or 5.2.1 (mailbox disabled). Every other enhanced code
//     (for example 5.7.x policy blocks or 5.2.2 mailbox full) says nothing
//     about whether the address exists and does not suppress.
//   - Without an enhanced code, or with the uninformative 5.0.0, a reply
//     code 550 or 551 suppresses when its text contains a common
//     unknown-user phrase ("user unknown", "no such user", "mailbox not
//     found", ...), compared case-insensitively. The bare standard text
//     "mailbox unavailable" is not enough, since servers also use it for
//     policy refusals.
//   - A reply made by SuppressedReply never suppresses again, so an entry
//     lapses at its expiry even while mail for the address keeps coming,
//     and the address is then tried once more.
func ShouldSuppress(r queue.Reply) bool {
	if r.Code < 500 || r.Code > 599 {
		return false
	}
	if r.Host == "" && strings.HasPrefix(r.Text, suppressedText) {
		return false
	}
	if r.Enhanced != "" && r.Enhanced != "5.0.0" {
		return suppressEnhanced[r.Enhanced]
	}
	if r.Code != 550 && r.Code != 551 {
		return false
	}
	t := strings.ToLower(r.Text)
	for _, p := range suppressTexts {
		if strings.Contains(t, p) {
			return true
		}
	}
	return false
}

// SuppressionKey is how stores compare addresses: the address without
// surrounding space or angle brackets, in lower case. Local parts are case
// sensitive in theory (RFC 5321 §2.4) but not in practice, and suppressing
// "User@x" because "user@x" does not exist errs on the side of the sender.
func SuppressionKey(addr string) string {
	addr = strings.TrimSpace(addr)
	addr = strings.TrimSuffix(strings.TrimPrefix(addr, "<"), ">")
	return strings.ToLower(addr)
}

// Suppressions is a store of suppressed recipient addresses.
//
// Implementations are safe for concurrent use. Lookup returns found ==
// false for an address that was never added, was removed or has expired;
// an error means the store could not be read, and the relay then attempts
// delivery as if the address were not suppressed (failing open, and
// logging the error). Add replaces any entry for the same address and is
// durable when it returns for persistent stores. Remove of an absent
// address is not an error. List calls fn for each unexpired entry in no
// particular order; an error from fn stops the walk and is returned.
type Suppressions interface {
	Lookup(ctx context.Context, addr string) (*Suppression, bool, error)
	Add(ctx context.Context, s Suppression) error
	Remove(ctx context.Context, addr string) error
	List(ctx context.Context, fn func(Suppression) error) error
}

// DefaultSuppressionTTL is how long a suppression lasts when no TTL is
// configured.
const DefaultSuppressionTTL = 30 * 24 * time.Hour

// SuppressionConfig configures a suppression store. The zero value means
// defaults.
type SuppressionConfig struct {
	// TTL is how long an added suppression lasts when Add is given no
	// Expires (default DefaultSuppressionTTL).
	TTL time.Duration
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// MaxEntries bounds a SuppressionMemory (default 100000): adding to a
	// full store drops expired entries, and if none has expired, the one
	// that expires soonest. SuppressionDir, which holds nothing in memory,
	// ignores it.
	MaxEntries int
}

func (c SuppressionConfig) withDefaults() SuppressionConfig {
	if c.TTL <= 0 {
		c.TTL = DefaultSuppressionTTL
	}
	if c.MaxEntries <= 0 {
		c.MaxEntries = 100000
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

// prepare validates s and fills in its defaults.
func (c *SuppressionConfig) prepare(s *Suppression) error {
	s.Addr = strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s.Addr), "<"), ">"))
	if s.Addr == "" || strings.ContainsAny(s.Addr, "\r\n\x00") {
		return errInvalidSuppression
	}
	if s.Created.IsZero() {
		s.Created = c.Now()
	}
	if s.Expires.IsZero() {
		s.Expires = s.Created.Add(c.TTL)
	}
	return nil
}

var errInvalidSuppression = errors.New("relay: suppression: empty or malformed address")

// SuppressionMemory is a Suppressions store in process memory, bounded by
// SuppressionConfig.MaxEntries; nothing survives the process. It suits
// tests and embedded use.
type SuppressionMemory struct {
	cfg SuppressionConfig
	mu  sync.Mutex
	m   map[string]Suppression
}

var _ Suppressions = (*SuppressionMemory)(nil)

// NewSuppressionMemory returns an empty in-memory store.
func NewSuppressionMemory(cfg SuppressionConfig) *SuppressionMemory {
	return &SuppressionMemory{cfg: cfg.withDefaults(), m: make(map[string]Suppression)}
}

// Lookup implements Suppressions.
func (s *SuppressionMemory) Lookup(ctx context.Context, addr string) (*Suppression, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, err
	}
	k := SuppressionKey(addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	e, ok := s.m[k]
	if !ok {
		return nil, false, nil
	}
	if e.Expired(s.cfg.Now()) {
		delete(s.m, k)
		return nil, false, nil
	}
	return &e, true, nil
}

// Add implements Suppressions.
func (s *SuppressionMemory) Add(ctx context.Context, e Suppression) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := s.cfg.prepare(&e); err != nil {
		return err
	}
	k := SuppressionKey(e.Addr)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.m[k]; !ok && len(s.m) >= s.cfg.MaxEntries {
		s.evictLocked()
	}
	s.m[k] = e
	return nil
}

// evictLocked makes room for one entry: it drops every expired entry, or
// if none has expired, the one that expires soonest.
func (s *SuppressionMemory) evictLocked() {
	now := s.cfg.Now()
	var soonest string
	var at time.Time
	dropped := false
	for k, e := range s.m {
		if e.Expired(now) {
			delete(s.m, k)
			dropped = true
			continue
		}
		if soonest == "" || e.Expires.Before(at) {
			soonest, at = k, e.Expires
		}
	}
	if !dropped && soonest != "" {
		delete(s.m, soonest)
	}
}

// Remove implements Suppressions.
func (s *SuppressionMemory) Remove(ctx context.Context, addr string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, SuppressionKey(addr))
	return nil
}

// List implements Suppressions. It walks a sorted copy, so fn may call
// the store.
func (s *SuppressionMemory) List(ctx context.Context, fn func(Suppression) error) error {
	now := s.cfg.Now()
	s.mu.Lock()
	all := make([]Suppression, 0, len(s.m))
	for _, e := range s.m {
		if !e.Expired(now) {
			all = append(all, e)
		}
	}
	s.mu.Unlock()
	sort.Slice(all, func(i, j int) bool { return SuppressionKey(all[i].Addr) < SuppressionKey(all[j].Addr) })
	for _, e := range all {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := fn(e); err != nil {
			return err
		}
	}
	return nil
}

// Prune drops expired entries and returns how many it dropped.
func (s *SuppressionMemory) Prune(ctx context.Context) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, e := range s.m {
		if e.Expired(now) {
			delete(s.m, k)
			n++
		}
	}
	return n, nil
}

// dsnOneLine returns s with CR, LF, tabs and other control characters turned
// into single spaces, trimmed, and cut to at most max bytes (at a rune
// boundary) with "..." when it was longer.
func dsnOneLine(s string, max int) string {
	if (max <= 0 || len(s) <= max) && isOneLine(s) {
		return s
	}
	var b strings.Builder
	space := false
	for _, r := range s {
		if r < 0x20 || r == 0x7f || r == ' ' {
			space = b.Len() > 0
			continue
		}
		if space {
			b.WriteByte(' ')
			space = false
		}
		b.WriteRune(r)
	}
	out := b.String()
	if max > 0 && len(out) > max {
		cut := max - 3
		for cut > 0 && !utf8.RuneStart(out[cut]) {
			cut--
		}
		out = out[:cut] + "..."
	}
	return out
}

// isOneLine reports whether dsnOneLine would leave s unchanged (length
// aside): no control characters, no leading, trailing or double spaces.
func isOneLine(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < 0x20 || c == 0x7f || c == ' ' && (i == 0 || i == len(s)-1 || s[i-1] == ' ') {
			return false
		}
	}
	return true
}

// dsnParseEnhanced parses an RFC 3463 enhanced status code "c.s.d".
func dsnParseEnhanced(s string) ([3]int, bool) {
	var e [3]int
	parts := strings.Split(s, ".")
	if len(parts) != 3 {
		return e, false
	}
	for i, p := range parts {
		if p == "" || len(p) > 3 {
			return e, false
		}
		n := 0
		for _, c := range p {
			if c < '0' || c > '9' {
				return e, false
			}
			n = n*10 + int(c-'0')
		}
		e[i] = n
	}
	if e[0] != 2 && e[0] != 4 && e[0] != 5 {
		return e, false
	}
	return e, true
}

// String formats a suppression for logs and the relayd subcommand.
func (s Suppression) String() string {
	return fmt.Sprintf("%s until %s (%s)", s.Addr, s.Expires.UTC().Format(time.RFC3339), s.Reply.String())
}
