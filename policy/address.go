package policy

import (
	"strings"
	"unicode/utf8"
)

// mailbox is an address split into its parts.
type mailbox struct {
	local  string // unquoted local part
	domain string // normalised domain (see normDomain)
	plain  bool   // local part free of routing characters (@ % ! : quotes)
}

// parseMailbox splits an envelope address (without angle brackets) into
// local part and domain. It is strict on purpose: an address it cannot
// take apart unambiguously is not ok, and callers deciding about relaying
// treat such an address as foreign.
//
// A quoted local part ("a@b"@c, as a Go caller may pass it) is unquoted;
// go-smtp has already removed the quotes of addresses given over SMTP,
// which leaves several '@' in the address, and then the domain is what
// follows the last one while the local part keeps the rest and is not
// plain.
func parseMailbox(addr string) (mailbox, bool) {
	if addr == "" || strings.HasPrefix(addr, "@") { // empty or source route
		return mailbox{}, false
	}
	var local, domain string
	if addr[0] == '"' {
		var b strings.Builder
		i := 1
		for ; i < len(addr); i++ {
			ch := addr[i]
			if ch == '\\' && i+1 < len(addr) {
				i++
				b.WriteByte(addr[i])
				continue
			}
			if ch == '"' {
				break
			}
			b.WriteByte(ch)
		}
		if i >= len(addr) || i+1 >= len(addr) || addr[i+1] != '@' {
			return mailbox{}, false
		}
		local, domain = b.String(), addr[i+2:]
		if strings.ContainsRune(domain, '@') {
			return mailbox{}, false
		}
	} else {
		at := strings.LastIndexByte(addr, '@')
		if at < 0 {
			return mailbox{}, false
		}
		local, domain = addr[:at], addr[at+1:]
	}
	if local == "" {
		return mailbox{}, false
	}
	d, ok := normDomain(domain)
	if !ok {
		return mailbox{}, false
	}
	plain := !strings.ContainsAny(local, "@%!:\"\\ \t\r\n,;<>[]()") && utf8.ValidString(local)
	return mailbox{local: local, domain: d, plain: plain}, true
}

// normDomain returns a domain in a canonical form for comparison: lower
// case, without a trailing dot. It refuses address literals ([192.0.2.1])
// and anything that is not a syntactically valid host name.
// Internationalised names are compared as written (U-labels lower-cased,
// A-labels as they are), without IDNA mapping: a name written in another
// form, or with look-alike characters, does not match. For relaying that
// errs on the safe side (the address is foreign); list both forms of a
// local or sender domain when clients use both.
func normDomain(d string) (string, bool) {
	d = strings.TrimSuffix(d, ".")
	if d == "" || len(d) > 253 {
		return "", false
	}
	if !utf8.ValidString(d) {
		return "", false
	}
	d = strings.ToLower(d)
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", false
		}
		for i := 0; i < len(label); i++ {
			ch := label[i]
			if !(ch >= 'a' && ch <= 'z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_' || ch >= utf8.RuneSelf) {
				return "", false
			}
		}
	}
	return d, true
}

// domainSet matches domains exactly, and subdomains of entries written
// with a leading "." or "*." (".example.test" matches a.example.test but
// not example.test itself).
type domainSet struct {
	exact  map[string]bool
	suffix []string // each with a leading "."
}

func newDomainSet(domains []string) domainSet {
	s := domainSet{exact: map[string]bool{}}
	for _, d := range domains {
		d = strings.TrimSpace(d)
		sub := false
		if rest, ok := strings.CutPrefix(d, "*."); ok {
			d, sub = rest, true
		} else if rest, ok := strings.CutPrefix(d, "."); ok {
			d, sub = rest, true
		}
		n, ok := normDomain(d)
		if !ok {
			continue // not a host name: can never match a valid address
		}
		if sub {
			s.suffix = append(s.suffix, "."+n)
		} else {
			s.exact[n] = true
		}
	}
	return s
}

func (s domainSet) empty() bool { return len(s.exact) == 0 && len(s.suffix) == 0 }

// has reports whether the normalised domain d is in the set.
func (s domainSet) has(d string) bool {
	if s.exact[d] {
		return true
	}
	for _, suf := range s.suffix {
		if strings.HasSuffix(d, suf) {
			return true
		}
	}
	return false
}
