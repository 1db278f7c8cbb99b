package storetest

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// RunRecords runs the contract suite of store.Records. open must return a
// fresh, empty store that also implements store.Records, and register its
// cleanup; it is called once per subtest.
//
// Besides the doc comments of store.Records, the suite pins these
// decisions, so that both stores behave alike:
//
//   - PutRecord, GetRecord and DeleteRecord reject an empty Kind, an empty
//     ID and a Kind containing ':' (ListRecords such a Kind) with an error
//     that is not ErrNotFound; TryLease rejects an empty name or holder and a ttl that is not
//     positive.
//   - A record put with an Expires that has passed is stored as expired:
//     it replaces (and so removes) an existing record, and PutRecord
//     returns true, unless onlyIfAbsent finds an unexpired record.
//   - Expires values the suite gives are whole milliseconds and compared
//     with time.Time.Equal, so a store may keep Expires at any precision
//     down to the millisecond.
//   - Expiry is judged by the caller's clock: a record read before its
//     Expires is returned, and once a read has found it expired, an
//     onlyIfAbsent put succeeds.
func RunRecords(t *testing.T, open func(t *testing.T) store.Store) {
	rec := func(t *testing.T) store.Records { return records(t, open(t)) }
	t.Run("PutGetList", func(t *testing.T) { testRecordsPutGetList(t, rec(t)) })
	t.Run("Invalid", func(t *testing.T) { testRecordsInvalid(t, rec(t)) })
	t.Run("OnlyIfAbsent", func(t *testing.T) { testRecordsOnlyIfAbsent(t, rec(t)) })
	t.Run("OnlyIfAbsentConcurrent", func(t *testing.T) {
		r := rec(t)
		onlyIfAbsentRace(t, []store.Records{r})
	})
	t.Run("Overwrite", func(t *testing.T) { testRecordsOverwrite(t, rec(t)) })
	t.Run("Delete", func(t *testing.T) { testRecordsDelete(t, rec(t)) })
	t.Run("ExpiredInThePast", func(t *testing.T) { testRecordsExpiredPast(t, rec(t)) })
	t.Run("ExpiresLater", func(t *testing.T) { testRecordsExpiresLater(t, rec(t)) })
	t.Run("KindsIndependent", func(t *testing.T) { testRecordsKinds(t, rec(t)) })
	t.Run("LeaseExclusive", func(t *testing.T) {
		r := rec(t)
		leaseExclusive(t, r, r)
	})
	t.Run("LeaseInvalid", func(t *testing.T) { testLeaseInvalid(t, rec(t)) })
	t.Run("LeaseExpires", func(t *testing.T) { testLeaseExpires(t, rec(t)) })
	t.Run("LeaseRenewExtends", func(t *testing.T) { testLeaseRenew(t, rec(t)) })
	t.Run("LeaseConcurrent", func(t *testing.T) {
		r := rec(t)
		leaseRace(t, []store.Records{r})
	})
	t.Run("LeaseNamesIndependent", func(t *testing.T) { testLeaseNames(t, rec(t)) })
}

// RunRecordsShared runs the store.Records checks for stores shared by
// several instances. open must return two handles on one fresh, empty
// shared store (as two Caddy instances, or the old and new app of a reload,
// would hold) and register cleanup for both.
func RunRecordsShared(t *testing.T, open func(t *testing.T) (a, b store.Store)) {
	pair := func(t *testing.T) (store.Records, store.Records) {
		a, b := open(t)
		return records(t, a), records(t, b)
	}
	t.Run("WritesVisible", func(t *testing.T) {
		a, b := pair(t)
		r := record("doc", "x1", "one", time.Time{})
		mustPutRecord(t, a, r, false)
		checkRecord(t, "GetRecord via b after PutRecord via a", mustGetRecord(t, b, "doc", "x1"), r)
		checkList(t, b, "doc", "", "x1")
		if ok := mustPutRecord(t, b, record("doc", "x1", "two", time.Time{}), true); ok {
			t.Error("onlyIfAbsent PutRecord via b over a record put via a returned true")
		}
		if err := b.DeleteRecord(t.Context(), "doc", "x1"); err != nil {
			t.Fatalf("DeleteRecord via b: %v", err)
		}
		wantNoRecord(t, a, "doc", "x1")
	})
	t.Run("OnlyIfAbsentConcurrent", func(t *testing.T) {
		a, b := pair(t)
		onlyIfAbsentRace(t, []store.Records{a, b})
	})
	t.Run("LeaseExclusive", func(t *testing.T) {
		a, b := pair(t)
		leaseExclusive(t, a, b)
	})
	t.Run("LeaseConcurrent", func(t *testing.T) {
		a, b := pair(t)
		leaseRace(t, []store.Records{a, b})
	})
}

