// Package mx decides where mail for a domain goes.
//
// A Resolver turns a recipient domain into a Route: the hosts to try in
// order, each with its addresses, the minimum TLS protection, optional
// SMTP AUTH credentials, and a Key that names the destination for
// connection pooling and per-destination limits. A failure is an *Error
// that says whether it is temporary (retry later) or permanent (bounce),
// with the SMTP code and enhanced status code it amounts to.
//
// Three resolvers are meant to be stacked:
//
//	Static (configured routes) → MTASTS (policy) → DNS (MX lookup)
//
//	d, _ := mx.NewDNS(mx.DNSConfig{})                       // /etc/resolv.conf
//	sts, _ := mx.NewMTASTS(mx.MTASTSConfig{Next: d})
//	r, _ := mx.NewStatic(mx.StaticConfig{Routes: routes, Next: sts, Lookup: d.LookupAddrs})
//	route, err := r.Resolve(ctx, "example.com")
//
// # DNS
//
// DNS asks recursive resolvers itself (github.com/miekg/dns) so that it
// can tell a domain that does not exist from DNS trouble. Resolve:
//
//  1. normalises the domain: trailing dot removed, lower case, Unicode
//     labels converted to A-labels with Punycode (RFC 3492, RFC 5891);
//     address literals such as "[192.0.2.1]" (RFC 5321 §4.1.3) go to that
//     address without DNS;
//  2. looks up MX records, following CNAMEs in the answer; NXDOMAIN is
//     permanent (550 5.1.2); SERVFAIL, REFUSED, timeouts and network
//     errors are temporary (451 4.4.3), after each configured server was
//     tried in order, Attempts times;
//  3. a UDP answer with the TC bit set is asked again over TCP
//     (RFC 1035 §4.2.1, RFC 7766); queries advertise an EDNS0 buffer of
//     1232 bytes (RFC 6891);
//  4. a lone null MX, "0 ." (RFC 7505), is permanent: 556 5.1.10; with
//     other MX records it is ignored;
//  5. without MX records the domain itself is the only host, with
//     preference 0 (the implicit MX of RFC 5321 §5.1); a domain with no MX
//     and no address records fails permanently (550 5.1.2);
//  6. hosts are sorted by preference, equal preferences shuffled
//     (RFC 5321 §5.1), duplicates dropped, at most MaxHosts kept; targets
//     that are IP addresses or "localhost" names are skipped;
//  7. every host's A and AAAA records are looked up concurrently (IPv4
//     first); unspecified, multicast and broadcast addresses are dropped,
//     and with RejectLocal so are loopback and private ones; hosts left
//     without an address are skipped, and if no host has one the failure
//     is temporary (451 4.4.4).
//
// The Route's Key is "mx:" + domain and its TLS is TLSOpportunistic.
// LookupTXT and LookupAddrs expose the same client to other packages
// (DKIM, SPF and DMARC checks, MTA-STS, smarthost names); their "does not
// exist" errors wrap ErrNotFound.
//
// # Static routes
//
// Static sends mail for configured domains ("example.com", subdomains as
// ".example.com", everything else as "*") to a fixed host with optional
// credentials and TLS mode, and passes other domains to the next Resolver.
// Its Key is "route:" + the route's name, so domains sharing a smarthost
// share its limits.
//
// # MTA-STS
//
// MTASTS applies SMTP MTA Strict Transport Security (RFC 8461) to the
// routes of the next Resolver: it reads the _mta-sts TXT record, fetches
// https://mta-sts.<domain>/.well-known/mta-sts.txt over verified HTTPS
// (no redirects, 64 KiB, a timeout, media type text/plain), caches the
// policy for its max_age and fetches it again when the record's id
// changes. In enforce mode only MX hosts matching the policy's patterns
// are kept and the route needs a verified certificate (TLSVerified); when
// none matches the failure is temporary. Testing mode only reports, in
// Route.MTASTS. A failed fetch keeps an unexpired cached policy in force.
//
// # Supported standards
//
//   - RFC 5321 §5.1: MX lookup, preference order, implicit MX, address
//     literals (§4.1.3)
//   - RFC 7505: null MX
//   - RFC 1035 §4.2.1 and RFC 7766: truncation and TCP fallback
//   - RFC 6891: EDNS0 buffer size
//   - RFC 3492, RFC 5890/5891: Punycode A-labels for internationalised
//     domains (without the full IDNA 2008 mapping tables)
//   - RFC 8461: MTA-STS policy discovery, fetching, caching and
//     application (not the TLSRPT reporting of RFC 8460)
//
// Not done here: DNSSEC validation and DANE (RFC 7672) need a validating
// resolver on a trusted path, which this package does not assume.
package mx
