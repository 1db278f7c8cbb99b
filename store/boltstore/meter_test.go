package boltstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

func TestMeterContract(t *testing.T) {
	storetest.RunMeter(t, func(t *testing.T) store.Store {
		return openTemp(t, filepath.Join(t.TempDir(), "store.db"))
	})
}

// withClock makes the store's metering use clock instead of time.Now.
func withClock(clock func() time.Time) Option {
	return func(o *options) { o.clock = clock }
}

// fakeClock is a settable clock, safe for concurrent use.
type fakeClock struct{ us atomic.Int64 }

func newFakeClock(t time.Time) *fakeClock {
	c := &fakeClock{}
	c.us.Store(t.UnixMicro())
	return c
}

func (c *fakeClock) now() time.Time          { return time.UnixMicro(c.us.Load()) }
func (c *fakeClock) advance(d time.Duration) { c.us.Add(d.Microseconds()) }

// noFlush is a flush interval long enough that no background checkpoint
// runs during a test: checkpoints happen when the test says so.
var noFlush = WithFlushInterval(time.Hour)

// writeLog has the write-ahead log appended to with write(2), as where
// segments cannot be mapped into memory.
var writeLog Option = func(o *options) { o.segmentSize = 0 }

// thisMonth is a quota of the current calendar month (UTC) in bill mode
// with 100 included units and thresholds 80, 100 and 120, counted in the
// month's first hour.
func thisMonth() store.Quota {
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	return store.Quota{
		PeriodID:   p.ID(),
		PeriodEnd:  p.End,
		HourID:     metering.TimeID(p.Start),
		Included:   100,
		Mode:       store.QuotaBill,
		Thresholds: []int{80, 100, 120},
	}
}

func mustReserve(t testing.TB, s *Store, r store.Reservation) store.Reserved {
	t.Helper()
	out, err := s.Reserve(context.Background(), r)
	if err != nil {
		t.Fatalf("Reserve(%+v): %v", r, err)
	}
	return out
}

func mustUsage(t testing.TB, s *Store, subject string, q store.Quota) store.PeriodUsage {
	t.Helper()
	u, err := s.Usage(context.Background(), subject, q.PeriodID)
	if err != nil {
		t.Fatalf("Usage(%s): %v", subject, err)
	}
	return u
}

func mustEvents(t testing.TB, s *Store, subject string) []store.ThresholdEvent {
	t.Helper()
	evs, err := s.ThresholdEvents(context.Background(), subject)
	if err != nil {
		t.Fatalf("ThresholdEvents: %v", err)
	}
	return evs
}

// segments lists the store file's write-ahead log segments.
func segments(t testing.TB, path string) []uint64 {
	t.Helper()
	ids, err := listSegments(path)
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// copyStore copies the store file and its log segments from the directory
// of src into dir, as a process killed at this moment would leave them,
// and returns the copy's path. No checkpoint may run meanwhile.
func copyStore(t *testing.T, src, dir string) string {
	t.Helper()
	dst := filepath.Join(dir, filepath.Base(src))
	copyFile(t, src, dst)
	for _, id := range segments(t, src) {
		copyFile(t, segmentPath(src, id), segmentPath(dst, id))
	}
	return dst
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// state is everything a user sees of one subject's period.
type state struct {
	usage  store.PeriodUsage
	events []store.ThresholdEvent
}

func stateOf(t testing.TB, s *Store, subject string, q store.Quota) state {
	t.Helper()
	return state{mustUsage(t, s, subject, q), mustEvents(t, s, subject)}
}

func (a state) equal(b state) bool {
	return a.usage.Counters == b.usage.Counters && slices.Equal(a.usage.Hours, b.usage.Hours) &&
		slices.Equal(a.usage.Thresholds, b.usage.Thresholds) &&
		slices.EqualFunc(a.events, b.events, func(x, y store.ThresholdEvent) bool {
			return x.ID == y.ID && x.Used == y.Used && x.Included == y.Included && x.At.Equal(y.At)
		})
}

// fillSome makes reservations in two hours, with an idempotency key, a
// release, an adjusted cost and a threshold crossed, and returns the
// reservation holding the key "k1".
func fillSome(t testing.TB, s *Store, q store.Quota) store.Reservation {
	t.Helper()
	keyed := store.Reservation{Subject: "acme", Cost: 30, Quota: q, IdempotencyKey: "k1", IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}
	mustReserve(t, s, keyed)
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 40, Quota: q})
	q2 := q
	q2.HourID = metering.TimeID(mustParseTimeID(t, q.HourID).Add(time.Hour))
	released := store.Reservation{Subject: "acme", Cost: 5, Quota: q2, IdempotencyKey: "k2", IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}
	out := mustReserve(t, s, released)
	if err := s.Settle(context.Background(), store.Settlement{Subject: "acme", Quota: q2, IdempotencyKey: "k2", IdempotencyFingerprint: "fp", Reserved: 5, Overage: out.Overage}); err != nil {
		t.Fatal(err)
	}
	adjusted := store.Reservation{Subject: "acme", Cost: 10, Quota: q2}
	out = mustReserve(t, s, adjusted)
	if err := s.Settle(context.Background(), store.Settlement{Subject: "acme", Quota: q2, Reserved: 10, Overage: out.Overage, Actual: 15}); err != nil {
		t.Fatal(err)
	}
	return keyed
}

