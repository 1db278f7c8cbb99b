package redisstore

import (
	"bufio"
	"context"
	"errors"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Data loss: a Redis restarted without persistence (or flushed) comes back
// empty while the Caddy instances keep running. The seed marker lets them
// notice: whoever stores the configured customers and keys first claims the
// marker (Pseeded) with a random token, and every instance remembers the
// token it saw after its own seeding. A marker that is gone, or carries
// another token, means the data this instance stored may be gone too.

// In a cluster the catalogue is spread over buckets (see buckets.go), so
// the marker has a copy in every bucket, next to the customers, keys and
// (bucket 0) key secret it vouches for: a master that loses its data loses
// its buckets' copies. The marker is the copies' token when they all carry
// the same one, and none otherwise. A claim that finds the marker keeps
// it; one that does not installs its own token (a new one even when some
// copies survived, so that every instance that adopted the old token sees
// the loss): it swaps bucket 0's copy for it, compare-and-set, and writes
// bucket 0's token to every other copy. Concurrent claims agree on bucket
// 0's token.
func (s *Store) seedKey(b int) string { return s.prefix + s.tagAt(b) + "seeded" }

// SeedMarker returns the seed marker's token, "" when there is none.
func (s *Store) SeedMarker(ctx context.Context) (string, error) {
	var token string
	err := s.call(ctx, func(ctx context.Context) error {
		bs := s.bucketList()
		cmds := make([]*redis.StringCmd, len(bs))
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, b := range bs {
				cmds[i] = p.Get(ctx, s.seedKey(b))
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		for i, c := range cmds {
			v, err := c.Result()
			switch {
			case errors.Is(err, redis.Nil):
				token = ""
				return nil // a copy lost: no marker
			case err != nil:
				return err
			case i > 0 && v != token:
				token = ""
				return nil // copies of different claims: no marker
			}
			token = v
		}
		return nil
	})
	return token, err
}

// ClaimSeedMarker sets the seed marker to token unless there is one, and
// returns the marker's token (token, or the one already there).
func (s *Store) ClaimSeedMarker(ctx context.Context, token string) (string, error) {
	if token == "" {
		return "", errors.New("redisstore: empty seed marker token")
	}
	if s.cluster != nil {
		return s.claimSeedMarkerCluster(ctx, token)
	}
	var got string
	err := s.call(ctx, func(ctx context.Context) error {
		v, err := keySecretScript.Run(ctx, s.client, []string{s.seedKey(0)}, token).Text()
		got = v
		return err
	})
	return got, err
}

// swapSeedScript sets KEYS[1] to ARGV[2] if it holds ARGV[1] ("" for
// none), and returns what it holds then.
var swapSeedScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1]) or ''
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return v
`)

// claimSeedMarkerCluster is ClaimSeedMarker in a cluster (see above).
func (s *Store) claimSeedMarkerCluster(ctx context.Context, token string) (string, error) {
	got, err := s.SeedMarker(ctx)
	if err != nil || got != "" {
		return got, err
	}
	err = s.call(ctx, func(ctx context.Context) error {
		first, err := s.client.Get(ctx, s.seedKey(0)).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		// Bucket 0's copy as read: swapped for token unless another claim
		// changed it meanwhile, whose token then wins.
		got, err = swapSeedScript.Run(ctx, s.client, []string{s.seedKey(0)}, first, token).Text()
		if err != nil {
			return err
		}
		_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for b := 1; b < buckets; b++ {
				p.Set(ctx, s.seedKey(b), got, 0)
			}
			return nil
		})
		return err
	})
	if err != nil {
		return "", err
	}
	return got, nil
}

// Persistence is what a Redis server says about keeping its data on disk.
type Persistence struct {
	// AOF is true when the append-only file is on.
	AOF bool
	// RDB is true when snapshots are scheduled (save points configured).
	RDB bool
	// Known is false when the server refused CONFIG GET (managed Redis
	// services often do) and INFO did not settle the question: it then
	// reports only AOF.
	Known bool
}

// Persistence asks Redis whether it persists its data: CONFIG GET save and
// appendonly, or, where CONFIG is refused, INFO persistence. It bypasses
// the circuit breaker: a refused command says nothing about availability.
func (s *Store) Persistence(ctx context.Context) (Persistence, error) {
	ctx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	var p Persistence
	save, err1 := s.client.ConfigGet(ctx, "save").Result()
	aof, err2 := s.client.ConfigGet(ctx, "appendonly").Result()
	if err1 == nil && err2 == nil {
		p.RDB = strings.TrimSpace(save["save"]) != ""
		p.AOF = aof["appendonly"] == "yes"
		p.Known = true
		return p, nil
	}
	info, err := s.client.Info(ctx, "persistence").Result()
	if err != nil {
		return p, err
	}
	sc := bufio.NewScanner(strings.NewReader(info))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "aof_enabled:"); ok {
			p.AOF = v == "1"
		}
	}
	// Without CONFIG, snapshots cannot be told apart from none; with the
	// AOF on, the answer does not matter.
	p.Known = p.AOF
	return p, nil
}
