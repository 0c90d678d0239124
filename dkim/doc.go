// Package dkim signs outgoing mail with DKIM and checks that a sender
// domain's DNS is ready for it.
//
// DKIM (DomainKeys Identified Mail) lets a domain take responsibility for
// a message: the signer hashes the body and chosen header fields, signs the
// hash with a private key, and adds a DKIM-Signature header field naming
// the domain (d=) and a selector (s=). A receiver fetches the public key
// from the TXT record at selector._domainkey.domain and verifies. DMARC
// then requires the d= domain to align with the domain of the From field.
//
// # Keys
//
// A KeyStore holds, per signing domain, one or more selectors with their
// private keys: RSA (2048 to 4096 bits) and Ed25519. A domain with several
// keys is signed with each of them, so RSA and Ed25519 can be used
// together (RFC 8463 recommends it while Ed25519 support spreads). Keys
// are PEM files, PKCS#8 or PKCS#1 (LoadKeyStore); GenerateKey makes a new
// key with the TXT record to publish, and WriteKeyFile stores it with mode
// 0600, never replacing an existing file.
//
// # Signing
//
// Signer.Sign reads a message once, as a stream. It keeps the header
// section, finds the From domain (or, with ParentDomains, its nearest
// parent that has keys), and hashes the body with go-msgauth's relaxed
// body canonicalisation; the body is hashed once however many keys sign.
// Each signature then covers the configured header fields
// (DefaultHeaders) in relaxed canonical form. Fields in the over-sign list
// (DefaultOversign: From, To, Subject, ...) are named in h= once more
// than they occur, so a verifier fails the signature if such a field is
// added later, including one that was absent. The result is the
// DKIM-Signature fields to put in front of the message, folded to 78
// columns. Sign sets no l= tag, so nothing can be appended to a signed
// body. Sign once, when the message is accepted and before it is queued;
// the queue and the SMTP client must then carry the bytes unchanged
// (dot-stuffing is undone by the receiver, so it does no harm).
//
// # Key rotation
//
// Rotate by adding a new selector alongside the old one:
//
//  1. Generate a key with a new selector (relayd dkim keygen -domain D
//     -selector S2) and publish the TXT record it prints.
//  2. Wait until the record is visible (relayd dkim check -domain D
//     -selector S2 reports it present and matching).
//  3. Configure the new key in place of the old one and reload the relay.
//     (Keeping both configured for a while is harmless: every message is
//     then signed with both.)
//  4. Leave the old selector's record published for a week or so, for
//     messages still queued or being verified late, then delete it (or
//     publish it with an empty p= to revoke it).
//
// # Readiness check
//
// CheckDomain looks up a sender domain's SPF record, the DKIM key record
// of each selector and the DMARC record through a TXTResolver (mx.DNS
// implements it), and reports each as present, missing or wrong with the
// exact record to publish: for example a DKIM key in DNS that is not the
// public half of the configured private key, an SPF record that does not
// authorise the relay's addresses, or no DMARC record.
//
// # Standards
//
//   - RFC 6376: DomainKeys Identified Mail (DKIM) Signatures.
//   - RFC 8301: cryptographic algorithm and key usage update (rsa-sha256,
//     at least 1024-bit keys; 2048 bits are enforced here).
//   - RFC 8463: Ed25519-SHA256 for DKIM.
//   - RFC 7208: Sender Policy Framework (SPF), for the readiness check.
//   - RFC 7489: DMARC, for the readiness check.
//   - RFC 5322: message format (header fields, folding).
package dkim