func mustParseTimeID(t testing.TB, id string) time.Time {
	t.Helper()
	at, err := metering.ParseTimeID(id)
	if err != nil {
		t.Fatal(err)
	}
	return at
}

// wantFilled checks the state fillSome leaves.
func wantFilled(t testing.TB, st state) {
	t.Helper()
	if want := (store.Counters{Billed: 85, Requests: 3}); st.usage.Counters != want {
		t.Errorf("usage %+v, want %+v", st.usage.Counters, want)
	}
	if len(st.usage.Hours) != 2 || st.usage.Hours[0].Billed != 70 || st.usage.Hours[1].Billed != 15 {
		t.Errorf("hours %+v, want 70 then 15 units", st.usage.Hours)
	}
	if !slices.Equal(st.usage.Thresholds, []int{80}) || len(st.events) != 1 || st.events[0].Threshold != 80 || st.events[0].Used != 80 {
		t.Errorf("thresholds %v, events %+v; want 80 crossed once, at 80 units", st.usage.Thresholds, st.events)
	}
}

func TestMeterSurvivesCloseAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s, err := Open(path, noFlush)
	if err != nil {
		t.Fatal(err)
	}
	keyed := fillSome(t, s, q)
	before := stateOf(t, s, "acme", q)
	wantFilled(t, before)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if ids := segments(t, path); len(ids) != 0 {
		t.Errorf("log segments left after Close: %v; want none", ids)
	}
	s = openTemp(t, path)
	if after := stateOf(t, s, "acme", q); !after.equal(before) {
		t.Errorf("after reopen:\n got  %+v\n want %+v", after, before)
	}
	if out := mustReserve(t, s, keyed); !out.Duplicate {
		t.Errorf("retry of a key reserved before the restart: %+v; want a Duplicate", out)
	}
	if out := mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 5, Quota: q, IdempotencyKey: "k2", IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}); out.Duplicate {
		t.Error("the key of a reservation released before the restart is still remembered")
	}
}

// TestMeterReplaysLog checks recovery from a process killed with no
// checkpoint since the changes: everything comes from the log.
func TestMeterReplaysLog(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s := openTemp(t, path, noFlush)
	keyed := fillSome(t, s, q)
	want := stateOf(t, s, "acme", q)

	crashed := copyStore(t, path, t.TempDir())
	r := openTemp(t, crashed, noFlush)
	if got := stateOf(t, r, "acme", q); !got.equal(want) {
		t.Errorf("after replay:\n got  %+v\n want %+v", got, want)
	}
	if out := mustReserve(t, r, keyed); !out.Duplicate {
		t.Errorf("retry of a key from the replayed log: %+v; want a Duplicate", out)
	}
	// Open checkpointed the replayed state and dropped the old segment.
	if ids := segments(t, crashed); len(ids) != 1 || ids[0] <= segments(t, path)[0] {
		t.Errorf("segments after replay: %v; want only a new one", ids)
	}
}

