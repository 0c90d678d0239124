package dkim_test

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/batonmail/baton/dkim"
)

func TestParsePrivateKey_Formats(t *testing.T) {
	cases := []struct {
		file    string
		want    dkim.KeyType
		wantErr string
	}{
		{file: "rsa2048.pem", want: dkim.RSA},
		{file: "rsa2048-pkcs1.pem", want: dkim.RSA},
		{file: "ed25519.pem", want: dkim.Ed25519},
		{file: "rsa1024.pem", wantErr: "1024 bits"},
		{file: "ec-p256.pem", wantErr: "unsupported"},
	}
	for _, c := range cases {
		t.Run(c.file, func(t *testing.T) {
			s, err := dkim.LoadPrivateKey(filepath.Join("testdata", c.file))
			if c.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), c.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, c.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			k := dkim.Key{Domain: "example.test", Selector: "s", Signer: s}
			if k.Type() != c.want {
				t.Errorf("type %s, want %s", k.Type(), c.want)
			}
		})
	}
}

func TestParsePrivateKey_Garbage(t *testing.T) {
	for name, data := range map[string]string{
		"empty":       "",
		"not pem":     "hello",
		"certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
		"bad der":     "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
	} {
		if _, err := dkim.ParsePrivateKey([]byte(data)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A key after other PEM blocks is found.
	key, err := os.ReadFile("testdata/ed25519.pem")
	if err != nil {
		t.Fatal(err)
	}
	mixed := append([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), key...)
	if _, err := dkim.ParsePrivateKey(mixed); err != nil {
		t.Errorf("key after a certificate: %v", err)
	}
}

func TestNewKeyStore_Validation(t *testing.T) {
	ed := loadKey(t, "example.test", "s1", "ed25519.pem")
	cases := map[string][]dkim.Key{
		"empty domain":     {{Domain: "", Selector: "s", Signer: ed.Signer}},
		"bad domain":       {{Domain: "exa mple.test", Selector: "s", Signer: ed.Signer}},
		"empty selector":   {{Domain: "example.test", Selector: "", Signer: ed.Signer}},
		"bad selector":     {{Domain: "example.test", Selector: "a/b", Signer: ed.Signer}},
		"no key":           {{Domain: "example.test", Selector: "s"}},
		"duplicate":        {ed, {Domain: "EXAMPLE.test.", Selector: "S1", Signer: ed.Signer}},
		"rsa too small":    {{Domain: "example.test", Selector: "s", Signer: smallRSA(t)}},
		"unsupported type": {{Domain: "example.test", Selector: "s", Signer: fakeSigner{}}},
	}
	for name, keys := range cases {
		if _, err := dkim.NewKeyStore(keys...); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	ks, err := dkim.NewKeyStore(dkim.Key{Domain: "Example.TEST.", Selector: "Sel-1", Signer: ed.Signer})
	if err != nil {
		t.Fatal(err)
	}
	keys := ks.Keys("example.test")
	if len(keys) != 1 || keys[0].Domain != "example.test" || keys[0].Selector != "sel-1" {
		t.Fatalf("keys not normalised: %+v", keys)
	}
	if got := ks.Domains(); len(got) != 1 || got[0] != "example.test" {
		t.Errorf("Domains() = %v", got)
	}
}

// smallRSA reads the 1024-bit test key without dkim's size check.
func smallRSA(t *testing.T) *rsa.PrivateKey {
	data, err := os.ReadFile("testdata/rsa1024.pem")
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return k.(*rsa.PrivateKey)
}

type fakeSigner struct{ ed25519.PrivateKey }

func (fakeSigner) Public() crypto.PublicKey { return "not a key" }

func TestLoadKeyStore(t *testing.T) {
	ks, err := dkim.LoadKeyStore([]dkim.KeyFile{
		{Domain: "example.test", Selector: "a", Path: "testdata/rsa2048.pem"},
		{Domain: "example.test", Selector: "b", Path: "testdata/ed25519.pem"},
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(ks.Keys("example.test")); n != 2 {
		t.Fatalf("%d keys, want 2", n)
	}
	_, err = dkim.LoadKeyStore([]dkim.KeyFile{{Domain: "example.test", Selector: "a", Path: "testdata/missing.pem"}})
	if !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: err = %v", err)
	}
}

func TestGenerateKey_SignsAndPublishes(t *testing.T) {
	for _, typ := range []dkim.KeyType{dkim.Ed25519, dkim.RSA} {
		t.Run(string(typ), func(t *testing.T) {
			g, err := dkim.GenerateKey(dkim.GenerateConfig{Domain: "Gen.Example.TEST", Selector: "2026a", Type: typ})
			if err != nil {
				t.Fatal(err)
			}
			if g.RecordName != "2026a._domainkey.gen.example.test" {
				t.Errorf("RecordName %q", g.RecordName)
			}
			wantPrefix := "v=DKIM1; k=" + string(typ) + "; p="
			if !strings.HasPrefix(g.TXT, wantPrefix) {
				t.Errorf("TXT %q lacks %q", g.TXT, wantPrefix)
			}
			// The PEM loads back to the same key, and signatures made with
			// it verify against the printed record.
			s, err := dkim.ParsePrivateKey(g.PrivatePEM)
			if err != nil {
				t.Fatal(err)
			}
			key := dkim.Key{Domain: g.Key.Domain, Selector: g.Key.Selector, Signer: s}
			ks, err := dkim.NewKeyStore(key)
			if err != nil {
				t.Fatal(err)
			}
			msg := "From: a@gen.example.test\r\nSubject: gen\r\n\r\nbody\r\n"
			sig := sign(t, newSigner(t, dkim.SignerConfig{Keys: ks}), msg)
			mustVerify(t, map[string]string{g.RecordName: g.TXT}, sig+msg, 1)

			// The zone line holds the same text in strings of <= 255 bytes.
			if !strings.HasPrefix(g.Zone, g.RecordName+". IN TXT (") {
				t.Errorf("zone line %q", g.Zone)
			}
			var joined strings.Builder
			for i, part := range strings.Split(g.Zone, `"`) {
				if i%2 == 1 {
					if len(part) > 255 {
						t.Errorf("string of %d bytes in zone line", len(part))
					}
					joined.WriteString(part)
				}
			}
			if joined.String() != g.TXT {
				t.Errorf("zone strings join to %q, want %q", joined.String(), g.TXT)
			}
		})
	}
}

func TestGenerateKey_Rejects(t *testing.T) {
	for name, cfg := range map[string]dkim.GenerateConfig{
		"no domain":    {Selector: "s"},
		"no selector":  {Domain: "example.test"},
		"small rsa":    {Domain: "example.test", Selector: "s", Bits: 1024},
		"huge rsa":     {Domain: "example.test", Selector: "s", Bits: 8192},
		"unknown type": {Domain: "example.test", Selector: "s", Type: "dsa"},
	} {
		if _, err := dkim.GenerateKey(cfg); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestWriteKeyFile_ModeAndNoOverwrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "dir", "s._domainkey.example.test.pem")
	if err := dkim.WriteKeyFile(path, []byte("first")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want 0700", di.Mode().Perm())
	}
	err = dkim.WriteKeyFile(path, []byte("second"))
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second write: err = %v, want fs.ErrExist", err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, []byte("first")) {
		t.Fatalf("file was overwritten: %q", got)
	}
}

func TestZoneRecord_Escapes(t *testing.T) {
	got := dkim.ZoneRecord("x.test.", `a"b\c`)
	if want := `x.test. IN TXT ( "a\"b\\c" )`; got != want {
		t.Errorf("got %s, want %s", got, want)
	}
}
