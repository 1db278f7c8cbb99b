package redisstore

import (
	"context"
	"errors"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// recordsTimeout is the OpTimeout of the Records tests: they are about
// semantics, and a loaded machine (-race, parallel packages) can exceed
// the default within one call.
const recordsTimeout = 5 * time.Second

func TestRecordsContract(t *testing.T) {
	storetest.RunRecords(t, func(t *testing.T) store.Store {
		return openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: recordsTimeout})
	})
}

func TestRecordsContractShared(t *testing.T) {
	storetest.RunRecordsShared(t, func(t *testing.T) (store.Store, store.Store) {
		prefix := newPrefix(t)
		return openStore(t, Options{KeyPrefix: prefix, OpTimeout: recordsTimeout}), openStore(t, Options{KeyPrefix: prefix, OpTimeout: recordsTimeout})
	})
}

// waitGone polls until Redis has dropped key (its PEXPIRE passed).
func waitGone(t *testing.T, c *redis.Client, key string) {
	t.Helper()
	deadline := time.Now().Add(storetest.Timeout)
	for {
		n, err := c.Exists(t.Context(), key).Result()
		if err != nil {
			t.Fatalf("EXISTS %s: %v", key, err)
		}
		if n == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists after %v", key, storetest.Timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// inIndex reports whether id is a member of the sorted set key.
func inIndex(t *testing.T, c *redis.Client, key, id string) bool {
	t.Helper()
	err := c.ZScore(t.Context(), key, id).Err()
	if err != nil && !errors.Is(err, redis.Nil) {
		t.Fatalf("ZSCORE %s %s: %v", key, id, err)
	}
	return err == nil
}

// TestRecordKeysExpireAndIndexesPrune checks the Redis side of expiry:
// an expiring record's hash has a TTL that does not end before Expires,
// and the index members of records Redis dropped are pruned by ListRecords
// and by PutRecord, so kinds that are never listed stay bounded.
func TestRecordKeysExpireAndIndexesPrune(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix, OpTimeout: recordsTimeout})
	ctx := t.Context()
	idx, exp := prefix+"recidx:evt", prefix+"recexp:evt"

	put := func(id string, expires time.Time) {
		t.Helper()
		if ok, err := s.PutRecord(ctx, store.Record{Kind: "evt", ID: id, Data: []byte("x"), Expires: expires}, true); err != nil || !ok {
			t.Fatalf("PutRecord(%s) = %v, %v", id, ok, err)
		}
	}

	expires := time.Now().Add(300 * time.Millisecond)
	put("e1", expires)
	if ttl, err := c.PTTL(ctx, prefix+"rec:evt:e1").Result(); err != nil || ttl <= 0 || ttl > 300*time.Millisecond {
		t.Errorf("PTTL of an expiring record = %v, %v; want in (0, 300ms]", ttl, err)
	}
	if !inIndex(t, c, idx, "e1") || !inIndex(t, c, exp, "e1") {
		t.Fatal("expiring record missing from the id or expiry index")
	}
	waitGone(t, c, prefix+"rec:evt:e1")
	if time.Now().Before(expires) {
		t.Fatal("Redis dropped the record before its Expires")
	}
	if list, err := s.ListRecords(ctx, "evt", ""); err != nil || len(list) != 0 {
		t.Fatalf("ListRecords = %v, %v; want none", list, err)
	}
	if inIndex(t, c, idx, "e1") || inIndex(t, c, exp, "e1") {
		t.Error("ListRecords left the dropped record in the indexes")
	}

	// A kind that is only written: PutRecord prunes.
	expires = time.Now().Add(100 * time.Millisecond)
	put("e2", expires)
	put("forever", time.Time{})
	waitGone(t, c, prefix+"rec:evt:e2")
	put("e3", time.Now().Add(time.Hour))
	if inIndex(t, c, idx, "e2") || inIndex(t, c, exp, "e2") {
		t.Error("PutRecord left an expired record in the indexes")
	}
	if !inIndex(t, c, idx, "forever") || inIndex(t, c, exp, "forever") || !inIndex(t, c, idx, "e3") || !inIndex(t, c, exp, "e3") {
		t.Error("PutRecord pruned live records from the indexes, or indexed a record without expiry as expiring")
	}
	// Overwriting an expiring record with a lasting one leaves the expiry
	// index and drops the hash's TTL.
	if _, err := s.PutRecord(ctx, store.Record{Kind: "evt", ID: "e3", Data: []byte("y")}, false); err != nil {
		t.Fatal(err)
	}
	if inIndex(t, c, exp, "e3") {
		t.Error("a record overwritten without Expires is still in the expiry index")
	}
	if ttl, err := c.PTTL(ctx, prefix+"rec:evt:e3").Result(); err != nil || ttl != -1 {
		t.Errorf("PTTL of a record overwritten without Expires = %v, %v; want -1 (none)", ttl, err)
	}
}

