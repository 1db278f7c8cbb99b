package module

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"path/filepath"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

// TestRegistryNegativeBounded is a scan of distinct unknown keys against
// the key cache: the cached unknown keys stay within registryMaxNegative,
// and the callers' keys stay cached (no store lookup for them), however
// many unknown keys were tried.
func TestRegistryNegativeBounded(t *testing.T) {
	bolt, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer bolt.Close()
	st := &countingStore{Store: bolt}
	ctx, now := context.Background(), time.Now()
	if err := st.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "pro", CreatedAt: now}); err != nil {
		t.Fatal(err)
	}
	var valid []digest
	for i := range 50 {
		sum := sha256.Sum256([]byte{'v', byte(i)})
		hash := hex.EncodeToString(sum[:])
		if _, err := st.PutKey(ctx, store.Key{ID: "key_" + hash[:12], Hash: hash, CustomerID: "acme", CreatedAt: now}); err != nil {
			t.Fatal(err)
		}
		valid = append(valid, sum)
	}
	reg := newRegistry()
	for _, sum := range valid {
		if e, err := reg.lookup(ctx, st, sum, now); err != nil || !e.found {
			t.Fatalf("valid key: %+v %v", e, err)
		}
	}
	for i := range registryMaxEntries + registryMaxEntries/2 {
		sum := sha256.Sum256([]byte{'u', byte(i), byte(i >> 8), byte(i >> 16)})
		if e, err := reg.lookup(ctx, st, sum, now); err != nil || e.found {
			t.Fatalf("unknown key %d: %+v %v", i, e, err)
		}
	}
	reg.mu.RLock()
	negatives := 0
	for _, m := range []map[digest]regEntry{reg.entries, reg.stale} {
		for _, e := range m {
			if !e.found {
				negatives++
			}
		}
	}
	reg.mu.RUnlock()
	if negatives > registryMaxNegative {
		t.Errorf("%d unknown keys cached, more than %d", negatives, registryMaxNegative)
	}
	before := st.lookups.Load()
	for _, sum := range valid {
		if e, err := reg.lookup(ctx, st, sum, now); err != nil || !e.found {
			t.Fatalf("valid key after the scan: %+v %v", e, err)
		}
	}
	if n := st.lookups.Load() - before; n != 0 {
		t.Errorf("the scan pushed callers' keys out of the cache: %d of %d valid keys needed the store again", n, len(valid))
	}
}
