package redisstore

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// The key expiry index (store.KeyExpiryIndex): P{b:N(h)}:keyexp (Pkeyexp
// on a single Redis) is a sorted set of the hashes h of the active keys
// with an expiry, scored by ExpiresAt (Unix seconds), in the bucket of the
// key itself, so that every write of a key updates it in the key's own
// transaction. Keys stored before the index existed are indexed once,
// by the first KeysExpiring, which then sets P{b:0}:keyexp:built
// (Pkeyexp:built); a store that lost its data loses the marker with it.

// keyExpKey is bucket b's key expiry index.
func (s *Store) keyExpKey(b int) string { return s.prefix + s.tagAt(b) + "keyexp" }

// keyExpKeyOf is the index holding the key with this hash.
func (s *Store) keyExpKeyOf(hash string) string { return s.prefix + s.tagOf(hash) + "keyexp" }

// keyExpBuiltKey marks the index as holding every key.
func (s *Store) keyExpBuiltKey() string { return s.prefix + s.tagAt(0) + "keyexp:built" }

// indexExpiry queues, in a transaction writing k, the update of its
// expiry index entry.
func (s *Store) indexExpiry(ctx context.Context, p redis.Pipeliner, k store.Key) {
	if k.Active() && !k.ExpiresAt.IsZero() {
		p.ZAdd(ctx, s.keyExpKeyOf(k.Hash), redis.Z{Score: float64(k.ExpiresAt.Unix()), Member: k.Hash})
	} else {
		p.ZRem(ctx, s.keyExpKeyOf(k.Hash), k.Hash)
	}
}

// expiryPruneAge is how long after its expiry a key leaves the index.
const expiryPruneAge = 24 * time.Hour

// KeysExpiring implements store.KeyExpiryIndex: one ZRANGEBYSCORE per
// bucket (and a prune of keys long expired), in one pipeline.
func (s *Store) KeysExpiring(ctx context.Context, from, to time.Time) ([]string, error) {
	if err := s.buildExpiryIndex(ctx); err != nil {
		return nil, err
	}
	var out []string
	err := s.call(ctx, func(ctx context.Context) error {
		bs := s.bucketList()
		cmds := make([]*redis.StringSliceCmd, len(bs))
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, b := range bs {
				p.ZRemRangeByScore(ctx, s.keyExpKey(b), "-inf", strconv.FormatInt(from.Add(-expiryPruneAge).Unix(), 10))
				cmds[i] = p.ZRangeByScore(ctx, s.keyExpKey(b), &redis.ZRangeBy{
					Min: "(" + strconv.FormatInt(from.Unix(), 10), Max: strconv.FormatInt(to.Unix(), 10),
				})
			}
			return nil
		})
		if err != nil {
			return err
		}
		out = out[:0]
		for _, c := range cmds {
			out = append(out, c.Val()...)
		}
		return nil
	})
	return out, err
}

// buildExpiryIndex indexes every stored key, unless the marker says it
// was done.
func (s *Store) buildExpiryIndex(ctx context.Context) error {
	if s.expiryBuilt.Load() {
		return nil
	}
	var built bool
	err := s.call(ctx, func(ctx context.Context) error {
		n, err := s.client.Exists(ctx, s.keyExpBuiltKey()).Result()
		built = n == 1
		return err
	})
	if err != nil || built {
		s.expiryBuilt.Store(built)
		return err
	}
	customers, err := s.ListCustomers(ctx)
	if err != nil {
		return err
	}
	for _, c := range customers {
		keys, err := s.ListKeys(ctx, c.ID)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		err = s.call(ctx, func(ctx context.Context) error {
			_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
				for _, k := range keys {
					s.indexExpiry(ctx, p, k)
				}
				return nil
			})
			return err
		})
		if err != nil {
			return err
		}
	}
	err = s.call(ctx, func(ctx context.Context) error {
		return s.client.Set(ctx, s.keyExpBuiltKey(), "1", 0).Err()
	})
	if err == nil {
		s.expiryBuilt.Store(true)
	}
	return err
}

var _ store.KeyExpiryIndex = (*Store)(nil)
