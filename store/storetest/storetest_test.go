package storetest_test

import (
	"path/filepath"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// TestRunSharedHarness exercises RunShared itself with both handles being
// one embedded store (trivially shared), so the harness is known to pass on
// a correct store before a shared backend relies on it.
func TestRunSharedHarness(t *testing.T) {
	storetest.RunShared(t, func(t *testing.T) (a, b store.Store) {
		s, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		return s, s
	})
}
