package dkim_test

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/batonmail/baton/dkim"
)

// benchMessage returns a message of about size bytes with 76-character
// body lines.
func benchMessage(size int) string {
	var b strings.Builder
	b.WriteString(testMessages["plain"])
	line := strings.Repeat("abcdefghij", 7) + "klmnop\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.String()
}

// BenchmarkSign measures Sign for 5 KB and 100 KB messages with one
// RSA-2048 key, one Ed25519 key, and both at once.
func BenchmarkSign(b *testing.B) {
	keySets := []struct {
		name  string
		files []string
	}{
		{"rsa2048", []string{"rsa2048.pem"}},
		{"ed25519", []string{"ed25519.pem"}},
		{"rsa2048+ed25519", []string{"rsa2048.pem", "ed25519.pem"}},
	}
	for _, ks := range keySets {
		var keys []dkim.Key
		for i, f := range ks.files {
			keys = append(keys, loadKey(b, "example.test", fmt.Sprintf("s%d", i), f))
		}
		store, err := dkim.NewKeyStore(keys...)
		if err != nil {
			b.Fatal(err)
		}
		s := newSigner(b, dkim.SignerConfig{Keys: store})
		for _, size := range []int{5 << 10, 100 << 10} {
			msg := benchMessage(size)
			b.Run(fmt.Sprintf("%s/%dKB", ks.name, size>>10), func(b *testing.B) {
				b.SetBytes(int64(len(msg)))
				b.ReportAllocs()
				for b.Loop() {
					sig, err := s.Sign(context.Background(), strings.NewReader(msg))
					if err != nil || len(sig) == 0 {
						b.Fatal(err, len(sig))
					}
				}
			})
		}
	}
}
