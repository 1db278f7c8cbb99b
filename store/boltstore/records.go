package boltstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Records (store.Records) on the embedded store.
//
// Buckets:
//
//	records         one nested bucket per kind: id -> value
//	record_expiry   expiry index: expiry(12) + uvarint(len(kind)) + kind + id -> empty
//
// A value is a flag byte (0: no expiry, 1: expiry), for an expiry the
// 12-byte expiry, then the data. An expiry is 8 bytes of Unix seconds
// (big-endian, sign bit flipped so that keys sort by time) and 4 bytes of
// nanoseconds.
//
// Expired records are never returned. They are removed lazily: every
// PutRecord removes up to pruneBatch expired records (oldest first) using
// the expiry index, and a read that finds expired records removes them.
//
// Leases live in memory, in the Store: bbolt's file lock keeps the file to
// one process, and the apps of a reload share the Store.
var (
	bucketRecords      = []byte("records")
	bucketRecordExpiry = []byte("record_expiry")
)

// pruneBatch bounds the expired records one PutRecord removes.
const pruneBatch = 64

var _ store.Records = (*Store)(nil)

// leaseTable holds the Store's leases. Its zero value is ready to use.
type leaseTable struct {
	mu     sync.Mutex
	leases map[string]lease
}

// lease is one held lease; until carries a monotonic reading.
type lease struct {
	holder string
	until  time.Time
}

// checkKind rejects the kinds redisstore rejects, so that both stores
// accept the same records.
func checkKind(kind string) error {
	switch {
	case kind == "":
		return errors.New("boltstore: empty record kind")
	case strings.Contains(kind, ":"):
		return fmt.Errorf("boltstore: record kind %q contains ':'", kind)
	}
	return nil
}

// checkRecordKey validates a record's kind and id.
func checkRecordKey(kind, id string) error {
	if id == "" {
		return errors.New("boltstore: empty record id")
	}
	return checkKind(kind)
}

// PutRecord implements store.Records.
func (s *Store) PutRecord(_ context.Context, r store.Record, onlyIfAbsent bool) (bool, error) {
	if err := checkRecordKey(r.Kind, r.ID); err != nil {
		return false, err
	}
	stored := true
	err := s.update(func(tx *bolt.Tx) error {
		t := time.Now()
		if err := pruneRecords(tx, t, pruneBatch); err != nil {
			return err
		}
		kinds, err := tx.CreateBucketIfNotExists(bucketRecords)
		if err != nil {
			return err
		}
		b, err := kinds.CreateBucketIfNotExists([]byte(r.Kind))
		if err != nil {
			return err
		}
		expiry := tx.Bucket(bucketRecordExpiry) // created by pruneRecords
		id := []byte(r.ID)
		if old := b.Get(id); old != nil {
			oldExp, _, err := decodeRecordValue(old)
			if err != nil {
				return decodeErr("record", r.Kind+"/"+r.ID, err)
			}
			if onlyIfAbsent && !expired(oldExp, t) {
				stored = false
				return nil
			}
			if !oldExp.IsZero() {
				if err := expiry.Delete(expiryKey(oldExp, r.Kind, r.ID)); err != nil {
					return err
				}
			}
		}
		if expired(r.Expires, t) {
			return b.Delete(id)
		}
		if !r.Expires.IsZero() {
			if err := expiry.Put(expiryKey(r.Expires, r.Kind, r.ID), []byte{}); err != nil {
				return err
			}
		}
		return b.Put(id, encodeRecordValue(r.Expires, r.Data))
	})
	if err != nil {
		return false, err
	}
	return stored, nil
}

// GetRecord implements store.Records.
func (s *Store) GetRecord(_ context.Context, kind, id string) (store.Record, error) {
	if err := checkRecordKey(kind, id); err != nil {
		return store.Record{}, err
	}
	var r store.Record
	found, stale := false, false
	err := s.view(func(tx *bolt.Tx) error {
		b := kindBucket(tx, kind)
		if b == nil {
			return nil
		}
		v := b.Get([]byte(id))
		if v == nil {
			return nil
		}
		exp, data, err := decodeRecordValue(v)
		if err != nil {
			return decodeErr("record", kind+"/"+id, err)
		}
		if expired(exp, time.Now()) {
			stale = true
			return nil
		}
		found = true
		r = store.Record{Kind: kind, ID: id, Data: bytes.Clone(data), Expires: exp}
		return nil
	})
	if err != nil {
		return store.Record{}, err
	}
	if stale {
		s.pruneExpired()
	}
	if !found {
		return store.Record{}, fmt.Errorf("boltstore: record %s/%s: %w", kind, id, store.ErrNotFound)
	}
	return r, nil
}