// TestMeterMappedSegments fills small mapped segments: each full one is
// replaced by a new one and cut to its frames, and a crash at any point
// replays every reservation once.
func TestMeterMappedSegments(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("segments are mapped into memory on Linux only")
	}
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s := openTemp(t, path, noFlush, func(o *options) { o.segmentSize = 512 })
	if s.meter.segMem == nil {
		t.Fatal("the segment is not mapped")
	}
	for range 60 {
		mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q})
	}
	ids := segments(t, path)
	if len(ids) < 4 {
		t.Fatalf("segments %v after 60 reservations in 512-byte segments, want several", ids)
	}
	for _, id := range ids[:len(ids)-1] {
		ignored, err := readSegment(segmentPath(path, id), func(*delta) {})
		if info, serr := os.Stat(segmentPath(path, id)); err != nil || serr != nil || ignored != 0 || info.Size() == 0 || info.Size() > 512 {
			t.Errorf("full segment %d: %v, %v, %d bytes ignored; want only its frames, at most 512 bytes", id, err, serr, ignored)
		}
	}
	crashed := openTemp(t, copyStore(t, path, t.TempDir()), noFlush)
	if u := mustUsage(t, crashed, "acme", q); u.Billed != 60 || u.Requests != 60 {
		t.Errorf("after a crash: %+v, want 60 units in 60 requests", u.Counters)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if ids := segments(t, path); len(ids) != 0 {
		t.Errorf("segments %v left after Close, want none", ids)
	}
	reopened := openTemp(t, path, noFlush)
	if u := mustUsage(t, reopened, "acme", q); u.Billed != 60 || u.Requests != 60 {
		t.Errorf("after Close and Open: %+v, want 60 units in 60 requests", u.Counters)
	}
}

// TestMeterCrashAfterCheckpointCommit recreates a process killed between a
// checkpoint's commit and the deletion of the segment it covers: the
// segment must not be applied again.
func TestMeterCrashAfterCheckpointCommit(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	q := thisMonth()
	s, err := Open(path, noFlush)
	if err != nil {
		t.Fatal(err)
	}
	fillSome(t, s, q)
	want := stateOf(t, s, "acme", q)
	ids := segments(t, path)
	if len(ids) != 1 {
		t.Fatalf("segments %v, want one", ids)
	}
	saved, err := os.ReadFile(segmentPath(path, ids[0]))
	if err != nil || len(saved) == 0 {
		t.Fatalf("segment: %d bytes, %v", len(saved), err)
	}
	if err := s.Close(); err != nil { // checkpoints and deletes the segment
		t.Fatal(err)
	}
	if err := os.WriteFile(segmentPath(path, ids[0]), saved, 0o600); err != nil {
		t.Fatal(err)
	}

	s = openTemp(t, path, noFlush)
	if got := stateOf(t, s, "acme", q); !got.equal(want) {
		t.Errorf("after reopening with a covered segment still present:\n got  %+v\n want %+v", got, want)
	}
	if slices.Contains(segments(t, path), ids[0]) {
		t.Error("the covered segment was not deleted")
	}
}

