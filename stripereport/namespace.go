package stripereport

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// KindNamespace holds the namespace generated for a store (record id
// namespaceID) when none is configured.
const KindNamespace = "stripe_namespace"

const namespaceID = "default"

// StoredNamespace returns the identifier namespace kept in st, generating
// it on first use: a random value written once, so every instance sharing
// the store (a cluster, the old and new app of a reload) agrees on it, and
// deployments with stores of their own get different ones. A store copied
// into another deployment copies the namespace too: configure one
// explicitly there.
func StoredNamespace(ctx context.Context, st store.Records) (string, error) {
	rec, err := st.GetRecord(ctx, KindNamespace, namespaceID)
	if err == nil && len(rec.Data) > 0 {
		return string(rec.Data), nil
	}
	if err != nil && !errors.Is(err, store.ErrNotFound) {
		return "", fmt.Errorf("reading the Stripe identifier namespace: %w", err)
	}
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	if _, err := st.PutRecord(ctx, store.Record{Kind: KindNamespace, ID: namespaceID, Data: []byte("gen_" + hex.EncodeToString(b))}, true); err != nil {
		return "", fmt.Errorf("storing the Stripe identifier namespace: %w", err)
	}
	// Read it back: another instance may have written its own first.
	if rec, err = st.GetRecord(ctx, KindNamespace, namespaceID); err != nil {
		return "", fmt.Errorf("reading the Stripe identifier namespace: %w", err)
	}
	return string(rec.Data), nil
}
