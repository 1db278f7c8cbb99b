package boltstore

import (
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// fillMeters makes reservations with two meters besides the default one in
// two hours: a token meter known after the response (settled), an upload
// meter known in advance (one reservation released), and thresholds
// crossed by both.
func fillMeters(t testing.TB, s *Store, q store.Quota) {
	t.Helper()
	tokens := store.MeterReservation{Meter: "tokens", Mode: store.QuotaBill, Included: 100, Thresholds: []int{50, 100}}
	upload := store.MeterReservation{Meter: "upload", Mode: store.QuotaBlock, Included: 1000, Amount: 300, Thresholds: []int{50}}
	q2 := q
	q2.HourID = metering.TimeID(mustParseTimeID(t, q.HourID).Add(time.Hour))
	for i, qq := range []store.Quota{q, q2, q2} {
		r := store.Reservation{Subject: "acme", Cost: 1, Quota: qq, Meters: []store.MeterReservation{tokens, upload}}
		out := mustReserve(t, s, r)
		if !out.Allowed {
			t.Fatalf("reservation %d with meters denied: %+v", i, out)
		}
		st := store.Settlement{Subject: "acme", Quota: qq, Reserved: 1, Overage: out.Overage, Actual: 1,
			Meters: []store.MeterSettlement{{Meter: "tokens", Actual: int64(40 + 10*i), Quota: tokens}}}
		if i == 2 { // not billable: every meter back to 0
			st.Actual = 0
			st.Meters = []store.MeterSettlement{{Meter: "upload", Reserved: 300, Overage: out.Meters[1].Overage, Quota: upload}}
		}
		if err := s.Settle(context.Background(), st); err != nil {
			t.Fatal(err)
		}
	}
}

// meterState is what a user sees of acme's period: its usage, meters
// included, and the outbox.
func meterStateOf(t testing.TB, s *Store, q store.Quota) (store.PeriodUsage, []store.ThresholdEvent) {
	t.Helper()
	return mustUsage(t, s, "acme", q), mustEvents(t, s, "acme")
}

// wantMetersFilled checks the state one fillMeters leaves.
func wantMetersFilled(t testing.TB, u store.PeriodUsage, evs []store.ThresholdEvent) {
	t.Helper()
	want := []store.MeterUsage{
		{Meter: "tokens", Counters: store.Counters{Billed: 90, Requests: 2}, Thresholds: []int{50},
			Hours: []store.HourUsage{{Counters: store.Counters{Billed: 40, Requests: 1}}, {Counters: store.Counters{Billed: 50, Requests: 1}}}},
		{Meter: "upload", Counters: store.Counters{Billed: 600, Requests: 2}, Thresholds: []int{50},
			Hours: []store.HourUsage{{Counters: store.Counters{Billed: 300, Requests: 1}}, {Counters: store.Counters{Billed: 300, Requests: 1}}}},
	}
	ok := len(u.Meters) == 2 && u.Counters == (store.Counters{Billed: 2, Requests: 2})
	for i := 0; ok && i < 2; i++ {
		g, w := u.Meters[i], want[i]
		ok = g.Meter == w.Meter && g.Counters == w.Counters && reflect.DeepEqual(g.Thresholds, w.Thresholds) && len(g.Hours) == 2 &&
			g.Hours[0].Counters == w.Hours[0].Counters && g.Hours[1].Counters == w.Hours[1].Counters
	}
	if !ok {
		t.Fatalf("usage %+v; want default 2 units in 2 requests, meters %+v", u, want)
	}
	var names []string
	for _, e := range evs {
		names = append(names, e.Meter+"/"+e.ID)
	}
	if len(evs) != 2 || evs[0].Meter != "upload" || evs[1].Meter != "tokens" ||
		evs[1].ID != store.ThresholdEventID("acme", u.PeriodID, 50, "tokens") {
		t.Fatalf("events %v; want upload's 50 then tokens' 50", names)
	}
}

func TestMetersSurviveCloseAndReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s, err := Open(path, noFlush)
	if err != nil {
		t.Fatal(err)
	}
	fillMeters(t, s, q)
	u, evs := meterStateOf(t, s, q)
	wantMetersFilled(t, u, evs)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openTemp(t, path, noFlush)
	if u2, evs2 := meterStateOf(t, s, q); !reflect.DeepEqual(u2, u) || !reflect.DeepEqual(evs2, evs) {
		t.Errorf("after reopen:\n got  %+v %+v\n want %+v %+v", u2, evs2, u, evs)
	}
	// The reopened state goes on: the upload meter's 600 units count.
	out := mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q,
		Meters: []store.MeterReservation{{Meter: "upload", Mode: store.QuotaBlock, Included: 1000, Amount: 401}}})
	if out.Allowed || out.QuotaExceededMeter != "upload" || out.Meters[0].Used != 600 {
		t.Errorf("401 upload units beyond 600 of 1000 after reopen: %+v; want denied by upload", out)
	}
}