func TestMeterIgnoresTornTail(t *testing.T) {
	q := thisMonth()
	for name, tail := range map[string]func(frame []byte) []byte{
		"HalfFrame":   func(f []byte) []byte { return f[:len(f)/2] },
		"HeaderOnly":  func(f []byte) []byte { return f[:frameHeader-1] },
		"BadChecksum": func(f []byte) []byte { g := slices.Clone(f); g[len(g)-1] ^= 1; return g },
		"Zeros":       func(f []byte) []byte { return make([]byte, len(f)) },
	} {
		for mode, opts := range map[string][]Option{"Mapped": {noFlush}, "Written": {noFlush, writeLog}} {
			t.Run(name+"/"+mode, func(t *testing.T) {
				path := filepath.Join(t.TempDir(), "store.db")
				s := openTemp(t, path, opts...)
				fillSome(t, s, q)
				want := stateOf(t, s, "acme", q)

				// The damaged record goes right after the last intact one
				// (a mapped segment's unwritten rest is zeros).
				crashed := copyStore(t, path, t.TempDir())
				ids := segments(t, crashed)
				seg := segmentPath(crashed, ids[len(ids)-1])
				ignored, err := readSegment(seg, func(*delta) {})
				info, serr := os.Stat(seg)
				if err != nil || serr != nil {
					t.Fatal(err, serr)
				}
				frame := appendFrame(nil, &delta{subject: "acme", periodID: q.PeriodID, periodEnd: q.PeriodEnd.UnixMicro(), hourID: q.HourID, billed: 1000, requests: 1})
				f, err := os.OpenFile(seg, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := f.WriteAt(tail(frame), info.Size()-ignored); err != nil {
					t.Fatal(err)
				}
				f.Close()

				r := openTemp(t, crashed, noFlush)
				if got := stateOf(t, r, "acme", q); !got.equal(want) {
					t.Errorf("after replaying a log with a damaged last record:\n got  %+v\n want %+v", got, want)
				}
				// New records go to a new segment and survive another crash.
				mustReserve(t, r, store.Reservation{Subject: "acme", Cost: 1, Quota: q})
				again := openTemp(t, copyStore(t, crashed, t.TempDir()), noFlush)
				if u := mustUsage(t, again, "acme", q); u.Billed != 86 {
					t.Errorf("after a second crash: billed %d, want 86", u.Billed)
				}
			})
		}
	}
}

func TestReadSegmentStopsAtDamage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "seg")
	var data []byte
	for i := range 3 {
		data = appendFrame(data, &delta{subject: fmt.Sprint("s", i), periodID: "p", hourID: "h", billed: int64(i + 1), requests: 1,
			idemOp: idemPut, idemKey: "key", idemExp: 7, crossed: []crossing{{threshold: 80, used: 9, included: 10, at: 11}}})
	}
	second := len(appendFrame(nil, &delta{subject: "s0", periodID: "p", hourID: "h", billed: 1, requests: 1,
		idemOp: idemPut, idemKey: "key", idemExp: 7, crossed: []crossing{{threshold: 80, used: 9, included: 10, at: 11}}}))
	data[second+frameHeader+2] ^= 0xff // damage the second record's payload
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	var got []delta
	ignored, err := readSegment(path, func(d *delta) { got = append(got, *d) })
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0].subject != "s0" || got[0].billed != 1 || got[0].idemKey != "key" || got[0].crossed[0] != (crossing{80, 9, 10, 11}) {
		t.Errorf("records before the damage: %+v; want the first one, intact", got)
	}
	if ignored != int64(len(data)-second) {
		t.Errorf("ignored %d bytes, want %d", ignored, len(data)-second)
	}
}

func TestMeterPrunesPeriodsAfterRetention(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	start := time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)
	clock := newFakeClock(start)
	s, err := Open(path, noFlush, withClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	quotaOf := func(p metering.Period, at time.Time) store.Quota {
		return store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(metering.HourStart(at)),
			Included: 10, Mode: store.QuotaBill, Thresholds: []int{100}}
	}
	march := metering.PeriodRule{}.Period(start, time.Time{})
	april := metering.PeriodRule{}.Period(march.End, time.Time{})
	qm, qa := quotaOf(march, start), quotaOf(april, april.Start)
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 12, Quota: qm})
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 3, Quota: qa})
	check := func(t *testing.T, s *Store, marchBilled int64, marchEvents int) {
		t.Helper()
		if u := mustUsage(t, s, "acme", qm); u.Billed != marchBilled || len(u.Hours) != min(1, int(marchBilled)) {
			t.Errorf("March usage %+v, want %d units", u, marchBilled)
		}
		if u := mustUsage(t, s, "acme", qa); u.Billed != 3 || len(u.Hours) != 1 {
			t.Errorf("April usage %+v, want 3 units in one hour", u)
		}
		if evs := mustEvents(t, s, "acme"); len(evs) != marchEvents {
			t.Errorf("threshold events %+v, want %d", evs, marchEvents)
		}
	}
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	// A second before the end of the retention, March is still there.
	clock.us.Store(march.End.Add(store.Retention - time.Second).UnixMicro())
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	check(t, s, 12, 1)
	clock.advance(time.Second)
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	check(t, s, 0, 0)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTemp(t, path, noFlush, withClock(clock.now))
	check(t, s, 0, 0)
	err = s.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketUsagePeriods, bucketUsageHours} {
			if n := tx.Bucket(b).Stats().KeyN; n != 1 {
				t.Errorf("bucket %s holds %d keys after pruning, want 1 (April's)", b, n)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestMeterIdempotencyWindow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	clock := newFakeClock(time.Now())
	q := thisMonth()
	s, err := Open(path, noFlush, withClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	long := strings.Repeat("x", 5000) // kept as a hash
	for _, key := range []string{"k1", long} {
		mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q, IdempotencyKey: key, IdempotencyFingerprint: "fp", IdempotencyRepeats: 3})
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = Open(path, noFlush, withClock(clock.now))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	clock.advance(store.IdempotencyWindow - time.Second)
	for _, key := range []string{"k1", long} {
		if out := mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q, IdempotencyKey: key, IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}); !out.Duplicate {
			t.Errorf("key %.8q within the window after a restart: %+v, want a Duplicate", key, out)
		}
	}
	clock.advance(time.Second)
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	err = s.db.View(func(tx *bolt.Tx) error {
		if n := tx.Bucket(bucketUsageIdem).Stats().KeyN; n != 0 {
			t.Errorf("%d expired idempotency keys still stored", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"k1", long} {
		if out := mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q, IdempotencyKey: key, IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}); out.Duplicate {
			t.Errorf("key %.8q after the window: a Duplicate, want it billed", key)
		}
	}
	if u := mustUsage(t, s, "acme", q); u.Requests != 4 {
		t.Errorf("requests %d, want 4", u.Requests)
	}
}

