package dkim

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// maxSPFLookups is the RFC 7208 §4.6.4 limit on DNS-querying terms.
const maxSPFLookups = 10

func (c *checker) spf(ctx context.Context, domain string) Item {
	it := Item{Kind: "SPF", Name: domain}
	recs, err := c.lookup(ctx, domain)
	if err != nil {
		it.Status = StatusUnknown
		it.Problem = "DNS lookup failed: " + err.Error()
		return it
	}
	recs = withPrefix(recs, "v=spf1")
	it.Found = recs
	switch {
	case len(recs) == 0:
		it.Status = StatusMissing
		if len(c.cfg.RelayIPs) == 0 {
			it.Problem = "no SPF record; publish one that lists the relay's addresses, e.g. \"v=spf1 ip4:192.0.2.1 ~all\" (give the relay's addresses to get the exact record)"
			return it
		}
		it.Problem = "no SPF record: receivers cannot tell that the relay may send for this domain"
		it.Publish = addSPFTerms("v=spf1 ~all", c.cfg.RelayIPs)
		return it
	case len(recs) > 1:
		it.Status = StatusWrong
		it.Problem = "several SPF records: that is a permanent error for every receiver (RFC 7208 §4.5); merge them into one"
		return it
	}
	rec := recs[0]
	terms := strings.Fields(rec)[1:]
	for _, t := range terms {
		if t == "all" || t == "+all" {
			it.Status = StatusWrong
			it.Problem = "\"" + t + "\" lets any host on the Internet send as this domain; end the record with ~all or -all"
			it.Publish = strings.Replace(rec, " "+t, " ~all", 1)
			return it
		}
	}
	var notes, missing []string
	var missingIPs []netip.Addr
	unknown := false
	for _, ip := range c.cfg.RelayIPs {
		e := &spfEval{c: c}
		res, mech, err := e.check(ctx, domain, rec, ip, 0)
		switch {
		case err != nil && (res == "permerror"):
			it.Status = StatusWrong
			it.Problem = "SPF record is broken: " + err.Error()
			return it
		case err != nil:
			unknown = true
			notes = append(notes, fmt.Sprintf("could not evaluate SPF for %s: %v", ip, err))
		case res == "pass":
			notes = append(notes, fmt.Sprintf("%s is authorised by %q", ip, mech))
		case len(e.unverified) > 0:
			unknown = true
			notes = append(notes, fmt.Sprintf("%s is not authorised by the mechanisms checked; not checked: %s (if those do not cover the relay, publish the record below)", ip, strings.Join(e.unverified, " ")))
			missingIPs = append(missingIPs, ip)
		default:
			missing = append(missing, ip.String())
			missingIPs = append(missingIPs, ip)
		}
	}
	if len(missing) > 0 {
		it.Status = StatusWrong
		it.Problem = "SPF does not authorise the relay (" + strings.Join(missing, ", ") + ")"
		it.Publish = addSPFTerms(rec, missingIPs)
		if len(notes) > 0 {
			it.Problem += "; " + strings.Join(notes, "; ")
		}
		return it
	}
	if unknown {
		it.Status = StatusUnknown
		if len(missingIPs) > 0 {
			it.Publish = addSPFTerms(rec, missingIPs)
		}
	} else {
		it.Status = StatusPresent
	}
	if len(c.cfg.RelayIPs) == 0 {
		notes = append(notes, "relay addresses not given: only the syntax was checked")
	}
	it.Problem = strings.Join(notes, "; ")
	return it
}

// addSPFTerms adds ip4:/ip6: terms for ips to an SPF record, before its
// final "all" or "redirect=" term.
func addSPFTerms(rec string, ips []netip.Addr) string {
	fields := strings.Fields(rec)
	var add []string
	for _, ip := range ips {
		if ip.Is4() || ip.Is4In6() {
			add = append(add, "ip4:"+ip.Unmap().String())
		} else {
			add = append(add, "ip6:"+ip.String())
		}
	}
	at := len(fields)
	for i, f := range fields[1:] {
		name := strings.ToLower(strings.TrimLeft(f, "+-~?"))
		if name == "all" || strings.HasPrefix(name, "redirect=") {
			at = i + 1
			break
		}
	}
	out := append([]string{}, fields[:at]...)
	out = append(out, add...)
	out = append(out, fields[at:]...)
	return strings.Join(out, " ")
}

// spfEval evaluates an SPF record for one address, far enough to tell
// whether the relay is authorised (RFC 7208 §4-5). Macros, "exists" and
// "ptr" are not evaluated; "a" and "mx" only when the lookups are
// configured. Such terms are listed in unverified.
type spfEval struct {
	c          *checker
	lookups    int
	unverified []string
}

// check returns the SPF result for ip under rec (published at domain)
// and the mechanism that matched.
func (e *spfEval) check(ctx context.Context, domain, rec string, ip netip.Addr, depth int) (string, string, error) {
	if depth > maxSPFLookups {
		return "permerror", "", errors.New("include/redirect loop")
	}
	fields := strings.Fields(rec)
	redirect := ""
	for _, t := range fields[1:] {
		lt := strings.ToLower(t)
		if k, v, ok := strings.Cut(lt, "="); ok && !strings.ContainsAny(k, ":/") {
			if k == "redirect" {
				redirect = v
			}
			continue // exp= and unknown modifiers
		}
		qual := "pass"
		switch lt[0] {
		case '+':
			lt = lt[1:]
		case '-':
			qual, lt = "fail", lt[1:]
		case '~':
			qual, lt = "softfail", lt[1:]
		case '?':
			qual, lt = "neutral", lt[1:]
		}
		match, err := e.match(ctx, domain, lt, ip, depth)
		if err != nil {
			res := "temperror"
			if errors.Is(err, errPerm) {
				res = "permerror"
			}
			return res, t, err
		}
		if match {
			return qual, t, nil
		}
	}
	if redirect != "" {
		if strings.Contains(redirect, "%") {
			e.unverified = append(e.unverified, "redirect="+redirect)
			return "neutral", "", nil
		}
		res, mech, err := e.sub(ctx, redirect, ip, depth)
		if res == "none" {
			return "permerror", "", fmt.Errorf("%w: redirect=%s has no SPF record", errPerm, redirect)
		}
		return res, mech, err
	}
	return "neutral", "", nil
}

