package store

import (
	"context"
	"time"
)

// KeyExpiryIndex is implemented by stores that index the active keys
// with an expiry by their expiry time, so that a background loop (the
// notifier's key expiry announcements) reads the keys about to expire
// instead of every customer's keys.
type KeyExpiryIndex interface {
	// KeysExpiring returns the hashes of the active keys whose ExpiresAt
	// is after from and not after to, as the index last saw them: a caller
	// reads each key (KeyByHash) and judges it by what it reads. Keys
	// stored before the store kept the index are indexed at the first
	// call.
	KeysExpiring(ctx context.Context, from, to time.Time) ([]string, error)
	// KeyByHash looks a key up by its hash.
	KeyByHash(ctx context.Context, hash string) (Key, error)
}