// TestMeterCheckpointFailureLosesNothing makes a checkpoint fail (bbolt
// closed under it), keeps reserving, and checks that the next checkpoint
// writes everything exactly once.
func TestMeterCheckpointFailureLosesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s := openTemp(t, path, noFlush)
	fillSome(t, s, q)
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.meter.checkpoint(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("checkpoint on a closed database: %v, want ErrUnavailable", err)
	}
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 2, Quota: q})
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.db, s.meter.db = db, db
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	if ids := segments(t, path); len(ids) != 1 {
		t.Errorf("segments after a successful checkpoint: %v, want only the current one", ids)
	}
	u := mustUsage(t, s, "acme", q)
	if u.Counters != (store.Counters{Billed: 87, Requests: 4}) || len(u.Hours) != 2 || u.Hours[0].Billed != 72 || u.Hours[1].Billed != 15 {
		t.Errorf("usage after a failed then a good checkpoint: %+v; want 87 units, 72 + 15", u)
	}
	if evs := mustEvents(t, s, "acme"); len(evs) != 1 {
		t.Errorf("events %+v, want one", evs)
	}
	crashed := openTemp(t, copyStore(t, path, t.TempDir()), noFlush)
	if got, want := stateOf(t, crashed, "acme", q), stateOf(t, s, "acme", q); !got.equal(want) {
		t.Errorf("reopened:\n got  %+v\n want %+v", got, want)
	}
}

// TestMeterLogWriteFailure breaks the log's file under the store: the
// reservation fails with ErrUnavailable and changes nothing, and the next
// one goes to a new segment.
func TestMeterLogWriteFailure(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s := openTemp(t, path, noFlush, writeLog) // a copy into a mapped segment cannot fail
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q})
	s.meter.mu.Lock()
	s.meter.seg.Close()
	s.meter.mu.Unlock()
	if _, err := s.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 10, Quota: q}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Reserve with a broken log: %v, want ErrUnavailable", err)
	}
	if u := mustUsage(t, s, "acme", q); u.Billed != 1 {
		t.Errorf("billed %d after a failed reservation, want 1", u.Billed)
	}
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 2, Quota: q})
	if ids := segments(t, path); len(ids) != 2 {
		t.Errorf("segments %v, want the broken one and a new one", ids)
	}
	crashed := openTemp(t, copyStore(t, path, t.TempDir()), noFlush)
	if u := mustUsage(t, crashed, "acme", q); u.Billed != 3 || u.Requests != 2 {
		t.Errorf("after replaying both segments: %+v, want 3 units in 2 requests", u.Counters)
	}
}