// records returns s as a store.Records or fails the test.
func records(t *testing.T, s store.Store) store.Records {
	t.Helper()
	r, ok := s.(store.Records)
	if !ok {
		t.Fatalf("%T does not implement store.Records", s)
	}
	return r
}

func record(kind, id, data string, expires time.Time) store.Record {
	return store.Record{Kind: kind, ID: id, Data: []byte(data), Expires: expires}
}

func mustPutRecord(t *testing.T, r store.Records, rec store.Record, onlyIfAbsent bool) bool {
	t.Helper()
	ok, err := r.PutRecord(t.Context(), rec, onlyIfAbsent)
	if err != nil {
		t.Fatalf("PutRecord(%s/%s, onlyIfAbsent %v): %v", rec.Kind, rec.ID, onlyIfAbsent, err)
	}
	return ok
}

func mustGetRecord(t *testing.T, r store.Records, kind, id string) store.Record {
	t.Helper()
	got, err := r.GetRecord(t.Context(), kind, id)
	if err != nil {
		t.Fatalf("GetRecord(%s/%s): %v", kind, id, err)
	}
	return got
}

func wantNoRecord(t *testing.T, r store.Records, kind, id string) {
	t.Helper()
	got, err := r.GetRecord(t.Context(), kind, id)
	if !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetRecord(%s/%s) = %+v, %v; want ErrNotFound", kind, id, got, err)
	}
}

func checkRecord(t *testing.T, what string, got, want store.Record) {
	t.Helper()
	if got.Kind != want.Kind || got.ID != want.ID || !bytes.Equal(got.Data, want.Data) || !got.Expires.Equal(want.Expires) {
		t.Errorf("%s = {%s %s %q %v}, want {%s %s %q %v}", what,
			got.Kind, got.ID, got.Data, got.Expires, want.Kind, want.ID, want.Data, want.Expires)
	}
}

// checkList lists kind by prefix and checks the IDs, in order, and that
// every listed record has the kind and ID it is listed under.
func checkList(t *testing.T, r store.Records, kind, prefix string, ids ...string) []store.Record {
	t.Helper()
	list, err := r.ListRecords(t.Context(), kind, prefix)
	if err != nil {
		t.Fatalf("ListRecords(%s, %q): %v", kind, prefix, err)
	}
	got := make([]string, 0, len(list))
	for _, rec := range list {
		if rec.Kind != kind {
			t.Errorf("ListRecords(%s, %q) returned a record of kind %q", kind, prefix, rec.Kind)
		}
		got = append(got, rec.ID)
	}
	if ids == nil {
		ids = []string{}
	}
	if !slices.Equal(got, ids) {
		t.Errorf("ListRecords(%s, %q) IDs = %q, want %q", kind, prefix, got, ids)
	}
	return list
}