// ListRecords implements store.Records.
func (s *Store) ListRecords(_ context.Context, kind, prefix string) ([]store.Record, error) {
	if err := checkKind(kind); err != nil {
		return nil, err
	}
	list := []store.Record{}
	stale := false
	err := s.view(func(tx *bolt.Tx) error {
		b := kindBucket(tx, kind)
		if b == nil {
			return nil
		}
		t := time.Now()
		p := []byte(prefix)
		c := b.Cursor()
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			exp, data, err := decodeRecordValue(v)
			if err != nil {
				return decodeErr("record", kind+"/"+string(k), err)
			}
			if expired(exp, t) {
				stale = true
				continue
			}
			list = append(list, store.Record{Kind: kind, ID: string(k), Data: bytes.Clone(data), Expires: exp})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if stale {
		s.pruneExpired()
	}
	return list, nil
}

// DeleteRecord implements store.Records.
func (s *Store) DeleteRecord(_ context.Context, kind, id string) error {
	if err := checkRecordKey(kind, id); err != nil {
		return err
	}
	return s.update(func(tx *bolt.Tx) error {
		b := kindBucket(tx, kind)
		if b == nil {
			return nil
		}
		v := b.Get([]byte(id))
		if v == nil {
			return nil
		}
		if exp, _, err := decodeRecordValue(v); err == nil && !exp.IsZero() {
			if e := tx.Bucket(bucketRecordExpiry); e != nil {
				if err := e.Delete(expiryKey(exp, kind, id)); err != nil {
					return err
				}
			}
		}
		return b.Delete([]byte(id))
	})
}

// pruneExpired removes expired records after a read found some. A failure
// only delays the removal: expired records are never returned anyway.
func (s *Store) pruneExpired() {
	_ = s.update(func(tx *bolt.Tx) error { return pruneRecords(tx, time.Now(), -1) })
}

// pruneRecords removes up to limit (all when negative) records that expired
// before t, oldest first.
func pruneRecords(tx *bolt.Tx, t time.Time, limit int) error {
	expiry, err := tx.CreateBucketIfNotExists(bucketRecordExpiry)
	if err != nil {
		return err
	}
	kinds := tx.Bucket(bucketRecords)
	limitKey := encodeTime(t)
	c := expiry.Cursor()
	for k, _ := c.First(); k != nil && limit != 0; k, _ = c.First() {
		exp, kind, id, err := parseExpiryKey(k)
		if err != nil {
			return decodeErr("record expiry index entry", fmt.Sprintf("%x", k), err)
		}
		if bytes.Compare(k[:12], limitKey) > 0 {
			return nil // the oldest remaining entry has not expired
		}
		if err := c.Delete(); err != nil {
			return err
		}
		limit--
		if kinds == nil {
			continue
		}
		b := kinds.Bucket([]byte(kind))
		if b == nil {
			continue
		}
		// The record may have been replaced by one with another expiry
		// (whose index entry is then elsewhere).
		if v := b.Get([]byte(id)); v != nil {
			if cur, _, err := decodeRecordValue(v); err == nil && cur.Equal(exp) {
				if err := b.Delete([]byte(id)); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func kindBucket(tx *bolt.Tx, kind string) *bolt.Bucket {
	kinds := tx.Bucket(bucketRecords)
	if kinds == nil {
		return nil
	}
	return kinds.Bucket([]byte(kind))
}

// expired reports whether a record with expiry exp has expired at t.
func expired(exp, t time.Time) bool { return !exp.IsZero() && !t.Before(exp) }

// encodeTime is the 12-byte sortable form of t.
func encodeTime(t time.Time) []byte {
	b := make([]byte, 12)
	binary.BigEndian.PutUint64(b, uint64(t.Unix())^(1<<63))
	binary.BigEndian.PutUint32(b[8:], uint32(t.Nanosecond()))
	return b
}

func decodeTime(b []byte) time.Time {
	sec := int64(binary.BigEndian.Uint64(b) ^ (1 << 63))
	return time.Unix(sec, int64(binary.BigEndian.Uint32(b[8:]))).UTC()
}

func encodeRecordValue(exp time.Time, data []byte) []byte {
	if exp.IsZero() {
		return append([]byte{0}, data...)
	}
	v := make([]byte, 0, 13+len(data))
	v = append(v, 1)
	v = append(v, encodeTime(exp)...)
	return append(v, data...)
}

func decodeRecordValue(v []byte) (exp time.Time, data []byte, err error) {
	switch {
	case len(v) >= 1 && v[0] == 0:
		return time.Time{}, v[1:], nil
	case len(v) >= 13 && v[0] == 1:
		return decodeTime(v[1:13]), v[13:], nil
	}
	return time.Time{}, nil, errors.New("bad record value header")
}

func expiryKey(exp time.Time, kind, id string) []byte {
	k := make([]byte, 0, 12+binary.MaxVarintLen64+len(kind)+len(id))
	k = append(k, encodeTime(exp)...)
	k = binary.AppendUvarint(k, uint64(len(kind)))
	k = append(k, kind...)
	return append(k, id...)
}

func parseExpiryKey(k []byte) (exp time.Time, kind, id string, err error) {
	if len(k) < 13 {
		return time.Time{}, "", "", errors.New("short key")
	}
	n, w := binary.Uvarint(k[12:])
	rest := k[12+max(w, 0):]
	if w <= 0 || n > uint64(len(rest)) {
		return time.Time{}, "", "", errors.New("bad kind length")
	}
	return decodeTime(k[:12]), string(rest[:n]), string(rest[n:]), nil
}

// TryLease implements store.Records. Leases are kept in memory.
func (s *Store) TryLease(_ context.Context, name, holder string, ttl time.Duration) (bool, error) {
	if name == "" || holder == "" || ttl <= 0 {
		return false, fmt.Errorf("boltstore: lease needs a name, a holder and a positive ttl (got %q, %q, %v)", name, holder, ttl)
	}
	l := &s.leases
	l.mu.Lock()
	defer l.mu.Unlock()
	t := time.Now()
	if cur, ok := l.leases[name]; ok && cur.holder != holder && t.Before(cur.until) {
		return false, nil
	}
	if l.leases == nil {
		l.leases = make(map[string]lease)
	}
	for n, cur := range l.leases {
		if !t.Before(cur.until) {
			delete(l.leases, n)
		}
	}
	l.leases[name] = lease{holder: holder, until: t.Add(ttl)}
	return true, nil
}

// ReleaseLease implements store.Records.
func (s *Store) ReleaseLease(_ context.Context, name, holder string) error {
	l := &s.leases
	l.mu.Lock()
	defer l.mu.Unlock()
	if cur, ok := l.leases[name]; ok && cur.holder == holder {
		delete(l.leases, name)
	}
	return nil
}
