package webhook_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"time"

	"github.com/batonmail/baton/queue"
	"github.com/batonmail/baton/relay"
	"github.com/batonmail/baton/relay/webhook"
)

// ExampleVerify is a receiver: it checks the signature before it trusts
// the body, and answers 2xx once the events are stored.
func ExampleVerify() {
	const secret = "shared-secret"
	handler := func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 10<<20))
		if err != nil {
			http.Error(w, "read error", http.StatusBadRequest)
			return
		}
		if err := webhook.Verify(secret, r.Header.Get(webhook.SignatureHeader), body, 5*time.Minute); err != nil {
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		var batch webhook.Batch
		if err := json.Unmarshal(body, &batch); err != nil {
			http.Error(w, "bad JSON", http.StatusBadRequest)
			return
		}
		for _, e := range batch.Events {
			fmt.Println(e.Kind, e.QueueID, e.Rcpt) // store, idempotent by e.ID
		}
		w.WriteHeader(http.StatusNoContent)
	}
	srv := httptest.NewServer(http.HandlerFunc(handler))
	defer srv.Close()

	// The sending side, as a relay.Config.Observer would feed it.
	hook, err := webhook.New(webhook.Config{URL: srv.URL, Secret: secret})
	if err != nil {
		log.Fatal(err)
	}
	hook.Observe(context.Background(), relay.Event{Kind: relay.EventDelivered, Time: time.Now(), ID: "Q1",
		From: "app@example.com", Rcpt: "user@example.net", Reply: queue.Reply{Code: 250, Text: "OK"}})
	hook.Close(context.Background()) // sends what is buffered
	// Output:
	// delivered Q1 user@example.net
}
