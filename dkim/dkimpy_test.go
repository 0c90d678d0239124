package dkim_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"sort"
	"strings"
	"testing"

	"github.com/batonmail/baton/dkim"
)

// debianPython is Debian's interpreter, where python3-dkim is installed
// (not a pyenv python3 that may come first on PATH).
const debianPython = "/usr/bin/python3"

type pyResult struct {
	OK    bool   `json:"ok"`
	Error string `json:"error"`
}

// requireDkimpy skips the test when dkimpy cannot be imported, unless
// BATON_REQUIRE_EXTERNAL=1 demands the external verifier (as CI does).
func requireDkimpy(t *testing.T) {
	t.Helper()
	out, err := exec.Command(debianPython, "-c", "import dkim, nacl.signing").CombinedOutput()
	if err == nil {
		return
	}
	msg := "dkimpy is not available: " + debianPython + " cannot import dkim and nacl (apt-get install python3-dkim python3-nacl): " +
		strings.TrimSpace(string(out)) + " " + err.Error()
	if os.Getenv("BATON_REQUIRE_EXTERNAL") == "1" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// dkimpyVerify verifies every signature of each message with dkimpy,
// serving the key records from recs.
func dkimpyVerify(t *testing.T, recs map[string]string, msgs map[string]string) map[string][]pyResult {
	t.Helper()
	req := struct {
		Records  map[string]string `json:"records"`
		Messages map[string]string `json:"messages"`
	}{Records: recs, Messages: make(map[string]string)}
	for name, m := range msgs {
		req.Messages[name] = base64.StdEncoding.EncodeToString([]byte(m))
	}
	in, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(debianPython, "testdata/verify_dkimpy.py")
	cmd.Stdin = bytes.NewReader(in)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("dkimpy: %v\n%s", err, stderr.String())
	}
	var res map[string][]pyResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("dkimpy output %q: %v", out, err)
	}
	return res
}

func TestSign_VerifiesWithDkimpy(t *testing.T) {
	requireDkimpy(t)
	ks, recs := testKeys(t)
	s := newSigner(t, dkim.SignerConfig{Keys: ks})
	msgs := make(map[string]string)
	for name, m := range testMessages {
		sig, err := s.Sign(context.Background(), strings.NewReader(m))
		if err != nil {
			t.Fatal(err)
		}
		msgs[name] = string(sig) + m
	}
	want := make(map[string]int)
	for name := range msgs {
		want[name] = 2
	}
	// Several From domains (one key is PKCS#1 RSA), and a subdomain signed
	// with its parent's keys.
	parent := newSigner(t, dkim.SignerConfig{Keys: ks, ParentDomains: true})
	for name, m := range map[string]string{
		"two-domains": "From: a@example.test, b@other.test\r\nSender: a@example.test\r\nSubject: two\r\n\r\nbody\r\n",
		"subdomain":   "From: a@news.example.test\r\nSubject: sub\r\n\r\nbody\r\n",
	} {
		sig, err := parent.Sign(context.Background(), strings.NewReader(m))
		if err != nil {
			t.Fatal(err)
		}
		msgs[name] = string(sig) + m
		want[name] = len(verify(t, recs, msgs[name]))
	}
	if want["two-domains"] != 3 || want["subdomain"] != 2 {
		t.Fatalf("unexpected signature counts %v", want)
	}
	// A tampered message must fail in dkimpy too, or the check proves
	// nothing.
	msgs["tampered"] = "Subject: added\r\n" + msgs["plain"]
	msgs["tampered-reply-to"] = "Reply-To: evil@attacker.test\r\n" + msgs["plain"]
	msgs["tampered-body"] = strings.Replace(msgs["plain"], "Hello Bob.", "Hello Eve.", 1)
	want["tampered"], want["tampered-reply-to"], want["tampered-body"] = 2, 2, 2

	res := dkimpyVerify(t, recs, msgs)
	names := make([]string, 0, len(msgs))
	for name := range msgs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		r := res[name]
		if len(r) != want[name] {
			t.Errorf("%s: dkimpy saw %d signatures, want %d (%v)", name, len(r), want[name], r)
			continue
		}
		wantOK := !strings.HasPrefix(name, "tampered")
		for i, v := range r {
			if v.OK != wantOK {
				t.Errorf("%s: signature %d verified=%v (%s), want %v", name, i, v.OK, v.Error, wantOK)
			}
		}
	}
}