var errPerm = errors.New("permanent SPF error")

// sub evaluates the SPF record of another domain (include, redirect).
func (e *spfEval) sub(ctx context.Context, domain string, ip netip.Addr, depth int) (string, string, error) {
	if err := e.count(); err != nil {
		return "permerror", "", err
	}
	recs, err := e.c.lookup(ctx, domain)
	if err != nil {
		return "temperror", "", fmt.Errorf("look up SPF of %s: %w", domain, err)
	}
	recs = withPrefix(recs, "v=spf1")
	switch len(recs) {
	case 0:
		return "none", "", nil
	case 1:
		return e.check(ctx, domain, recs[0], ip, depth+1)
	default:
		return "permerror", "", fmt.Errorf("%w: %s has several SPF records", errPerm, domain)
	}
}

func (e *spfEval) count() error {
	e.lookups++
	if e.lookups > maxSPFLookups {
		return fmt.Errorf("%w: more than %d DNS lookups (RFC 7208 §4.6.4)", errPerm, maxSPFLookups)
	}
	return nil
}

// match reports whether mechanism mech (lower case, without qualifier)
// matches ip.
func (e *spfEval) match(ctx context.Context, domain, mech string, ip netip.Addr, depth int) (bool, error) {
	name, arg, _ := strings.Cut(mech, ":")
	if i := strings.IndexByte(name, '/'); i >= 0 { // "a/24", "mx/24"
		name, arg = name[:i], name[i:]
	}
	switch name {
	case "all":
		return true, nil
	case "ip4", "ip6":
		p, err := parsePrefix(arg)
		if err != nil {
			return false, fmt.Errorf("%w: bad %s term %q", errPerm, name, mech)
		}
		return p.Contains(ip.Unmap()), nil
	case "include":
		if err := e.needDomain(name, arg); err != nil {
			return false, err
		}
		if strings.Contains(arg, "%") {
			e.unverified = append(e.unverified, mech)
			return false, e.count()
		}
		res, _, err := e.sub(ctx, arg, ip, depth)
		switch res {
		case "pass":
			return true, nil
		case "none":
			return false, fmt.Errorf("%w: include:%s has no SPF record", errPerm, arg)
		case "permerror", "temperror":
			return false, err
		}
		return false, nil
	case "a", "mx":
		if err := e.count(); err != nil {
			return false, err
		}
		target, c4, c6, err := splitDualCIDR(arg, domain)
		if err != nil {
			return false, err
		}
		if strings.Contains(target, "%") || e.c.cfg.LookupAddrs == nil || (name == "mx" && e.c.cfg.LookupMX == nil) {
			e.unverified = append(e.unverified, mech)
			return false, nil
		}
		hosts := []string{target}
		if name == "mx" {
			hosts, err = e.c.cfg.LookupMX(ctx, target)
			if err != nil && !isNotFound(err) {
				return false, fmt.Errorf("look up MX of %s: %w", target, err)
			}
		}
		for _, h := range hosts {
			addrs, err := e.c.cfg.LookupAddrs(ctx, h)
			if err != nil && !isNotFound(err) {
				return false, fmt.Errorf("look up addresses of %s: %w", h, err)
			}
			for _, a := range addrs {
				a = a.Unmap()
				bits := c6
				if a.Is4() {
					bits = c4
				}
				p, err := a.Prefix(bits)
				if err == nil && p.Contains(ip.Unmap()) {
					return true, nil
				}
			}
		}
		return false, nil
	case "ptr", "exists":
		e.unverified = append(e.unverified, mech)
		return false, e.count()
	default:
		return false, fmt.Errorf("%w: unknown mechanism %q", errPerm, mech)
	}
}

func (e *spfEval) needDomain(name, arg string) error {
	if arg == "" {
		return fmt.Errorf("%w: %s needs a domain", errPerm, name)
	}
	return nil
}

// parsePrefix parses an ip4:/ip6: argument, with or without a prefix
// length.
func parsePrefix(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, err
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, err
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// splitDualCIDR splits "domain/c4//c6" (each part optional) of an a or mx
// mechanism.
func splitDualCIDR(arg, def string) (string, int, int, error) {
	c4, c6 := 32, 128
	target := arg
	if i := strings.Index(arg, "/"); i >= 0 {
		target = arg[:i]
		rest := arg[i:]
		v4, v6, dual := strings.Cut(rest, "//")
		if !dual {
			v4 = rest
		} else if v6 != "" {
			n, err := strconv.Atoi(v6)
			if err != nil || n < 0 || n > 128 {
				return "", 0, 0, fmt.Errorf("%w: bad ip6 prefix length in %q", errPerm, arg)
			}
			c6 = n
		}
		if v4 = strings.TrimPrefix(v4, "/"); v4 != "" {
			n, err := strconv.Atoi(v4)
			if err != nil || n < 0 || n > 32 {
				return "", 0, 0, fmt.Errorf("%w: bad ip4 prefix length in %q", errPerm, arg)
			}
			c4 = n
		}
	}
	if target == "" {
		target = def
	}
	return target, c4, c6, nil
}
