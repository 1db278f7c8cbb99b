package module

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
	"github.com/apimonetize/caddy-api-monetize/store/spool"
)

// TestMemBuffer keeps records up to its bound, in order, and replays them
// into a real embedded store: a reservation and the settlement that
// releases it cancel out, the others are billed once; a second replay
// applies nothing.
func TestMemBuffer(t *testing.T) {
	st, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	now := time.Now().UTC()
	p := metering.Period{Start: now.Add(-time.Hour), End: now.Add(time.Hour)}
	q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: hourID(now), Included: 10, Mode: store.QuotaBill}
	res := func(cost int64) spool.Record {
		return spool.Record{Reservation: &store.Reservation{Subject: "acme", Cost: cost, Quota: q}}
	}
	b := newMemBuffer(3)
	for i, rec := range []spool.Record{
		res(2),
		{Settlement: &store.Settlement{Subject: "acme", Quota: q, Reserved: 2, Actual: 0}}, // releases the first
		res(5),
	} {
		if !b.Append(rec) {
			t.Fatalf("record %d refused below the bound", i)
		}
	}
	if b.Append(res(7)) {
		t.Fatal("a record beyond the bound was kept")
	}
	n, err := b.Replay(t.Context(), st)
	if err != nil || n != 3 || b.Pending() {
		t.Fatalf("Replay = %d, %v (pending %v); want 3 applied, none left", n, err, b.Pending())
	}
	if n, err := b.Replay(t.Context(), st); n != 0 || err != nil {
		t.Fatalf("second Replay = %d, %v", n, err)
	}
	u, err := st.Usage(t.Context(), "acme", q.PeriodID)
	if err != nil || u.Billed != 5 || u.Requests != 1 {
		t.Fatalf("usage after replay: %+v, %v; want 5 units in 1 request", u.Counters, err)
	}
}

// TestKeepOverflowCountsLost: on the embedded store, usage beyond the
// in-memory buffer's bound is counted in lost_usage_records_total, the
// rest in spooled_records_total.
func TestKeepOverflowCountsLost(t *testing.T) {
	s := newShared(nil, "") // the embedded store: no spool directory
	s.mem = newMemBuffer(2)
	m := getMetrics()
	spooled, lost := testutil.ToFloat64(m.spooled), testutil.ToFloat64(m.lostUsage)
	rec := spool.Record{Reservation: &store.Reservation{Subject: "acme", Cost: 1}}
	for range 5 {
		s.keep(rec)
	}
	if got := testutil.ToFloat64(m.spooled) - spooled; got != 2 {
		t.Errorf("%v records counted as kept, want 2", got)
	}
	if got := testutil.ToFloat64(m.lostUsage) - lost; got != 3 {
		t.Errorf("%v records counted as lost, want 3", got)
	}
	if s.mem.Len() != 2 {
		t.Errorf("buffer holds %d records, want 2", s.mem.Len())
	}
}
