package boltstore

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// bucketKeyLastUsed: key id -> last use, Unix microseconds as 8 bytes
// big-endian. Kept apart from the key records so that recording uses is
// not a change to the keys.
var bucketKeyLastUsed = []byte("key_last_used")

// lastUsed reads a key's last use in tx; zero when none is recorded.
func lastUsed(tx *bolt.Tx, keyID string) time.Time {
	v := tx.Bucket(bucketKeyLastUsed).Get([]byte(keyID))
	if len(v) != 8 {
		return time.Time{}
	}
	return time.UnixMicro(int64(binary.BigEndian.Uint64(v))).UTC()
}

// keyByID reads the key with this id in tx.
func keyByID(tx *bolt.Tx, keyID string) (store.Key, error) {
	var k store.Key
	h := tx.Bucket(bucketKeyIDs).Get([]byte(keyID))
	if h == nil {
		return k, fmt.Errorf("boltstore: key %q: %w", keyID, store.ErrNotFound)
	}
	err := getJSON(tx.Bucket(bucketKeys), "key", string(h), &k)
	return k, err
}

// KeyByID implements store.Store.
func (s *Store) KeyByID(_ context.Context, keyID string) (store.Key, error) {
	var k store.Key
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		k, err = keyByID(tx, keyID)
		k.LastUsedAt = lastUsed(tx, keyID)
		return err
	})
	return k, err
}

// UpdateKey implements store.Store.
func (s *Store) UpdateKey(_ context.Context, keyID string, ch store.KeyChange) (store.Key, error) {
	var k store.Key
	err := s.update(func(tx *bolt.Tx) error {
		var err error
		if k, err = keyByID(tx, keyID); err != nil {
			return err
		}
		k = k.Apply(ch)
		k.LastUsedAt = lastUsed(tx, keyID)
		return putJSON(tx.Bucket(bucketKeys), k.Hash, k)
	})
	if err != nil {
		return store.Key{}, err
	}
	s.notify()
	return k, nil
}

// TouchKeys implements store.Store in one transaction; watchers are not
// woken.
func (s *Store) TouchKeys(_ context.Context, uses map[string]time.Time) error {
	if len(uses) == 0 {
		return nil
	}
	return s.update(func(tx *bolt.Tx) error {
		ids, b := tx.Bucket(bucketKeyIDs), tx.Bucket(bucketKeyLastUsed)
		for id, at := range uses {
			if ids.Get([]byte(id)) == nil {
				continue
			}
			us := at.UnixMicro()
			if old := b.Get([]byte(id)); len(old) == 8 && int64(binary.BigEndian.Uint64(old)) >= us {
				continue
			}
			if err := b.Put([]byte(id), binary.BigEndian.AppendUint64(nil, uint64(us))); err != nil {
				return err
			}
		}
		return nil
	})
}
