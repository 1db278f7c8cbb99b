package redisstore

import (
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// meterTimeout is the OpTimeout of the metering tests: they are about
// exactness, and hundreds of goroutines on few CPUs (and -race) queue for
// connections.
const meterTimeout = 5 * time.Second

func TestMeterContract(t *testing.T) {
	storetest.RunMeter(t, func(t *testing.T) store.Store {
		return openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: meterTimeout})
	})
}

func TestMeterContractShared(t *testing.T) {
	storetest.RunMeterShared(t, func(t *testing.T) (store.Store, store.Store) {
		prefix := newPrefix(t)
		return openStore(t, Options{KeyPrefix: prefix, OpTimeout: meterTimeout}), openStore(t, Options{KeyPrefix: prefix, OpTimeout: meterTimeout})
	})
}
