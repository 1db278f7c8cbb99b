package redisstore

import (
	"context"
	"errors"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// heartbeatScript records ARGV[1] as live until now + ARGV[2] ms (Redis
// clock) in the sorted set KEYS[1], drops the members whose time is up,
// and returns how many are live.
var heartbeatScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
return redis.call('ZCARD', KEYS[1])
`)

// instancesKey is bucket b's set of live instances (the one set on a
// single Redis).
func (s *Store) instancesKey(b int) string { return s.prefix + s.tagAt(b) + "instances" }

// Heartbeat records instance as live for ttl and returns how many
// instances sharing this Redis (and key prefix) are live, instance
// included. Instances call it periodically, more often than ttl; one that
// stops calling it stops being counted once its ttl has passed.
func (s *Store) Heartbeat(ctx context.Context, instance string, ttl time.Duration) (int, error) {
	if instance == "" || ttl < time.Millisecond {
		return 0, errors.New("redisstore: heartbeat needs an instance id and a ttl of at least 1ms")
	}
	var n int
	err := s.call(ctx, func(ctx context.Context) error {
		v, err := heartbeatScript.Run(ctx, s.client, []string{s.instancesKey(bucketOf(instance))}, instance, ttl.Milliseconds()).Int()
		if s.cluster == nil || err != nil {
			n = v
			return err
		}
		// In a cluster: count the live members of every bucket (their
		// scores are their masters' clocks; this process's stands in).
		live := strconv.FormatInt(time.Now().UnixMilli(), 10)
		cmds := make([]*redis.IntCmd, buckets)
		if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for b := range cmds {
				cmds[b] = p.ZCount(ctx, s.instancesKey(b), "("+live, "+inf")
			}
			return nil
		}); err != nil {
			return err
		}
		n = 0
		for _, c := range cmds {
			n += int(c.Val())
		}
		n = max(n, 1) // this instance, whatever the clocks say
		return nil
	})
	return n, err
}