func TestMeterRejectsBadInput(t *testing.T) {
	s := openTemp(t, filepath.Join(t.TempDir(), "store.db"), noFlush)
	q := thisMonth()
	bad := []store.Reservation{
		{Subject: "acme", Cost: -1, Quota: q},
		{Subject: strings.Repeat("a", maxSubjectLen+1), Cost: 1, Quota: q},
		{Subject: "acme", Cost: 1, Quota: store.Quota{Mode: store.QuotaBill}},
		{Subject: "acme", Cost: 1, Quota: store.Quota{PeriodID: q.PeriodID, HourID: q.HourID, Mode: "later"}},
	}
	for _, r := range bad {
		if _, err := s.Reserve(t.Context(), r); err == nil || errors.Is(err, store.ErrUnavailable) {
			t.Errorf("Reserve(%.40v): %v; want an input error", r, err)
		}
	}
	if err := s.Settle(t.Context(), store.Settlement{Subject: "acme", Quota: q, Reserved: 1, Actual: -1}); err == nil {
		t.Error("Settle with a negative cost succeeded")
	}
}

func TestMeterClosed(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	q := thisMonth()
	if _, err := s.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 1, Quota: q}); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Reserve after Close: %v, want ErrUnavailable", err)
	}
	if _, err := s.Usage(t.Context(), "acme", q.PeriodID); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Usage after Close: %v, want ErrUnavailable", err)
	}
}

func TestOpenRejectsBadFlushInterval(t *testing.T) {
	if s, err := Open(filepath.Join(t.TempDir(), "store.db"), WithFlushInterval(0)); err == nil {
		s.Close()
		t.Fatal("Open with a zero flush interval succeeded")
	}
}

// TestMeterConcurrentWithCheckpoints reserves, settles and reads usage from
// many goroutines while checkpoints run every millisecond, and checks the
// totals live, after Close and after a simulated crash.
func TestMeterConcurrentWithCheckpoints(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	var flushErr atomic.Value
	s, err := Open(path, WithFlushInterval(time.Millisecond), WithFlushErrorHandler(func(err error) { flushErr.Store(err) }))
	if err != nil {
		t.Fatal(err)
	}
	q := thisMonth()
	q.Included = 1000
	const workers, each = 8, 300
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				r := store.Reservation{Subject: fmt.Sprint("c", w%3), Cost: 2, Quota: q}
				out, err := s.Reserve(context.Background(), r)
				if err != nil || !out.Allowed {
					t.Errorf("Reserve: %+v, %v", out, err)
					return
				}
				if i%3 == 0 { // one in three is not billable
					if err := s.Settle(context.Background(), store.Settlement{Subject: r.Subject, Quota: q, Reserved: 2, Overage: out.Overage}); err != nil {
						t.Error(err)
						return
					}
				}
				if i%50 == 0 {
					u := mustUsage(t, s, r.Subject, q)
					if !oneHour(u) {
						t.Errorf("usage mid-run: totals %+v, hours %+v; want one hour equal to the totals", u.Counters, u.Hours)
					}
				}
			}
		})
	}
	wg.Wait()
	if err, _ := flushErr.Load().(error); err != nil {
		t.Fatalf("background checkpoint: %v", err)
	}
	billed := func(s *Store) (total int64) {
		for c := range 3 {
			u := mustUsage(t, s, fmt.Sprint("c", c), q)
			if !oneHour(u) {
				t.Errorf("usage of c%d: totals %+v, hours %+v", c, u.Counters, u.Hours)
			}
			total += u.Billed
		}
		return total
	}
	const want = workers * each * 2 * 2 / 3
	if got := billed(s); got != want {
		t.Errorf("billed %d, want %d", got, want)
	}
	s.meter.flushMu.Lock() // no checkpoint while copying
	copied := copyStore(t, path, t.TempDir())
	s.meter.flushMu.Unlock()
	crashed := openTemp(t, copied, noFlush)
	if got := billed(crashed); got != want {
		t.Errorf("billed after a simulated crash %d, want %d", got, want)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTemp(t, path)
	if got := billed(s); got != want {
		t.Errorf("billed after reopen %d, want %d", got, want)
	}
}

// oneHour reports whether u's hours are one hour holding all of its
// totals, or none when the totals are zero.
func oneHour(u store.PeriodUsage) bool {
	if u.Counters == (store.Counters{}) {
		return len(u.Hours) == 0
	}
	return len(u.Hours) == 1 && u.Hours[0].Counters == u.Counters
}

