package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// keyUsedKey is the hash of key id -> last use (Unix microseconds) that
// holds id (one hash on a single Redis, one per bucket in a cluster). It is
// kept apart from the key records so that recording uses changes no key
// and publishes nothing.
func (s *Store) keyUsedKey(id string) string { return s.prefix + s.tagOf(id) + "keyused" }

// hashOfID returns the hash of the key with this id.
func (s *Store) hashOfID(ctx context.Context, keyID string) (string, error) {
	hash, err := s.client.Get(ctx, s.keyIDKey(keyID)).Result()
	if errors.Is(err, redis.Nil) {
		return "", notFound("key", keyID)
	}
	return hash, err
}

// modifyKey runs change on the key with this id under WATCH and, when it
// reports a change, stores the key and announces it (in a cluster it
// announces it even when nothing changed, see below). It returns the key.
func (s *Store) modifyKey(ctx context.Context, keyID string, change func(k *store.Key) bool) (store.Key, error) {
	var k store.Key
	err := s.call(ctx, func(ctx context.Context) error {
		hash, err := s.hashOfID(ctx, keyID)
		if err != nil {
			return err
		}
		key := s.keyKey(hash)
		changed := false
		err = s.watchRetry(ctx, func(tx *redis.Tx) error {
			changed = false
			data, err := tx.Get(ctx, key).Bytes()
			if errors.Is(err, redis.Nil) {
				return notFound("key", keyID)
			}
			if err != nil {
				return err
			}
			k = store.Key{}
			if err := decode("key", hash, data, &k); err != nil {
				return err
			}
			if !change(&k) {
				return nil
			}
			if data, err = json.Marshal(k); err != nil {
				return permanent{err}
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, key, data, 0)
				s.indexExpiry(ctx, p, k)
				s.publishIn(ctx, p, "key")
				return nil
			})
			changed = err == nil
			return err
		}, key)
		if err != nil || (!changed && s.cluster == nil) {
			return err
		}
		// In a cluster the announcement follows the write and can fail
		// alone: a retry that finds the change made announces it again.
		return s.publishAfter(ctx, "key")
	})
	if err != nil {
		return store.Key{}, err
	}
	return k, nil
}

// KeyByID implements store.Store.
func (s *Store) KeyByID(ctx context.Context, keyID string) (store.Key, error) {
	var k store.Key
	err := s.call(ctx, func(ctx context.Context) error {
		hash, err := s.hashOfID(ctx, keyID)
		if err != nil {
			return err
		}
		data, err := s.client.Get(ctx, s.keyKey(hash)).Bytes()
		if errors.Is(err, redis.Nil) {
			return notFound("key", keyID)
		}
		if err != nil {
			return err
		}
		if err := decode("key", hash, data, &k); err != nil {
			return err
		}
		list := []store.Key{k}
		err = s.fillLastUsed(ctx, list)
		k = list[0]
		return err
	})
	if err != nil {
		return store.Key{}, err
	}
	return k, nil
}

// UpdateKey implements store.Store.
func (s *Store) UpdateKey(ctx context.Context, keyID string, ch store.KeyChange) (store.Key, error) {
	k, err := s.modifyKey(ctx, keyID, func(k *store.Key) bool {
		*k = k.Apply(ch)
		return true
	})
	if err != nil {
		return store.Key{}, err
	}
	list := []store.Key{k}
	err = s.call(ctx, func(ctx context.Context) error { return s.fillLastUsed(ctx, list) })
	return list[0], err
}

