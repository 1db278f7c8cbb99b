package redisstore

import (
	"bufio"
	"context"
	"errors"
	"strings"
	"time"

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
// the loss). A claim runs in three steps: it swaps bucket 0's copy for
// "<token>:pending" (compare-and-set, expiring after seedPendingTTL), writes
// the token to every other copy, then swaps bucket 0's copy for the bare
// token. A claim that finds a pending claim in bucket 0 completes that one
// (same copies, same final swap) instead of reading its half-written copies
// as a loss, so instances starting together agree on one token; a pending
// claim whose instance died expires, and the next claim starts afresh.
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

// seedPending marks bucket 0's copy of a claim whose other copies are
// still being written; seedPendingTTL bounds how long a claim whose
// instance stopped half way blocks the next one.
const (
	seedPending    = ":pending"
	seedPendingTTL = 10 * time.Second
)

// swapSeedScript sets KEYS[1] to ARGV[2] if it holds ARGV[1] ("" for
// none), expiring after ARGV[3] milliseconds unless ARGV[3] is 0, and
// returns what it holds then.
var swapSeedScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1]) or ''
if v == ARGV[1] then
  if ARGV[3] == '0' then
    redis.call('SET', KEYS[1], ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
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
	swap := func(ctx context.Context, from, to string, ttl time.Duration) (string, error) {
		return swapSeedScript.Run(ctx, s.client, []string{s.seedKey(0)}, from, to, ttl.Milliseconds()).Text()
	}
	err = s.call(ctx, func(ctx context.Context) error {
		first, err := s.client.Get(ctx, s.seedKey(0)).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			return err
		}
		claim, pending := strings.CutSuffix(first, seedPending)
		if !pending && first != "" {
			// A finished claim: its copies were written before bucket 0's
			// final token, so copies missing now were lost. Read them again,
			// since the first read may have been made while that claim was
			// still writing them.
			now, err := s.SeedMarker(ctx)
			if err != nil {
				return err
			}
			if now == first {
				got = now
				return nil
			}
		}
		if !pending {
			// No claim in progress: bucket 0 is empty, or holds a finished
			// claim some of whose copies are gone (a master lost its
			// data). Start a claim of token, unless another claim changed
			// bucket 0 meanwhile.
			v, err := swapSeedScript.Run(ctx, s.client, []string{s.seedKey(0)}, first, token+seedPending, seedPendingTTL.Milliseconds()).Text()
			if err != nil {
				return err
			}
			if claim, pending = strings.CutSuffix(v, seedPending); !pending {
				got = v // another claim finished meanwhile
				return nil
			}
		}
		// Complete the pending claim (ours or another's): its copies,
		// then bucket 0's final token.
		if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for b := 1; b < buckets; b++ {
				p.Set(ctx, s.seedKey(b), claim, 0)
			}
			return nil
		}); err != nil {
			return err
		}
		v, err := swap(ctx, claim+seedPending, claim, 0)
		if err != nil {
			return err
		}
		// v is claim, unless the pending claim expired and another
		// started: its token, which the caller's confirmation reads.
		got, _ = strings.CutSuffix(v, seedPending)
		return nil
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