// TestRecordsUnavailable checks that an unreachable Redis fails every
// Records call with store.ErrUnavailable, and that invalid input fails
// without contacting Redis.
func TestRecordsUnavailable(t *testing.T) {
	var dials atomic.Int64
	s := openStore(t, Options{URL: "redis://127.0.0.1:1", dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return nil, errors.New("connection refused")
	}})
	ctx := context.Background()
	if _, err := s.PutRecord(ctx, store.Record{Kind: "a:b", ID: "x"}, false); err == nil || errors.Is(err, store.ErrUnavailable) {
		t.Errorf("PutRecord with an invalid kind: %v, want a validation error", err)
	}
	if _, err := s.TryLease(ctx, "l", "h", 0); err == nil || errors.Is(err, store.ErrUnavailable) {
		t.Errorf("TryLease with ttl 0: %v, want a validation error", err)
	}
	if dials.Load() != 0 {
		t.Fatalf("invalid input caused %d dials", dials.Load())
	}
	for name, err := range map[string]error{
		"PutRecord": func() error {
			_, err := s.PutRecord(ctx, store.Record{Kind: "k", ID: "x"}, true)
			return err
		}(),
		"GetRecord": func() error {
			_, err := s.GetRecord(ctx, "k", "x")
			return err
		}(),
		"ListRecords": func() error {
			_, err := s.ListRecords(ctx, "k", "")
			return err
		}(),
		"DeleteRecord": s.DeleteRecord(ctx, "k", "x"),
		"TryLease": func() error {
			_, err := s.TryLease(ctx, "l", "h", time.Second)
			return err
		}(),
		"ReleaseLease": s.ReleaseLease(ctx, "l", "h"),
	} {
		if !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("%s with Redis unreachable: %v, want ErrUnavailable", name, err)
		}
	}
}

func TestLexRange(t *testing.T) {
	for _, tc := range []struct{ prefix, min, max string }{
		{"", "-", "+"},
		{"inv_", "[inv_", "(inv`"},
		{"a\xff", "[a\xff", "(b"},
		{"\xff\xff", "[\xff\xff", "+"},
	} {
		r := lexRange(tc.prefix)
		if r.Min != tc.min || r.Max != tc.max {
			t.Errorf("lexRange(%q) = %q, %q; want %q, %q", tc.prefix, r.Min, r.Max, tc.min, tc.max)
		}
	}
}

// TestRecordExpiryByCallerClock checks that a record whose Expires has
// passed by the caller's clock is expired even while Redis still holds its
// hash (its PEXPIRE ends a little later, or the clocks differ): reads skip
// it and an onlyIfAbsent put replaces it.
func TestRecordExpiryByCallerClock(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix, OpTimeout: recordsTimeout})
	ctx := t.Context()
	if _, err := s.PutRecord(ctx, store.Record{Kind: "evt", ID: "e1", Data: []byte("old"), Expires: time.Now().Add(time.Hour)}, true); err != nil {
		t.Fatal(err)
	}
	// Expires a second ago by the caller's clock; Redis keeps the hash.
	past := strconv.FormatInt(time.Now().Add(-time.Second).UnixMicro(), 10)
	if err := c.HSet(ctx, prefix+"rec:evt:e1", "x", past).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.GetRecord(ctx, "evt", "e1"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetRecord of a record expired by the caller's clock: %v, want ErrNotFound", err)
	}
	if list, err := s.ListRecords(ctx, "evt", ""); err != nil || len(list) != 0 {
		t.Errorf("ListRecords = %v, %v; want none", list, err)
	}
	if ok, err := s.PutRecord(ctx, store.Record{Kind: "evt", ID: "e1", Data: []byte("new")}, true); err != nil || !ok {
		t.Errorf("onlyIfAbsent PutRecord over a record expired by the caller's clock = %v, %v; want true", ok, err)
	}
	if r, err := s.GetRecord(ctx, "evt", "e1"); err != nil || string(r.Data) != "new" {
		t.Errorf("GetRecord after the put = %q, %v; want new", r.Data, err)
	}
}