func testRecordsPutGetList(t *testing.T, r store.Records) {
	later := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	put := []store.Record{
		record("doc", "inv_2", "two", time.Time{}),
		record("doc", "inv_10", "ten", later),
		record("doc", "a", "", time.Time{}),
		{Kind: "doc", ID: "bin", Data: []byte{0, 1, 0xff, '\n', ':'}},
		record("doc", "inv_1", `{"json":true}`, time.Time{}),
		record("doc", "inv", "bare prefix", time.Time{}),
		record("doc", "inw", "after the prefix", time.Time{}),
		record("doc", "inv_\xff", "high byte", time.Time{}),
	}
	for _, rec := range put {
		if !mustPutRecord(t, r, rec, false) {
			t.Fatalf("PutRecord(%s/%s) returned false without onlyIfAbsent", rec.Kind, rec.ID)
		}
	}
	for _, rec := range put {
		checkRecord(t, "GetRecord", mustGetRecord(t, r, rec.Kind, rec.ID), rec)
	}
	wantNoRecord(t, r, "doc", "missing")
	wantNoRecord(t, r, "nodoc", "a")

	list := checkList(t, r, "doc", "inv_", "inv_1", "inv_10", "inv_2", "inv_\xff")
	for _, got := range list {
		i := slices.IndexFunc(put, func(p store.Record) bool { return p.ID == got.ID })
		checkRecord(t, "listed record", got, put[i])
	}
	checkList(t, r, "doc", "", "a", "bin", "inv", "inv_1", "inv_10", "inv_2", "inv_\xff", "inw")
	checkList(t, r, "doc", "inv", "inv", "inv_1", "inv_10", "inv_2", "inv_\xff")
	checkList(t, r, "doc", "zzz")
	checkList(t, r, "nodoc", "")
}

func testRecordsInvalid(t *testing.T, r store.Records) {
	for _, rec := range []store.Record{
		record("", "id", "x", time.Time{}),
		record("doc", "", "x", time.Time{}),
		record("a:b", "id", "x", time.Time{}),
	} {
		if _, err := r.PutRecord(t.Context(), rec, false); err == nil {
			t.Errorf("PutRecord(kind %q, id %q) succeeded, want an error", rec.Kind, rec.ID)
		}
		if _, err := r.GetRecord(t.Context(), rec.Kind, rec.ID); err == nil || errors.Is(err, store.ErrNotFound) {
			t.Errorf("GetRecord(kind %q, id %q) error = %v, want a validation error", rec.Kind, rec.ID, err)
		}
		if err := r.DeleteRecord(t.Context(), rec.Kind, rec.ID); err == nil {
			t.Errorf("DeleteRecord(kind %q, id %q) succeeded, want an error", rec.Kind, rec.ID)
		}
	}
	// A kind with ':' must not reach another kind's records.
	kept := record("a", "b:c", "x", time.Time{})
	mustPutRecord(t, r, kept, false)
	if _, err := r.GetRecord(t.Context(), "a:b", "c"); err == nil {
		t.Error("GetRecord(a:b, c) succeeded")
	}
	if err := r.DeleteRecord(t.Context(), "a:b", "c"); err == nil {
		t.Error("DeleteRecord(a:b, c) succeeded")
	}
	for _, kind := range []string{"", "a:b"} {
		if _, err := r.ListRecords(t.Context(), kind, ""); err == nil {
			t.Errorf("ListRecords(kind %q) succeeded, want an error", kind)
		}
	}
	checkRecord(t, "GetRecord(a, b:c)", mustGetRecord(t, r, "a", "b:c"), kept)
}

func testRecordsOnlyIfAbsent(t *testing.T, r store.Records) {
	first := record("sent", "inv_1", "first", time.Time{})
	if !mustPutRecord(t, r, first, true) {
		t.Fatal("onlyIfAbsent PutRecord of a new record returned false")
	}
	if mustPutRecord(t, r, record("sent", "inv_1", "second", time.Time{}), true) {
		t.Error("second onlyIfAbsent PutRecord of one id returned true")
	}
	checkRecord(t, "GetRecord after a refused put", mustGetRecord(t, r, "sent", "inv_1"), first)
}

