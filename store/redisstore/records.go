package redisstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Records (store.Records) on Redis. Keys, under Options.KeyPrefix (P):
//
//	Prec:<kind>:<id>   hash: d (data), x (Expires in µs since the epoch, 0
//	                   for none); PEXPIRE at Expires when set
//	Precidx:<kind>     sorted set of the kind's ids (score 0: ordered by id)
//	Precexp:<kind>     sorted set of the ids of expiring records, scored by x
//	lease:<name>       a lease's holder; PX = ttl
//
// Expires is kept at microsecond precision (truncated). Whether a record
// has expired is judged by the caller's clock: each call sends its time to
// the script, so a record that a read found expired is also expired for an
// onlyIfAbsent put from the same clock. Redis's own expiry of the hash is
// set from the writer's clock as a duration, so Redis does not forget a
// record before its Expires.
//
// The index members of expired records are pruned by ListRecords (members
// whose hash is gone) and by every PutRecord (up to recordPruneBatch
// members of Precexp that have expired), so kinds that are only written and
// read by id stay bounded too. The scripts touch record hashes they compute
// from the prefix: in a Redis Cluster, the keys of a bucket's records of a
// kind share the bucket's hash tag (see buckets.go).

// recordPruneBatch bounds the expired records one PutRecord removes.
const recordPruneBatch = 64

var _ store.Records = (*Store)(nil)

// In a Redis Cluster a record is in the bucket of its id's group (see
// buckets.go), with that bucket's indexes of its kind
// (P{b:NN}:rec:<kind>:<id>, P{b:NN}:recidx:<kind>, P{b:NN}:recexp:<kind>),
// so its scripts stay on one node. On a single Redis b is ignored.
func (s *Store) recPrefix(kind string, b int) string {
	return s.prefix + s.tagAt(b) + "rec:" + kind + ":"
}
func (s *Store) recIdxKey(kind string, b int) string { return s.prefix + s.tagAt(b) + "recidx:" + kind }
func (s *Store) recExpKey(kind string, b int) string { return s.prefix + s.tagAt(b) + "recexp:" + kind }
func (s *Store) leaseKey(name string) string         { return s.prefix + s.tagOf(name) + "lease:" + name }
func (s *Store) recKey(kind, id string) string       { return s.recPrefix(kind, recBucket(id)) + id }

// recBucket is the bucket of the record with this id.
func recBucket(id string) int { return bucketOf(recordGroup(id)) }

// checkKind rejects kinds whose keys could collide with another kind's.
func checkKind(kind string) error {
	switch {
	case kind == "":
		return errors.New("redisstore: empty record kind")
	case strings.Contains(kind, ":"):
		return fmt.Errorf("redisstore: record kind %q contains ':'", kind)
	}
	return nil
}

// checkRecordKey validates a record's kind and id.
func checkRecordKey(kind, id string) error {
	if id == "" {
		return errors.New("redisstore: empty record id")
	}
	return checkKind(kind)
}

// putRecordScript prunes expired records of the kind, then stores one.
// KEYS: record, index, expiry index. ARGV: id, data, x (0: none), now µs,
// onlyIfAbsent (1 or 0), PEXPIRE ms, record key prefix of the kind. It
// returns 1 when it stored the record, 0 when onlyIfAbsent found a live one.
// Numbers reach redis.call as the ARGV strings: Lua would format its own
// numbers with 14 significant digits.
var putRecordScript = redis.NewScript(`
local now = tonumber(ARGV[4])
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[4], 'LIMIT', 0, ` + strconv.Itoa(recordPruneBatch) + `)
for _, m in ipairs(old) do
  local k = ARGV[7] .. m
  local x = tonumber(redis.call('HGET', k, 'x'))
  if not x or (x ~= 0 and x <= now) then
    redis.call('DEL', k)
    redis.call('ZREM', KEYS[2], m)
    redis.call('ZREM', KEYS[3], m)
  end
end
if ARGV[5] == '1' then
  local x = tonumber(redis.call('HGET', KEYS[1], 'x'))
  if x and (x == 0 or x > now) then return 0 end
end
local e = tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
if e ~= 0 and e <= now then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'x', ARGV[3])
if e == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 1
`)

