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
	// A tampered message must fail in dkimpy too, or the check proves
	// nothing.
	msgs["tampered"] = "Subject: added\r\n" + msgs["plain"]
	msgs["tampered-body"] = strings.Replace(msgs["plain"], "Hello Bob.", "Hello Eve.", 1)

	res := dkimpyVerify(t, recs, msgs)
	names := make([]string, 0, len(msgs))
	for name := range msgs {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		r := res[name]
		if len(r) != 2 {
			t.Errorf("%s: dkimpy saw %d signatures, want 2 (%v)", name, len(r), r)
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
