package redisstore

import (
	"context"
	"hash/fnv"
	"strconv"
	"strings"

	"github.com/redis/go-redis/v9"
)

// Buckets (Redis Cluster only). The catalogue, the records, the leases, the
// seed marker and the instances set are spread over buckets hash slots,
// P{b:<NN>}:…, NN = FNV-1a(x) mod buckets, so that no key or slot carries
// them all and they spread over the masters (about buckets/masters each):
//
//	P{b:N(c)}:cust:<c>           customer JSON (N of the customer id)
//	P{b:NN}:customers            sorted set of the bucket's customer ids
//	P{b:N(c)}:custkeys:<c>       a customer's key hashes, scored by creation µs
//	P{b:N(h)}:key:<h>            key JSON (N of the key hash)
//	P{b:N(id)}:keyid:<id>        key id -> key hash
//	P{b:N(id)}:keyused           key id -> last use, for the bucket's key ids
//	P{b:0}:secret                the key secret
//	P{b:NN}:seeded               the seed marker, one copy per bucket (see seed.go)
//	P{b:N(g)}:rec:<kind>:<id>    a record; g is the id up to its first '|'
//	                             (the customer, by convention), so a listing
//	                             by "customer|" prefix reads one bucket
//	P{b:NN}:recidx:<kind>, P{b:NN}:recexp:<kind>  the bucket's record indexes
//	P{b:N(name)}:lease:<name>    a lease
//	P{b:NN}:instances            the bucket's live instances (N of the instance id)
//	P{b:N(s)}:active:<hour>      the subjects s metered in the UTC hour (see hours.go)
//	P{b:NN}:late                 the bucket's subjects metered after their hour (hours.go)
//	P{b:N(h)}:keyexp             active key hashes h by expiry (expiry.go); P{b:0}:keyexp:built
//
// An operation on one customer, key or record stays on one slot; one that
// touches several (a key moved to another customer) takes several steps,
// each idempotent, ordered so that readers never see a key that its
// indexes would hide (see putKeyCluster). A listing reads the buckets'
// indexes in one pipeline (one round trip per master). On a single Redis
// none of this applies: the layout is the one documented in redisstore.go,
// unchanged, so existing data is read as is.

// buckets is the number of buckets.
const buckets = 64

// bucketOf is the bucket of x.
func bucketOf(x string) int {
	h := fnv.New32a()
	_, _ = h.Write([]byte(x))
	return int(h.Sum32() % buckets)
}

// bucketTag is bucket b's hash tag, with the separator.
func bucketTag(b int) string { return "{b:" + strconv.Itoa(b) + "}:" }

// tagOf is the hash tag of x's bucket in a cluster, "" on a single Redis.
func (s *Store) tagOf(x string) string {
	if s.cluster == nil {
		return ""
	}
	return bucketTag(bucketOf(x))
}

// tagAt is bucket b's tag in a cluster, "" on a single Redis.
func (s *Store) tagAt(b int) string {
	if s.cluster == nil {
		return ""
	}
	return bucketTag(b)
}

// bucketList is the buckets an index is split over: all of them in a
// cluster, the one index (bucket 0, untagged) on a single Redis.
func (s *Store) bucketList() []int {
	if s.cluster == nil {
		return []int{0}
	}
	l := make([]int, buckets)
	for i := range l {
		l[i] = i
	}
	return l
}

// recordGroup is what a record id is bucketed by: up to its first '|'.
func recordGroup(id string) string {
	g, _, _ := strings.Cut(id, "|")
	return g
}

// recordBuckets are the buckets a listing of ids starting with prefix
// reads: the one of its group when the prefix spans it.
func (s *Store) recordBuckets(prefix string) []int {
	if s.cluster != nil && strings.Contains(prefix, "|") {
		return []int{bucketOf(recordGroup(prefix))}
	}
	return s.bucketList()
}

// zrangeBuckets reads the members of key(b) for every b in bs in one
// pipeline (one round trip per master) and returns them per bucket.
func (s *Store) zrangeBuckets(ctx context.Context, bs []int, key func(b int) string, by *redis.ZRangeBy) ([][]string, error) {
	cmds := make([]*redis.StringSliceCmd, len(bs))
	_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, b := range bs {
			if by == nil {
				cmds[i] = p.ZRange(ctx, key(b), 0, -1)
			} else {
				cmds[i] = p.ZRangeByLex(ctx, key(b), by)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	out := make([][]string, len(bs))
	for i, c := range cmds {
		out[i] = c.Val()
	}
	return out, nil
}