// PutRecord implements store.Records.
func (s *Store) PutRecord(ctx context.Context, r store.Record, onlyIfAbsent bool) (bool, error) {
	if err := checkRecordKey(r.Kind, r.ID); err != nil {
		return false, err
	}
	nowUS := time.Now().UnixMicro()
	var x, px int64
	if !r.Expires.IsZero() {
		x = r.Expires.UnixMicro()
		if x == 0 {
			x = -1 // the epoch itself: expired, and not "no expiry"
		}
		if x > nowUS {
			px = (x - nowUS + 999) / 1000
		}
	}
	only := "0"
	if onlyIfAbsent {
		only = "1"
	}
	var stored bool
	err := s.call(ctx, func(ctx context.Context) error {
		b := recBucket(r.ID)
		n, err := putRecordScript.Run(ctx, s.client,
			[]string{s.recKey(r.Kind, r.ID), s.recIdxKey(r.Kind, b), s.recExpKey(r.Kind, b)},
			r.ID, r.Data, x, nowUS, only, px, s.recPrefix(r.Kind, b)).Int()
		stored = n == 1
		return err
	})
	if err != nil {
		return false, err
	}
	return stored, nil
}

// decodeRecord turns the fields d and x of a record hash into a Record; ok
// is false when the hash is missing or expired at nowUS.
func decodeRecord(kind, id string, fields []any, nowUS int64) (r store.Record, ok bool, err error) {
	if len(fields) != 2 || fields[0] == nil {
		return store.Record{}, false, nil
	}
	data, _ := fields[0].(string)
	xs, _ := fields[1].(string)
	x, perr := strconv.ParseInt(xs, 10, 64)
	if perr != nil {
		return store.Record{}, false, permanent{fmt.Errorf("redisstore: corrupt record %s/%s: expiry %q", kind, id, xs)}
	}
	r = store.Record{Kind: kind, ID: id, Data: []byte(data)}
	if x != 0 {
		if x <= nowUS {
			return store.Record{}, false, nil
		}
		r.Expires = time.UnixMicro(x).UTC()
	}
	return r, true, nil
}

// GetRecord implements store.Records.
func (s *Store) GetRecord(ctx context.Context, kind, id string) (store.Record, error) {
	if err := checkRecordKey(kind, id); err != nil {
		return store.Record{}, err
	}
	var r store.Record
	err := s.call(ctx, func(ctx context.Context) error {
		fields, err := s.client.HMGet(ctx, s.recKey(kind, id), "d", "x").Result()
		if err != nil {
			return err
		}
		var ok bool
		r, ok, err = decodeRecord(kind, id, fields, time.Now().UnixMicro())
		if err == nil && !ok {
			err = notFound("record", kind+"/"+id)
		}
		return err
	})
	if err != nil {
		return store.Record{}, err
	}
	return r, nil
}

// pruneIndexScript removes from the index (KEYS[1]) and the expiry index
// (KEYS[2]) the ids (ARGV[2:]) whose record hash (ARGV[1] .. id) is gone.
var pruneIndexScript = redis.NewScript(`
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return 0
`)