// TestMetersReplayLog recovers from a process killed with no checkpoint
// since the changes (everything from the log), and with one in between
// (the checkpoint, then the log).
func TestMetersReplayLog(t *testing.T) {
	for _, checkpointFirst := range []bool{false, true} {
		path := filepath.Join(t.TempDir(), "store.db")
		q := thisMonth()
		s := openTemp(t, path, noFlush)
		fillMeters(t, s, q)
		if checkpointFirst {
			if err := s.meter.checkpoint(); err != nil {
				t.Fatal(err)
			}
			q.Included = 10
			mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q,
				Meters: []store.MeterReservation{{Meter: "upload", Mode: store.QuotaBill, Included: 1000, Amount: 5}}})
		}
		u, evs := meterStateOf(t, s, q)
		r := openTemp(t, copyStore(t, path, t.TempDir()), noFlush)
		if u2, evs2 := meterStateOf(t, r, q); !reflect.DeepEqual(u2, u) || !reflect.DeepEqual(evs2, evs) {
			t.Errorf("checkpoint first %v: after replay:\n got  %+v %+v\n want %+v %+v", checkpointFirst, u2, evs2, u, evs)
		}
	}
}

func TestMetersCheckpointFailureLosesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	q := thisMonth()
	s := openTemp(t, path, noFlush)
	fillMeters(t, s, q)
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.meter.checkpoint(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("checkpoint on a closed database: %v, want ErrUnavailable", err)
	}
	mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q,
		Meters: []store.MeterReservation{{Meter: "upload", Mode: store.QuotaBill, Included: 1000, Amount: 7}}})
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	s.db, s.meter.db = db, db
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	u, evs := meterStateOf(t, s, q)
	if up := u.Meter("upload"); up.Billed != 607 || len(up.Hours) != 2 || up.Hours[0].Billed != 307 {
		t.Errorf("upload after a failed then a good checkpoint: %+v; want 607 units, 307 in the first hour", up)
	}
	crashed := openTemp(t, copyStore(t, path, t.TempDir()), noFlush)
	if u2, evs2 := meterStateOf(t, crashed, q); !reflect.DeepEqual(u2, u) || !reflect.DeepEqual(evs2, evs) {
		t.Errorf("reopened:\n got  %+v %+v\n want %+v %+v", u2, evs2, u, evs)
	}
}