// fillLastUsed sets the LastUsedAt of keys in one round trip.
func (s *Store) fillLastUsed(ctx context.Context, keys []store.Key) error {
	if len(keys) == 0 {
		return nil
	}
	// The keys' indexes by the hash holding their uses (one on a single
	// Redis, a bucket's in a cluster).
	groups := map[string][]int{}
	var order []string
	for i, k := range keys {
		h := s.keyUsedKey(k.ID)
		if _, ok := groups[h]; !ok {
			order = append(order, h)
		}
		groups[h] = append(groups[h], i)
	}
	cmds := make([]*redis.SliceCmd, len(order))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for g, h := range order {
			ids := make([]string, len(groups[h]))
			for j, i := range groups[h] {
				ids[j] = keys[i].ID
			}
			cmds[g] = p.HMGet(ctx, h, ids...)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for g, h := range order {
		for j, v := range cmds[g].Val() {
			str, ok := v.(string)
			if !ok {
				continue
			}
			if us, err := strconv.ParseInt(str, 10, 64); err == nil {
				keys[groups[h][j]].LastUsedAt = time.UnixMicro(us).UTC()
			}
		}
	}
	return nil
}

// touchScript raises the last use of each key id in ARGV (pairs of id and
// Unix microseconds) in the hash KEYS[1], never lowering it.
var touchScript = redis.NewScript(`
for i = 1, #ARGV, 2 do
  local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i+1]) > old then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i+1]) end
end
return 0
`)

// touchBatch is the most key uses one script call records, so that a large
// flush does not hold Redis for long.
const touchBatch = 500

// TouchKeys implements store.Store: one round trip (a pipeline of script
// calls of touchBatch uses each, sent with EVAL since a pipeline cannot
// fall back from EVALSHA). Only ids of existing keys are ever
// reported (KeyByID, ListKeys), so unknown ids are harmless.
func (s *Store) TouchKeys(ctx context.Context, uses map[string]time.Time) error {
	if len(uses) == 0 {
		return nil
	}
	return s.call(ctx, func(ctx context.Context) error {
		// Per hash of uses (one on a single Redis, a bucket's in a cluster).
		args := map[string][]any{}
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for id, at := range uses {
				h := s.keyUsedKey(id)
				a := append(args[h], id, at.UnixMicro())
				if len(a) == 2*touchBatch {
					touchScript.Eval(ctx, p, []string{h}, a...)
					a = nil
				}
				args[h] = a
			}
			for h, a := range args {
				if len(a) > 0 {
					touchScript.Eval(ctx, p, []string{h}, a...)
				}
			}
			return nil
		})
		return err
	})
}

// claimKeyIDScript points the key id KEYS[1] at the key hash ARGV[1]
// unless it points at another hash, and returns the hash it points at.
var claimKeyIDScript = redis.NewScript(`
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return h end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
`)

// releaseKeyIDScript deletes the key id KEYS[1] if it points at the key
// hash ARGV[1].
var releaseKeyIDScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
`)

// putKeyCluster is PutKey in a cluster, where the key, its id and its
// customers' indexes are in different slots. Its steps are each
// idempotent (a PutKey failed half-way is completed by the same PutKey
// again) and ordered for readers:
//
//  1. the id is claimed for the hash (refused when it names another key);
//  2. the key is written under WATCH (merged with the stored one);
//  3. its old id (when it changed) is released, it leaves its old
//     customer's index (ListKeys skips a key that names another customer
//     meanwhile) and joins its customer's index;
//  4. the change is announced.
func (s *Store) putKeyCluster(ctx context.Context, in store.Key) (store.Key, error) {
	var k store.Key
	keyKey := s.keyKey(in.Hash)
	err := s.call(ctx, func(ctx context.Context) error {
		h, err := claimKeyIDScript.Run(ctx, s.client, []string{s.keyIDKey(in.ID)}, in.Hash).Text()
		if err != nil {
			return err
		}
		if h != in.Hash {
			return permanent{fmt.Errorf("redisstore: key id %q already belongs to another key", in.ID)}
		}
		var old *store.Key
		err = s.watchRetry(ctx, func(tx *redis.Tx) error {
			var err error
			if k, old, err = mergeStoredKey(in, tx.Get(ctx, keyKey)); err != nil {
				return err
			}
			data, err := json.Marshal(k)
			if err != nil {
				return permanent{err}
			}
			_, err = tx.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Set(ctx, keyKey, data, 0)
				s.indexExpiry(ctx, p, k)
				return nil
			})
			return err
		}, keyKey)
		if err != nil {
			return err
		}
		_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			if old != nil && old.ID != k.ID {
				releaseKeyIDScript.Eval(ctx, p, []string{s.keyIDKey(old.ID)}, k.Hash)
			}
			if old != nil && old.CustomerID != k.CustomerID {
				p.ZRem(ctx, s.custKeysKey(old.CustomerID), k.Hash)
			}
			p.ZAdd(ctx, s.custKeysKey(k.CustomerID), redis.Z{Score: float64(k.CreatedAt.UnixMicro()), Member: k.Hash})
			return nil
		})
		if err != nil {
			return err
		}
		return s.publishAfter(ctx, "key")
	})
	if err != nil {
		return store.Key{}, err
	}
	return k, nil
}

// mergeStoredKey is k as it is to be stored, given the stored copy's read
// (stored): merged with the stored copy when there is one (returned as
// old), or with its creation time set when there is none.
func mergeStoredKey(k store.Key, stored *redis.StringCmd) (store.Key, *store.Key, error) {
	switch data, err := stored.Bytes(); {
	case err == nil:
		old := new(store.Key)
		if err := decode("key", k.Hash, data, old); err != nil {
			return k, nil, err
		}
		return k.MergeStored(*old), old, nil
	case errors.Is(err, redis.Nil):
		if k.CreatedAt.IsZero() {
			k.CreatedAt = now()
		}
		return k, nil, nil
	default:
		return k, nil, err
	}
}