// ListRecords implements store.Records.
func (s *Store) ListRecords(ctx context.Context, kind, prefix string) ([]store.Record, error) {
	if err := checkKind(kind); err != nil {
		return nil, err
	}
	list := []store.Record{}
	err := s.call(ctx, func(ctx context.Context) error {
		list = list[:0]
		bs := s.recordBuckets(prefix)
		per, err := s.zrangeBuckets(ctx, bs, func(b int) string { return s.recIdxKey(kind, b) }, lexRange(prefix))
		if err != nil {
			return err
		}
		ids := slices.Concat(per...)
		if len(ids) == 0 {
			return nil
		}
		slices.Sort(ids) // the buckets' ids, merged (as one index orders them)
		cmds := make([]*redis.SliceCmd, len(ids))
		_, err = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, id := range ids {
				cmds[i] = p.HMGet(ctx, s.recKey(kind, id), "d", "x")
			}
			return nil
		})
		if err != nil {
			return err
		}
		nowUS := time.Now().UnixMicro()
		gone := map[int][]any{} // by bucket
		for i, cmd := range cmds {
			fields, err := cmd.Result()
			if err != nil {
				return err
			}
			if fields[0] == nil {
				b := recBucket(ids[i])
				gone[b] = append(gone[b], ids[i])
				continue
			}
			r, ok, err := decodeRecord(kind, ids[i], fields, nowUS)
			if err != nil {
				return err
			}
			if ok {
				list = append(list, r)
			}
		}
		for b, ids := range gone {
			err := pruneIndexScript.Run(ctx, s.client, []string{s.recIdxKey(kind, b), s.recExpKey(kind, b)},
				append([]any{s.recPrefix(kind, b)}, ids...)...).Err()
			if err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return list, nil
}

// lexRange is the ZRANGEBYLEX range of the members starting with prefix.
func lexRange(prefix string) *redis.ZRangeBy {
	if prefix == "" {
		return &redis.ZRangeBy{Min: "-", Max: "+"}
	}
	r := &redis.ZRangeBy{Min: "[" + prefix, Max: "+"}
	// The least string above every string with the prefix: drop trailing
	// 0xff bytes and increment the last byte.
	b := []byte(prefix)
	for len(b) > 0 && b[len(b)-1] == 0xff {
		b = b[:len(b)-1]
	}
	if len(b) > 0 {
		b[len(b)-1]++
		r.Max = "(" + string(b)
	}
	return r
}

// DeleteRecord implements store.Records.
func (s *Store) DeleteRecord(ctx context.Context, kind, id string) error {
	if err := checkRecordKey(kind, id); err != nil {
		return err
	}
	return s.call(ctx, func(ctx context.Context) error {
		b := recBucket(id)
		_, err := s.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
			p.Del(ctx, s.recKey(kind, id))
			p.ZRem(ctx, s.recIdxKey(kind, b), id)
			p.ZRem(ctx, s.recExpKey(kind, b), id)
			return nil
		})
		return err
	})
}

// tryLeaseScript takes or renews the lease KEYS[1] for holder ARGV[1] for
// ARGV[2] ms; it returns 1 on success, 0 when another holder has it.
var tryLeaseScript = redis.NewScript(`
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
`)

// releaseLeaseScript deletes the lease KEYS[1] if holder ARGV[1] has it.
var releaseLeaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
`)

// TryLease implements store.Records. The ttl is rounded up to whole
// milliseconds and runs on the Redis server's clock.
func (s *Store) TryLease(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if name == "" || holder == "" || ttl <= 0 {
		return false, fmt.Errorf("redisstore: lease needs a name, a holder and a positive ttl (got %q, %q, %v)", name, holder, ttl)
	}
	ms := (ttl + time.Millisecond - 1) / time.Millisecond
	var ok bool
	err := s.call(ctx, func(ctx context.Context) error {
		n, err := tryLeaseScript.Run(ctx, s.client, []string{s.leaseKey(name)}, holder, int64(ms)).Int()
		ok = n == 1
		return err
	})
	if err != nil {
		return false, err
	}
	return ok, nil
}

// ReleaseLease implements store.Records.
func (s *Store) ReleaseLease(ctx context.Context, name, holder string) error {
	return s.call(ctx, func(ctx context.Context) error {
		return releaseLeaseScript.Run(ctx, s.client, []string{s.leaseKey(name)}, holder).Err()
	})
}