func BenchmarkReserve(b *testing.B) {
	s := openTemp(b, filepath.Join(b.TempDir(), "store.db"))
	q := thisMonth()
	q.Included = 1 << 40
	p := limiter.Policy{Limit: 1 << 40, Period: time.Second}
	subjects := make([]string, 1024)
	for i := range subjects {
		subjects[i] = fmt.Sprintf("customer-%d", i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		ctx := context.Background()
		i := 0
		for pb.Next() {
			out, err := s.Reserve(ctx, store.Reservation{Subject: subjects[i%len(subjects)], Rate: p, Cost: 1, Quota: q})
			if err != nil || !out.Allowed {
				b.Errorf("Reserve: %+v, %v", out, err)
				return
			}
			i++
		}
	})
}

// TestMeterIdempotencyRepeatsDurable checks that the count of unbilled
// repeats of a key survives a restart, from a checkpoint and from the log
// alone, and that records written before fingerprints load and never
// match.
func TestMeterIdempotencyRepeatsDurable(t *testing.T) {
	q := thisMonth()
	keyed := store.Reservation{Subject: "acme", Cost: 1, Quota: q, IdempotencyKey: "k1", IdempotencyFingerprint: "fp", IdempotencyRepeats: 3}
	fill := func(t *testing.T, s *Store) {
		mustReserve(t, s, keyed)
		for range 2 {
			if out := mustReserve(t, s, keyed); !out.Duplicate {
				t.Fatalf("repeat: %+v, want a Duplicate", out)
			}
		}
	}
	// check expects one more Duplicate, then billed repeats.
	check := func(t *testing.T, s *Store) {
		t.Helper()
		if out := mustReserve(t, s, keyed); !out.Duplicate {
			t.Errorf("third repeat after the restart: %+v, want a Duplicate", out)
		}
		if out := mustReserve(t, s, keyed); out.Duplicate {
			t.Error("fourth repeat after the restart: a Duplicate, want it billed (the count was lost)")
		}
		if u := mustUsage(t, s, "acme", q); u.Requests != 2 {
			t.Errorf("requests %d, want 2", u.Requests)
		}
	}
	t.Run("Checkpoint", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "store.db")
		s, err := Open(path, noFlush)
		if err != nil {
			t.Fatal(err)
		}
		fill(t, s)
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		check(t, openTemp(t, path))
	})
	t.Run("Log", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "store.db")
		s := openTemp(t, path, noFlush)
		fill(t, s)
		check(t, openTemp(t, copyStore(t, path, t.TempDir()), noFlush))
	})
	t.Run("RecordWithoutFingerprint", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "store.db")
		s, err := Open(path, noFlush)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		exp := time.Now().Add(time.Hour).UnixMicro()
		err = db.Update(func(tx *bolt.Tx) error {
			return tx.Bucket(bucketUsageIdem).Put(append(appendString(nil, "acme"), "k1"...), binary.BigEndian.AppendUint64(nil, uint64(exp)))
		})
		if err2 := db.Close(); err == nil {
			err = err2
		}
		if err != nil {
			t.Fatal(err)
		}
		s = openTemp(t, path)
		for range 2 {
			if out := mustReserve(t, s, keyed); out.Duplicate {
				t.Fatal("a repeat of a key stored without a fingerprint was a Duplicate")
			}
		}
	})
}

// TestRecordIdemSetRoundTrip checks that a log record setting a key's
// fingerprint and repeats decodes as written, and that an older idemPut
// record still decodes (without a fingerprint).
func TestRecordIdemSetRoundTrip(t *testing.T) {
	for _, d := range []delta{
		{subject: "s", periodID: "p", hourID: "h", idemOp: idemSet, idemKey: "k", idemExp: 7, idemFP: "fp", idemRepeats: 2},
		{subject: "s", periodID: "p", hourID: "h", billed: 1, requests: 1, idemOp: idemPut, idemKey: "k", idemExp: 7},
	} {
		got, err := decodeRecord(appendRecord(nil, &d))
		if err != nil || got.idemOp != d.idemOp || got.idemKey != d.idemKey || got.idemExp != d.idemExp ||
			got.idemFP != d.idemFP || got.idemRepeats != d.idemRepeats || got.billed != d.billed {
			t.Errorf("decodeRecord(appendRecord(%+v)) = %+v, %v", d, got, err)
		}
	}
}
