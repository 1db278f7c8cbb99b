package boltstore

import (
	"bytes"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

func TestRecordsContract(t *testing.T) {
	storetest.RunRecords(t, func(t *testing.T) store.Store {
		return openTemp(t, filepath.Join(t.TempDir(), "store.db"))
	})
}

// TestRecordsSharedStore runs the shared checks with both handles being one
// Store, as the old and new app of a reload hold it.
func TestRecordsSharedStore(t *testing.T) {
	storetest.RunRecordsShared(t, func(t *testing.T) (store.Store, store.Store) {
		s := openTemp(t, filepath.Join(t.TempDir(), "store.db"))
		return s, s
	})
}

// storedIDs returns the ids kept in the file for kind (expired or not) and
// the number of expiry index entries.
func storedIDs(t *testing.T, s *Store, kind string) (ids []string, indexed int) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		if b := kindBucket(tx, kind); b != nil {
			if err := b.ForEach(func(k, _ []byte) error {
				ids = append(ids, string(k))
				return nil
			}); err != nil {
				return err
			}
		}
		if e := tx.Bucket(bucketRecordExpiry); e != nil {
			indexed = e.Stats().KeyN
		}
		return nil
	})
	if err != nil {
		t.Fatalf("reading the file: %v", err)
	}
	return ids, indexed
}

// sleepPast waits until t has passed.
func sleepPast(t time.Time) { time.Sleep(time.Until(t) + time.Millisecond) }

// TestExpiredRecordsLeaveTheFile checks that expired records are removed
// from the file, not only hidden: by a later PutRecord (of any kind), and
// by a read that meets them.
func TestExpiredRecordsLeaveTheFile(t *testing.T) {
	s := openTemp(t, filepath.Join(t.TempDir(), "store.db"))
	ctx := t.Context()
	put := func(kind, id string, expires time.Time) {
		t.Helper()
		if _, err := s.PutRecord(ctx, store.Record{Kind: kind, ID: id, Data: []byte("x"), Expires: expires}, false); err != nil {
			t.Fatalf("PutRecord: %v", err)
		}
	}

	soon := time.Now().Add(50 * time.Millisecond)
	put("evt", "e1", soon)
	put("evt", "e2", soon)
	put("evt", "keep", time.Now().Add(time.Hour))
	put("evt", "forever", time.Time{})
	if ids, n := storedIDs(t, s, "evt"); len(ids) != 4 || n != 3 {
		t.Fatalf("before expiry: ids %q, %d index entries; want 4 ids, 3 entries", ids, n)
	}
	sleepPast(soon)
	put("other", "x", time.Time{})
	if ids, n := storedIDs(t, s, "evt"); !slices.Equal(ids, []string{"forever", "keep"}) || n != 1 {
		t.Errorf("after a write past expiry: ids %q, %d index entries; want [forever keep], 1 entry", ids, n)
	}

	soon = time.Now().Add(50 * time.Millisecond)
	put("evt", "e3", soon)
	sleepPast(soon)
	if _, err := s.GetRecord(ctx, "evt", "e3"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetRecord of an expired record: %v, want ErrNotFound", err)
	}
	if ids, n := storedIDs(t, s, "evt"); !slices.Equal(ids, []string{"forever", "keep"}) || n != 1 {
		t.Errorf("after reading an expired record: ids %q, %d index entries; want [forever keep], 1 entry", ids, n)
	}

	// An overwrite with a later expiry is not pruned at the old one.
	soon = time.Now().Add(50 * time.Millisecond)
	put("evt", "moved", soon)
	put("evt", "moved", time.Now().Add(time.Hour))
	sleepPast(soon)
	put("other", "y", time.Time{})
	if _, err := s.GetRecord(ctx, "evt", "moved"); err != nil {
		t.Errorf("record re-put with a later expiry: %v", err)
	}
}

// TestRecordsSurviveReopen checks that records and their expiries are
// durable, and that leases (in memory) are not.
func TestRecordsSurviveReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	r := store.Record{Kind: "sent", ID: "inv_1", Data: []byte(`{"n":1}`), Expires: time.Date(2999, 1, 2, 3, 4, 5, 6, time.UTC)}
	if _, err := s.PutRecord(ctx, r, true); err != nil {
		t.Fatalf("PutRecord: %v", err)
	}
	if ok, err := s.TryLease(ctx, "reporter", "old-process", time.Hour); err != nil || !ok {
		t.Fatalf("TryLease = %v, %v", ok, err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s = openTemp(t, path)
	got, err := s.GetRecord(ctx, "sent", "inv_1")
	if err != nil || string(got.Data) != string(r.Data) || !got.Expires.Equal(r.Expires) {
		t.Errorf("GetRecord after reopen = %+v, %v; want %+v", got, err, r)
	}
	if ok, err := s.PutRecord(ctx, r, true); err != nil || ok {
		t.Errorf("onlyIfAbsent PutRecord after reopen = %v, %v; want false", ok, err)
	}
	if ok, err := s.TryLease(ctx, "reporter", "new-process", time.Hour); err != nil || !ok {
		t.Errorf("TryLease after reopen = %v, %v; want true (leases end with the process)", ok, err)
	}
}

func TestExpiryKeyRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		exp      time.Time
		kind, id string
	}{
		{time.Unix(1, 2).UTC(), "k", "id"},
		{time.Date(1969, 12, 31, 23, 59, 59, 999999999, time.UTC), "a\x00b", "\x00"},
		{time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC), "stripe_sent", "cus_1:2026-11"},
	} {
		exp, kind, id, err := parseExpiryKey(expiryKey(tc.exp, tc.kind, tc.id))
		if err != nil || !exp.Equal(tc.exp) || kind != tc.kind || id != tc.id {
			t.Errorf("parseExpiryKey(expiryKey(%v, %q, %q)) = %v, %q, %q, %v", tc.exp, tc.kind, tc.id, exp, kind, id, err)
		}
	}
	if bytes.Compare(encodeTime(time.Unix(-1, 0)), encodeTime(time.Unix(0, 0))) >= 0 ||
		bytes.Compare(encodeTime(time.Unix(5, 1)), encodeTime(time.Unix(5, 2))) >= 0 {
		t.Error("encodeTime does not sort by time")
	}
}