func TestMetersPrunedWithTheirPeriod(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	start := time.Date(2026, time.March, 10, 12, 0, 0, 0, time.UTC)
	clock := newFakeClock(start)
	s := openTemp(t, path, noFlush, withClock(clock.now))
	march := metering.PeriodRule{}.Period(start, time.Time{})
	april := metering.PeriodRule{}.Period(march.End, time.Time{})
	tokens := []store.MeterReservation{{Meter: "tokens", Mode: store.QuotaBill, Included: 10, Amount: 12, Thresholds: []int{100}}}
	for _, p := range []metering.Period{march, april} {
		q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(p.Start), Mode: store.QuotaMeter}
		mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Meters: tokens})
	}
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	clock.us.Store(march.End.Add(store.Retention).UnixMicro())
	if err := s.meter.checkpoint(); err != nil {
		t.Fatal(err)
	}
	if evs := mustEvents(t, s, "acme"); len(evs) != 1 || evs[0].PeriodID != april.ID() {
		t.Errorf("events after March's retention: %+v; want April's only", evs)
	}
	if u, _ := s.Usage(context.Background(), "acme", march.ID()); len(u.Meters) != 0 {
		t.Errorf("March meters after its retention: %+v", u.Meters)
	}
	if u, _ := s.Usage(context.Background(), "acme", april.ID()); u.Meter("tokens").Billed != 12 || len(u.Meter("tokens").Hours) != 1 {
		t.Errorf("April meters: %+v; want 12 tokens", u.Meters)
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketUsageMeterPeriods, bucketUsageMeterHours} {
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

// TestRecordMetersRoundTrip checks the WAL record of a change with meters,
// and that a change without them is still written as the record type
// written before meters existed.
func TestRecordMetersRoundTrip(t *testing.T) {
	d := delta{subject: "acme", periodID: "p", hourID: "h", billed: 1, requests: 1,
		meters: []meterDelta{{meter: "tokens", billed: 40, requests: 1}, {meter: "upload", billed: -3, overage: -1,
			crossed: []crossing{{threshold: 50, used: 500, included: 1000, at: 7}}}}}
	b := appendRecord(nil, &d)
	if b[0] != recordDeltaMeters {
		t.Errorf("record type %d, want %d", b[0], recordDeltaMeters)
	}
	got, err := decodeRecord(b)
	if err != nil || !reflect.DeepEqual(got, d) {
		t.Fatalf("decoded %+v, %v; want %+v", got, err, d)
	}
	d.meters = nil
	if b := appendRecord(nil, &d); b[0] != recordDelta {
		t.Errorf("record type %d without meters, want %d", b[0], recordDelta)
	}
	// A meters record announcing no meter is never written: refused.
	payload := append([]byte{recordDeltaMeters}, appendRecord(nil, &d)[1:]...)
	if _, err := decodeRecord(append(payload, 0)); err == nil {
		t.Error("a meters record with no meter decodes")
	}
}

// TestSingleMeterLayoutReadUnchanged opens a store written by the code
// before meters existed (commit 9f07f54, testdata/single-meter: a
// checkpoint with two reservations, and a log segment with a reservation
// and its settlement, as a killed process left them): its usage reads as
// it was written, and counting goes on from there with meters.
func TestSingleMeterLayoutReadUnchanged(t *testing.T) {
	dir := t.TempDir()
	for _, name := range []string{"store.db", "store.db.wal.0000000000000002"} {
		gunzipFile(t, filepath.Join("testdata", "single-meter", name+".gz"), filepath.Join(dir, name))
	}
	path := filepath.Join(dir, "store.db")
	s, err := Open(path, noFlush)
	if err != nil {
		t.Fatal(err)
	}
	const period = "20990101T000000Z"
	want := store.PeriodUsage{PeriodID: period, Counters: store.Counters{Billed: 102, Overage: 2, Requests: 3}, Thresholds: []int{80},
		Hours: []store.HourUsage{
			{HourID: "20990101T000000Z", Counters: store.Counters{Billed: 90, Requests: 2}},
			{HourID: "20990101T010000Z", Counters: store.Counters{Billed: 12, Overage: 2, Requests: 1}},
		}}
	at := time.Date(2026, 12, 6, 13, 4, 43, 295400000, time.UTC)
	wantEvents := []store.ThresholdEvent{{ID: "acme|" + period + "|80", Subject: "acme", PeriodID: period, Threshold: 80, Used: 90, Included: 100, At: at}}
	check := func(t *testing.T, s *Store, want store.PeriodUsage) {
		t.Helper()
		u, err := s.Usage(context.Background(), "acme", period)
		if err != nil || !reflect.DeepEqual(u, want) {
			t.Fatalf("usage %+v, %v;\nwant %+v", u, err, want)
		}
		if evs := mustEvents(t, s, "acme"); !reflect.DeepEqual(evs, wantEvents) {
			t.Fatalf("events %+v;\nwant %+v", evs, wantEvents)
		}
	}
	check(t, s, want)
	q := store.Quota{PeriodID: period, PeriodEnd: time.Date(2099, 2, 1, 0, 0, 0, 0, time.UTC), HourID: "20990101T010000Z", Included: 100, Mode: store.QuotaBill, Thresholds: []int{80}}
	out := mustReserve(t, s, store.Reservation{Subject: "acme", Cost: 1, Quota: q,
		Meters: []store.MeterReservation{{Meter: "upload", Mode: store.QuotaBill, Included: 100, Amount: 9}}})
	if out.Used != 103 || out.Overage != 1 || len(out.Crossed) != 0 || out.Meters[0].Used != 9 {
		t.Fatalf("reservation on the old usage: %+v; want default Used 103, Overage 1, upload 9", out)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	want.Counters = store.Counters{Billed: 103, Overage: 3, Requests: 4}
	want.Hours[1].Counters = store.Counters{Billed: 13, Overage: 3, Requests: 2}
	want.Meters = []store.MeterUsage{{Meter: "upload", Counters: store.Counters{Billed: 9, Requests: 1},
		Hours: []store.HourUsage{{HourID: "20990101T010000Z", Counters: store.Counters{Billed: 9, Requests: 1}}}}}
	check(t, openTemp(t, path, noFlush), want)
}

func gunzipFile(t *testing.T, src, dst string) {
	t.Helper()
	f, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(z)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkReserveMeters is BenchmarkReserve with two meters besides the
// default one, each with a known amount, a bill quota and thresholds (so
// each is counted and logged); compare with -bench 'Reserve$|ReserveMeters'.
func BenchmarkReserveMeters(b *testing.B) {
	s := openTemp(b, filepath.Join(b.TempDir(), "store.db"))
	q := thisMonth()
	q.Included = 1 << 40
	p := limiter.Policy{Limit: 1 << 40, Period: time.Second}
	ms := []store.MeterReservation{
		{Meter: "tokens", Amount: 100, Mode: store.QuotaBill, Included: 1 << 40, Thresholds: []int{80, 100}},
		{Meter: "upload", Amount: 2000, Mode: store.QuotaBill, Included: 1 << 45, Thresholds: []int{80}},
	}
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
			out, err := s.Reserve(ctx, store.Reservation{Subject: subjects[i%len(subjects)], Rate: p, Cost: 1, Quota: q, Meters: ms})
			if err != nil || !out.Allowed {
				b.Errorf("Reserve: %+v, %v", out, err)
				return
			}
			i++
		}
	})
}
