package dkim_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"strings"
	"time"

	"github.com/batonmail/baton/dkim"
)

// The relay signs each message once, before queueing it, and stores the
// returned fields in front of the message.
func ExampleSigner_Sign() {
	keys, err := dkim.LoadKeyStore([]dkim.KeyFile{
		{Domain: "example.test", Selector: "ed1", Path: "testdata/ed25519.pem"},
	})
	if err != nil {
		log.Fatal(err)
	}
	signer, err := dkim.NewSigner(dkim.SignerConfig{
		Keys: keys,
		// A fixed clock makes the output reproducible; leave Now nil.
		Now: func() time.Time { return time.Unix(1_800_000_000, 0) },
	})
	if err != nil {
		log.Fatal(err)
	}
	msg := "From: Alice <alice@example.test>\r\n" +
		"To: bob@dest.test\r\n" +
		"Subject: Hello\r\n" +
		"\r\n" +
		"Hi Bob.\r\n"
	sig, err := signer.Sign(context.Background(), strings.NewReader(msg))
	if err != nil {
		log.Fatal(err)
	}
	// Prepend sig to the spooled message; here, show it.
	os.Stdout.WriteString(strings.ReplaceAll(string(sig), "\r\n", "\n"))
	// Output:
	// DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed; d=example.test;
	//  s=ed1; t=1800000000; h=from:from:sender:reply-to:subject:subject:date:
	//  message-id:to:to:cc:mime-version:content-type:content-transfer-encoding:
	//  list-unsubscribe:list-unsubscribe-post;
	//  bh=kmjWRdQb+kpvA4ZSXI9Gm/RUAw0QJguOg7YOVst7P7Q=;
	//  b=lJwcGWoyzSqfkI8noSfakYkcat0iU54ollNGuiDwvpJ2KPVeRE7iChRaXg9c+7GKj0Nj/Dd7vX8
	//  i8DRcus8CCw==
}

func ExampleGenerateKey() {
	g, err := dkim.GenerateKey(dkim.GenerateConfig{Domain: "example.test", Selector: "2026a", Type: dkim.Ed25519})
	if err != nil {
		log.Fatal(err)
	}
	// Store g.PrivatePEM with dkim.WriteKeyFile and publish g.TXT at
	// g.RecordName.
	fmt.Println(g.RecordName)
	fmt.Println(strings.HasPrefix(g.TXT, "v=DKIM1; k=ed25519; p="))
	// Output:
	// 2026a._domainkey.example.test
	// true
}
