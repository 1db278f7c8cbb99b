package boltstore

import (
	"path/filepath"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

func TestRecordsContract(t *testing.T) {
	storetest.RunRecords(t, func(t *testing.T) store.Store {
		return openTemp(t, filepath.Join(t.TempDir(), "store.db"))
	})
}

// TestRecordsSharedStore runs the shared checks with both handles being one
// Store, as the old and new app of a reload hold it.
func TestRecordsSharedStore(t *testing.T) {
	storetest.RunRecordsShared(t, func(t *testing.T) (store.Store, store.Store) {
		s := openTemp(t, filepath.Join(t.TempDir(), "store.db"))
		return s, s
	})
}
