package relay

import (
	"errors"
	"net/netip"
	"strings"
	"unicode/utf8"
)

// Address syntax of RFC 5321 §4.1.2, checked on the raw MAIL and RCPT
// lines before go-smtp (whose parser is lenient) sees them:
//
//	Path           = "<" [ A-d-l ":" ] Mailbox ">"
//	Mailbox        = Local-part "@" ( Domain / address-literal )
//	Local-part     = Dot-string / Quoted-string
//
// with RFC 6531 UTF-8 allowed in local parts and domains (the session
// then demands the SMTPUTF8 parameter) and the length limits of §4.5.3.1.
// Source routes are accepted and ignored, as §4.1.2 and Appendix C ask.

var errBadAddress = errors.New("malformed address")

// Length limits of RFC 5321 §4.5.3.1.
const (
	maxLocalPart = 64
	maxDomain    = 255
	maxPath      = 256
)

// checkPath checks the argument of MAIL FROM: (allowNull) or RCPT TO:,
// after the colon and leading spaces, up to the ESMTP parameters.
func checkPath(arg string, allowNull bool) error {
	if !utf8.ValidString(arg) {
		return errBadAddress
	}
	if allowNull && strings.HasPrefix(arg, "<>") {
		return checkParamsStart(arg[2:])
	}
	s := arg
	bracket := strings.HasPrefix(s, "<")
	if bracket {
		s = s[1:]
	}
	if strings.HasPrefix(s, "@") {
		// A-d-l: "@" Domain *( "," "@" Domain ) ":"
		i := strings.IndexByte(s, ':')
		if i < 0 {
			return errBadAddress
		}
		for _, hop := range strings.Split(s[:i], ",") {
			if !strings.HasPrefix(hop, "@") || !validDomain(hop[1:]) {
				return errBadAddress
			}
		}
		s = s[i+1:]
	}
	local, rest, ok := splitLocal(s)
	if !ok || len(local) > maxLocalPart || !strings.HasPrefix(rest, "@") {
		return errBadAddress
	}
	rest = rest[1:]
	end := len(rest)
	if bracket {
		end = strings.IndexByte(rest, '>')
		if end < 0 {
			return errBadAddress
		}
	} else if i := strings.IndexAny(rest, " \t"); i >= 0 {
		end = i
	}
	domain := rest[:end]
	if len(domain) > maxDomain || !(validDomain(domain) || validAddrLiteral(domain)) {
		return errBadAddress
	}
	if len(local)+1+len(domain) > maxPath-2 {
		return errBadAddress
	}
	if bracket {
		end++ // '>'
	}
	return checkParamsStart(rest[end:])
}

func checkParamsStart(rest string) error {
	if rest != "" && rest[0] != ' ' {
		return errBadAddress
	}
	return nil
}

// splitLocal takes a Dot-string or Quoted-string local part off the front
// of s, returning it as written.
func splitLocal(s string) (local, rest string, ok bool) {
	if strings.HasPrefix(s, "\"") {
		for i := 1; i < len(s); i++ {
			switch c := s[i]; {
			case c == '\\':
				i++
				if i >= len(s) || s[i] < ' ' || s[i] == 0x7f {
					return "", "", false
				}
			case c == '"':
				return s[:i+1], s[i+1:], i > 1
			case c < ' ' || c == 0x7f:
				return "", "", false
			}
		}
		return "", "", false
	}
	i := 0
	for i < len(s) && (isAtext(s[i]) || s[i] == '.') {
		i++
	}
	local = s[:i]
	return local, s[i:], isDotString(local)
}

// isAtext reports whether c is RFC 5322 atext, or a byte of a UTF-8
// sequence (RFC 6531).
func isAtext(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c >= 0x80:
		return true
	}
	return strings.IndexByte("!#$%&'*+-/=?^_`{|}~", c) >= 0
}

// isDotString reports whether s is a Dot-string: atoms joined by single
// dots.
func isDotString(s string) bool {
	if s == "" {
		return false
	}
	for _, atom := range strings.Split(s, ".") {
		if atom == "" {
			return false
		}
		for i := 0; i < len(atom); i++ {
			if !isAtext(atom[i]) {
				return false
			}
		}
	}
	return true
}

// validDomain reports whether d is a Domain: labels of letters, digits and
// inner hyphens (or UTF-8), 1 to 63 octets each, without a trailing dot.
func validDomain(d string) bool {
	if d == "" || len(d) > maxDomain {
		return false
	}
	for _, l := range strings.Split(d, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c >= 0x80) {
				return false
			}
		}
	}
	return true
}

// validAddrLiteral reports whether d is an IPv4 or IPv6 address literal
// ("[192.0.2.1]", "[IPv6:2001:db8::1]").
func validAddrLiteral(d string) bool {
	if len(d) < 3 || d[0] != '[' || d[len(d)-1] != ']' {
		return false
	}
	in := d[1 : len(d)-1]
	if v6, ok := cutPrefixFold(in, "IPv6:"); ok {
		a, err := netip.ParseAddr(v6)
		return err == nil && a.Is6() && a.Zone() == ""
	}
	a, err := netip.ParseAddr(in)
	return err == nil && a.Is4()
}

// canonicalAddr rebuilds an address as go-smtp returns it (the local part
// unquoted) into its canonical form: the local part quoted only when it is
// not a Dot-string, the domain in lower case. The address must have passed
// checkPath, so the last '@' separates local part and domain.
func canonicalAddr(a string) string {
	i := strings.LastIndexByte(a, '@')
	if i < 0 {
		return a
	}
	local, domain := a[:i], a[i+1:]
	if !strings.HasPrefix(domain, "[") {
		domain = strings.ToLower(domain)
	}
	if !isDotString(local) {
		local = quoteLocal(local)
	}
	return local + "@" + domain
}

// quoteLocal quotes a local part as an RFC 5321 Quoted-string.
func quoteLocal(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		if s[i] == '"' || s[i] == '\\' {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	b.WriteByte('"')
	return b.String()
}

// isASCII reports whether s has no byte outside US-ASCII; the server, the
// deliverer and the DSN builder share it to decide SMTPUTF8 questions.
func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
