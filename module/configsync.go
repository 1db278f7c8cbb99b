package module

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// The periodic re-sync of the configuration (resyncLoop) compares a hash
// before writing anything: the store keeps, in a record, the hash of the
// configured customers and keys last written (by any instance). While it
// is this app's, the configuration is in the store and a check is one
// read, whatever the number of customers. A store that lost its data lost
// the record too, and a configuration stored by another instance since
// (another configuration) changed it: then everything is written again, as
// it is every configFullResyncInterval as a backstop (a Redis evicting
// keys under memory pressure, say).

// recordKindConfigSync is the record kind of the stored configuration
// hash (id "hash").
const recordKindConfigSync = "config_sync"

// configFullResyncInterval is how often the configuration is written
// again although the store's hash is this app's.
const configFullResyncInterval = time.Hour

// resyncChecks counts the due periodic checks of resyncLoop (skipped or
// not), so that tests can measure one.
var resyncChecks atomic.Int64

// configUnchanged reports whether the store's configuration hash is the
// one this app last stored. Any doubt (no store, an error) says no.
func (a *App) configUnchanged(ctx context.Context) bool {
	if a.syncedHash == "" {
		return false
	}
	st, err := a.store()
	if err != nil {
		return false
	}
	rec, err := st.GetRecord(ctx, recordKindConfigSync, "hash")
	return err == nil && string(rec.Data) == a.syncedHash
}

// recordConfigSynced stores hash as the store's configuration hash. A
// failure only makes the next check write the configuration again.
func (a *App) recordConfigSynced(ctx context.Context, st store.Store, hash string) {
	if _, err := st.PutRecord(ctx, store.Record{Kind: recordKindConfigSync, ID: "hash", Data: []byte(hash)}, false); err == nil {
		a.syncedHash = hash
	}
}

// seedIntact reports whether the store's seed marker shows no data loss.
func (a *App) seedIntact(ctx context.Context) bool {
	st, err := a.store()
	if err != nil {
		return false
	}
	lost, err := a.shared.checkSeed(ctx, st)
	return err == nil && !lost
}