// onlyIfAbsentRace puts one id 50 times concurrently with onlyIfAbsent,
// spread over handles: exactly one put wins, and its data is stored.
func onlyIfAbsentRace(t *testing.T, handles []store.Records) {
	const n = 50
	wins := make([]bool, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			ok, err := handles[i%len(handles)].PutRecord(t.Context(), record("event", "evt_1", fmt.Sprint("put-", i), time.Time{}), true)
			if err != nil {
				t.Errorf("PutRecord: %v", err)
			}
			wins[i] = ok
		})
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, ok := range wins {
		if !ok {
			continue
		}
		if winner >= 0 {
			t.Fatalf("puts %d and %d both won onlyIfAbsent on one id", winner, i)
		}
		winner = i
	}
	if winner < 0 {
		t.Fatalf("none of %d onlyIfAbsent puts of a new id won", n)
	}
	for i, h := range handles {
		got := mustGetRecord(t, h, "event", "evt_1")
		if string(got.Data) != fmt.Sprint("put-", winner) {
			t.Errorf("record via handle %d holds %q, want the winner's %q", i, got.Data, fmt.Sprint("put-", winner))
		}
	}
}

func testRecordsOverwrite(t *testing.T, r store.Records) {
	later := time.Now().Add(time.Hour).Truncate(time.Millisecond)
	mustPutRecord(t, r, record("note", "n1", "old", later), false)
	updated := record("note", "n1", "new", time.Time{})
	if !mustPutRecord(t, r, updated, false) {
		t.Fatal("PutRecord over an existing record without onlyIfAbsent returned false")
	}
	checkRecord(t, "GetRecord after overwrite", mustGetRecord(t, r, "note", "n1"), updated)
	again := record("note", "n1", "newer", later.Add(time.Hour))
	mustPutRecord(t, r, again, false)
	checkRecord(t, "GetRecord after second overwrite", mustGetRecord(t, r, "note", "n1"), again)
	list := checkList(t, r, "note", "", "n1")
	checkRecord(t, "listed record after overwrite", list[0], again)
}

func testRecordsDelete(t *testing.T, r store.Records) {
	mustPutRecord(t, r, record("note", "n1", "one", time.Time{}), false)
	mustPutRecord(t, r, record("note", "n2", "two", time.Time{}), false)
	if err := r.DeleteRecord(t.Context(), "note", "n1"); err != nil {
		t.Fatalf("DeleteRecord: %v", err)
	}
	wantNoRecord(t, r, "note", "n1")
	checkList(t, r, "note", "", "n2")
	if err := r.DeleteRecord(t.Context(), "note", "n1"); err != nil {
		t.Errorf("DeleteRecord of a deleted record: %v", err)
	}
	if err := r.DeleteRecord(t.Context(), "never", "x"); err != nil {
		t.Errorf("DeleteRecord of a record never stored: %v", err)
	}
	if !mustPutRecord(t, r, record("note", "n1", "again", time.Time{}), true) {
		t.Error("onlyIfAbsent PutRecord after DeleteRecord returned false")
	}
}

func testRecordsExpiredPast(t *testing.T, r store.Records) {
	past := time.Now().Add(-time.Minute)
	// A new record that has already expired.
	if !mustPutRecord(t, r, record("mark", "old", "x", past), false) {
		t.Error("PutRecord of an expired record returned false")
	}
	wantNoRecord(t, r, "mark", "old")
	// An expired record replacing a live one.
	mustPutRecord(t, r, record("mark", "live", "x", time.Time{}), false)
	mustPutRecord(t, r, record("mark", "live", "y", past), false)
	wantNoRecord(t, r, "mark", "live")
	checkList(t, r, "mark", "")
	// An expired record refused by onlyIfAbsent over a live one.
	kept := record("mark", "kept", "x", time.Time{})
	mustPutRecord(t, r, kept, false)
	if mustPutRecord(t, r, record("mark", "kept", "y", past), true) {
		t.Error("onlyIfAbsent PutRecord over a live record returned true")
	}
	checkRecord(t, "GetRecord after a refused expired put", mustGetRecord(t, r, "mark", "kept"), kept)
	// Puts over expired records.
	fresh := record("mark", "old", "fresh", time.Time{})
	if !mustPutRecord(t, r, fresh, true) {
		t.Error("onlyIfAbsent PutRecord over an expired record returned false")
	}
	checkRecord(t, "GetRecord after a put over an expired record", mustGetRecord(t, r, "mark", "old"), fresh)
	checkList(t, r, "mark", "", "kept", "old")
}

