package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	msgdkim "github.com/emersion/go-msgauth/dkim"

	"github.com/batonmail/baton/dkim"
)

// TestPipeline_DKIM_SignatureVerifiesAtDestination signs at submission
// (RSA and Ed25519 at once) and checks the message as the destination
// received it, after queueing and SMTP delivery, with go-msgauth and with
// dkimpy, a verifier not written in Go.
func TestPipeline_DKIM_SignatureVerifiesAtDestination(t *testing.T) {
	records := map[string]string{}
	var keys []dkim.Key
	for _, k := range []struct {
		sel string
		typ dkim.KeyType
	}{{"rsa1", dkim.RSA}, {"ed1", dkim.Ed25519}} {
		g, err := dkim.GenerateKey(dkim.GenerateConfig{Domain: "sender.test", Selector: k.sel, Type: k.typ})
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, g.Key)
		records[g.RecordName] = g.TXT
	}
	ks, err := dkim.NewKeyStore(keys...)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := dkim.NewSigner(dkim.SignerConfig{Keys: ks})
	if err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, harnessConfig{signer: signer})
	dest := startSink(t, "mx1.dest.test")
	h.mx("dest.test", dest)

	body := "From: App <app@sender.test>\r\nTo: rcpt@dest.test\r\nSubject:  folded\r\n  subject line\r\nX-Repeat: one\r\nX-Repeat: two\r\n\r\n" +
		"8-bit line: caf\xc3\xa9\r\n" + strings.Repeat("x", 990) + "\r\ntrailing spaces   \r\n\r\n\r\n"
	if err := h.submit("app@sender.test", []string{"rcpt@dest.test"}, body); err != nil {
		t.Fatal(err)
	}
	got := dest.wait(1, 10*time.Second)[0].Body

	verifs, err := msgdkim.VerifyWithOptions(bytes.NewReader(got), &msgdkim.VerifyOptions{
		LookupTXT: func(domain string) ([]string, error) {
			if r, ok := records[strings.TrimSuffix(domain, ".")]; ok {
				return []string{r}, nil
			}
			return nil, os.ErrNotExist
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(verifs) != 2 {
		t.Fatalf("go-msgauth found %d signatures, want 2:\n%s", len(verifs), got)
	}
	for _, v := range verifs {
		if v.Err != nil {
			t.Errorf("go-msgauth: signature d=%s failed: %v", v.Domain, v.Err)
		}
	}

	// dkimpy, fed the key records directly.
	out, err := exec.Command("/usr/bin/python3", "-c", "import dkim, nacl.signing").CombinedOutput()
	if err != nil {
		if os.Getenv("BATON_REQUIRE_EXTERNAL") != "" {
			t.Fatalf("dkimpy required but unavailable: %v %s", err, out)
		}
		t.Skipf("dkimpy unavailable (run .ci/run): %s", out)
	}
	req, _ := json.Marshal(map[string]any{"records": records, "messages": map[string]string{"m": base64.StdEncoding.EncodeToString(got)}})
	cmd := exec.CommandContext(context.Background(), "/usr/bin/python3", "../../dkim/testdata/verify_dkimpy.py")
	cmd.Stdin = bytes.NewReader(req)
	res, err := cmd.Output()
	if err != nil {
		t.Fatalf("dkimpy: %v", err)
	}
	var results map[string][]struct {
		OK    bool   `json:"ok"`
		Error string `json:"error"`
	}
	if err := json.Unmarshal(res, &results); err != nil {
		t.Fatalf("dkimpy output %q: %v", res, err)
	}
	if len(results["m"]) != 2 {
		t.Fatalf("dkimpy saw %d signatures, want 2: %s", len(results["m"]), res)
	}
	for i, r := range results["m"] {
		if !r.OK {
			t.Errorf("dkimpy: signature %d failed: %s", i, r.Error)
		}
	}
}
