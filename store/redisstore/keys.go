package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// keyUsedKey is the hash of key id -> last use (Unix microseconds). It is
// kept apart from the key records so that recording uses changes no key
// and publishes nothing.
func (s *Store) keyUsedKey() string { return s.prefix + s.catalogueTag() + "keyused" }

// hashOfID returns the hash of the key with this id.
func (s *Store) hashOfID(ctx context.Context, keyID string) (string, error) {
	hash, err := s.client.Get(ctx, s.keyIDKey(keyID)).Result()
	if errors.Is(err, redis.Nil) {
		return "", notFound("key", keyID)
	}
	return hash, err
}

// modifyKey runs change on the key with this id under WATCH and, when it
// reports a change, stores the key and announces it. It returns the key.
func (s *Store) modifyKey(ctx context.Context, keyID string, change func(k *store.Key) bool) (store.Key, error) {
	var k store.Key
	err := s.call(ctx, func(ctx context.Context) error {
		hash, err := s.hashOfID(ctx, keyID)
		if err != nil {
			return err
		}
		key := s.keyKey(hash)
		return s.watchRetry(ctx, func(tx *redis.Tx) error {
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
				p.Publish(ctx, s.changesChannel(), "key")
				return nil
			})
			return err
		}, key)
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
	ids := make([]string, len(keys))
	for i, k := range keys {
		ids[i] = k.ID
	}
	vals, err := s.client.HMGet(ctx, s.keyUsedKey(), ids...).Result()
	if err != nil {
		return err
	}
	for i, v := range vals {
		str, ok := v.(string)
		if !ok {
			continue
		}
		if us, err := strconv.ParseInt(str, 10, 64); err == nil {
			keys[i].LastUsedAt = time.UnixMicro(us).UTC()
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
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			args := make([]any, 0, 2*min(len(uses), touchBatch))
			for id, at := range uses {
				args = append(args, id, at.UnixMicro())
				if len(args) == 2*touchBatch {
					touchScript.Eval(ctx, p, []string{s.keyUsedKey()}, args...)
					args = args[:0:0]
				}
			}
			if len(args) > 0 {
				touchScript.Eval(ctx, p, []string{s.keyUsedKey()}, args...)
			}
			return nil
		})
		return err
	})
}