func testRecordsExpiresLater(t *testing.T, r store.Records) {
	const ttl = 300 * time.Millisecond
	stay := record("mark", "stay", "x", time.Now().Add(time.Hour).Truncate(time.Millisecond))
	mustPutRecord(t, r, stay, false)
	soon := record("mark", "soon", "x", time.Now().Add(ttl).Truncate(time.Millisecond))
	mustPutRecord(t, r, soon, false)

	// Before Expires the record is there; this is only checked when the
	// read ended before Expires, so a slow machine does not fail it.
	got, err := r.GetRecord(t.Context(), "mark", "soon")
	if time.Now().Before(soon.Expires) {
		if err != nil {
			t.Fatalf("GetRecord before Expires: %v", err)
		}
		checkRecord(t, "GetRecord before Expires", got, soon)
	}
	list, err := r.ListRecords(t.Context(), "mark", "")
	if time.Now().Before(soon.Expires) && (err != nil || len(list) != 2) {
		t.Fatalf("ListRecords before Expires = %d records, %v; want 2", len(list), err)
	}

	deadline := time.Now().Add(Timeout)
	for {
		_, err := r.GetRecord(t.Context(), "mark", "soon")
		if errors.Is(err, store.ErrNotFound) {
			break
		}
		if err != nil {
			t.Fatalf("GetRecord: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("record still returned %v after its Expires", Timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if time.Now().Before(soon.Expires) {
		t.Fatal("GetRecord returned ErrNotFound before the record's Expires")
	}
	checkList(t, r, "mark", "", "stay")
	if !mustPutRecord(t, r, record("mark", "soon", "new", time.Time{}), true) {
		t.Error("onlyIfAbsent PutRecord over an expired record returned false")
	}
	checkList(t, r, "mark", "", "soon", "stay")
}

func testRecordsKinds(t *testing.T, r store.Records) {
	a := record("k", "id", "in k", time.Time{})
	b := record("kk", "id", "in kk", time.Time{})
	mustPutRecord(t, r, a, true)
	if !mustPutRecord(t, r, b, true) {
		t.Fatal("onlyIfAbsent PutRecord in kind kk refused because kind k has the id")
	}
	checkRecord(t, "GetRecord(k)", mustGetRecord(t, r, "k", "id"), a)
	checkRecord(t, "GetRecord(kk)", mustGetRecord(t, r, "kk", "id"), b)
	checkList(t, r, "k", "", "id")
	checkList(t, r, "kk", "", "id")
	if err := r.DeleteRecord(t.Context(), "k", "id"); err != nil {
		t.Fatalf("DeleteRecord: %v", err)
	}
	wantNoRecord(t, r, "k", "id")
	checkRecord(t, "GetRecord(kk) after deleting k/id", mustGetRecord(t, r, "kk", "id"), b)
}

func mustLease(t *testing.T, r store.Records, name, holder string, ttl time.Duration) bool {
	t.Helper()
	ok, err := r.TryLease(t.Context(), name, holder, ttl)
	if err != nil {
		t.Fatalf("TryLease(%s, %s): %v", name, holder, err)
	}
	return ok
}

func mustRelease(t *testing.T, r store.Records, name, holder string) {
	t.Helper()
	if err := r.ReleaseLease(t.Context(), name, holder); err != nil {
		t.Fatalf("ReleaseLease(%s, %s): %v", name, holder, err)
	}
}

// leaseExclusive takes a lease through a and checks, through b, that other
// holders are excluded until it is released, and that a non-holder's
// release does nothing.
func leaseExclusive(t *testing.T, a, b store.Records) {
	if !mustLease(t, a, "reporter", "h1", time.Hour) {
		t.Fatal("TryLease of a free lease returned false")
	}
	if mustLease(t, b, "reporter", "h2", time.Hour) {
		t.Fatal("TryLease by h2 succeeded while h1 holds the lease")
	}
	if !mustLease(t, a, "reporter", "h1", time.Hour) {
		t.Fatal("TryLease by the holder (a renewal) returned false")
	}
	mustRelease(t, b, "reporter", "h2")
	if mustLease(t, b, "reporter", "h2", time.Hour) {
		t.Fatal("TryLease by h2 succeeded after h2, not the holder, released the lease")
	}
	mustRelease(t, a, "reporter", "h1")
	if !mustLease(t, b, "reporter", "h2", time.Hour) {
		t.Fatal("TryLease by h2 failed after the holder released the lease")
	}
	if mustLease(t, a, "reporter", "h1", time.Hour) {
		t.Fatal("TryLease by h1 succeeded while h2 holds the lease")
	}
	mustRelease(t, a, "never-taken", "h1")
}

func testLeaseInvalid(t *testing.T, r store.Records) {
	for _, tc := range []struct {
		name, holder string
		ttl          time.Duration
	}{{"", "h", time.Second}, {"n", "", time.Second}, {"n", "h", 0}, {"n", "h", -time.Second}} {
		if _, err := r.TryLease(t.Context(), tc.name, tc.holder, tc.ttl); err == nil {
			t.Errorf("TryLease(%q, %q, %v) succeeded, want an error", tc.name, tc.holder, tc.ttl)
		}
	}
	if !mustLease(t, r, "n", "h", time.Hour) {
		t.Error("TryLease failed after rejected calls")
	}
}

func testLeaseExpires(t *testing.T, r store.Records) {
	const ttl = 200 * time.Millisecond
	start := time.Now()
	if !mustLease(t, r, "sweeper", "h1", ttl) {
		t.Fatal("TryLease of a free lease returned false")
	}
	if mustLease(t, r, "sweeper", "h2", time.Hour) && time.Since(start) < ttl {
		t.Fatal("TryLease by h2 succeeded before the holder's ttl passed")
	}
	deadline := time.Now().Add(Timeout)
	for !mustLease(t, r, "sweeper", "h2", time.Hour) {
		if time.Now().After(deadline) {
			t.Fatalf("lease with ttl %v still held after %v", ttl, Timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if time.Since(start) < ttl {
		t.Fatal("TryLease by h2 succeeded before the holder's ttl passed")
	}
	if mustLease(t, r, "sweeper", "h1", time.Hour) {
		t.Error("TryLease by the expired holder succeeded while h2 holds the lease")
	}
}

func testLeaseRenew(t *testing.T, r store.Records) {
	const ttl = 300 * time.Millisecond
	if !mustLease(t, r, "notifier", "h1", ttl) {
		t.Fatal("TryLease of a free lease returned false")
	}
	// The first lease ends at the latest ttl after this instant.
	taken := time.Now()
	if !mustLease(t, r, "notifier", "h1", time.Hour) {
		t.Fatal("renewing TryLease by the holder returned false")
	}
	time.Sleep(time.Until(taken.Add(ttl + 50*time.Millisecond)))
	if mustLease(t, r, "notifier", "h2", time.Hour) {
		t.Error("TryLease by h2 succeeded after the first ttl although the holder renewed for an hour")
	}
}

// leaseRace has 20 holders, spread over handles, try one lease at once:
// exactly one wins.
func leaseRace(t *testing.T, handles []store.Records) {
	const n = 20
	var wins atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			ok, err := handles[i%len(handles)].TryLease(t.Context(), "race", fmt.Sprint("holder-", i), time.Hour)
			if err != nil {
				t.Errorf("TryLease: %v", err)
			}
			if ok {
				wins.Add(1)
			}
		})
	}
	close(start)
	wg.Wait()
	if got := wins.Load(); got != 1 {
		t.Errorf("%d of %d concurrent TryLease calls by different holders won, want exactly 1", got, n)
	}
}

func testLeaseNames(t *testing.T, r store.Records) {
	if !mustLease(t, r, "a", "h1", time.Hour) {
		t.Fatal("TryLease(a) returned false")
	}
	if !mustLease(t, r, "b", "h2", time.Hour) {
		t.Error("TryLease(b) by h2 refused because h1 holds lease a")
	}
	mustRelease(t, r, "b", "h1")
	if mustLease(t, r, "b", "h1", time.Hour) {
		t.Error("TryLease(b) by h1 succeeded while h2 holds it")
	}
}
