package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// SignatureHeader is the HTTP header that carries the signature of a
// webhook POST:
//
//	Baton-Signature: t=1700000000,v1=5257a869e7ec...
//
// t is the Unix time of the POST and each v1 is the hex HMAC-SHA256, keyed
// with a secret, of t, a dot and the raw body. A header carries one v1 per
// signing secret, so that receivers can switch secrets one at a time.
const SignatureHeader = "Baton-Signature"

// ErrSignature is returned, wrapped with the reason, by Verify and
// VerifyAny when a request is not authentic: the header is missing or
// malformed, no signature matches, or the timestamp is too far from now.
var ErrSignature = errors.New("webhook: bad signature")

// Sign returns the SignatureHeader value for body posted at t, with one v1
// signature per secret.
func Sign(t time.Time, body []byte, secrets ...string) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	var b strings.Builder
	b.WriteString("t=")
	b.WriteString(ts)
	for _, s := range secrets {
		b.WriteString(",v1=")
		b.WriteString(hex.EncodeToString(mac(s, ts, body)))
	}
	return b.String()
}

func mac(secret, ts string, body []byte) []byte {
	h := hmac.New(sha256.New, []byte(secret))
	h.Write([]byte(ts))
	h.Write([]byte{'.'})
	h.Write(body)
	return h.Sum(nil)
}

// Verify checks a SignatureHeader value against the raw request body and
// secret. With tolerance > 0 it also refuses a timestamp more than
// tolerance away from now (5 minutes is usual), which limits replays of a
// captured request; the sender signs every retry afresh. It returns nil
// for an authentic request and an error wrapping ErrSignature otherwise.
func Verify(secret, header string, body []byte, tolerance time.Duration) error {
	return VerifyAny([]string{secret}, header, body, tolerance)
}

// VerifyAny is Verify with several accepted secrets, for rotating them: a
// request is authentic when any of its signatures matches any secret.
func VerifyAny(secrets []string, header string, body []byte, tolerance time.Duration) error {
	var ts string
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if sig, err := hex.DecodeString(v); err == nil && len(sig) == sha256.Size {
				sigs = append(sigs, sig)
			}
		}
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return fmt.Errorf("%w: malformed %s header", ErrSignature, SignatureHeader)
	}
	if tolerance > 0 {
		if d := time.Since(time.Unix(unix, 0)); d > tolerance || d < -tolerance {
			return fmt.Errorf("%w: timestamp outside the tolerance", ErrSignature)
		}
	}
	for _, s := range secrets {
		if s == "" {
			continue // an empty key would make forging trivial
		}
		want := mac(s, ts, body)
		for _, sig := range sigs {
			if hmac.Equal(sig, want) {
				return nil
			}
		}
	}
	return fmt.Errorf("%w: no signature matches", ErrSignature)
}
