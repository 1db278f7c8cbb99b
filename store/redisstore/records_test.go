package redisstore

import (
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

func TestRecordsContract(t *testing.T) {
	storetest.RunRecords(t, func(t *testing.T) store.Store {
		return openStore(t, Options{KeyPrefix: newPrefix(t)})
	})
}

func TestRecordsContractShared(t *testing.T) {
	storetest.RunRecordsShared(t, func(t *testing.T) (store.Store, store.Store) {
		prefix := newPrefix(t)
		return openStore(t, Options{KeyPrefix: prefix}), openStore(t, Options{KeyPrefix: prefix})
	})
}
