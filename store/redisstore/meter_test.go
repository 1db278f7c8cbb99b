package redisstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// meterTimeout is the OpTimeout of the metering tests: they are about
// exactness, and hundreds of goroutines on few CPUs (and -race) queue for
// connections.
const meterTimeout = 5 * time.Second

func TestMeterContract(t *testing.T) {
	storetest.RunMeter(t, func(t *testing.T) store.Store {
		return openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: meterTimeout})
	})
}

func TestMeterContractShared(t *testing.T) {
	storetest.RunMeterShared(t, func(t *testing.T) (store.Store, store.Store) {
		prefix := newPrefix(t)
		return openStore(t, Options{KeyPrefix: prefix, OpTimeout: meterTimeout}), openStore(t, Options{KeyPrefix: prefix, OpTimeout: meterTimeout})
	})
}

// thisMonth is the current calendar month (UTC).
func thisMonth() metering.Period {
	return metering.PeriodRule{}.Period(time.Now(), time.Time{})
}

// testQuota is a quota of the current month counted in its first hour.
func testQuota(mode string, included int64) store.Quota {
	p := thisMonth()
	return store.Quota{
		PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(p.Start),
		Included: included, Mode: mode,
	}
}

// TestReserveExactAcrossClients sends 2000 concurrent reservations through
// three separate clients against one block quota of 100 units.
func TestReserveExactAcrossClients(t *testing.T) {
	for _, tc := range []struct {
		cost int64
		want int64
	}{{1, 100}, {5, 20}} {
		t.Run(fmt.Sprintf("Cost%d", tc.cost), func(t *testing.T) {
			prefix := newPrefix(t)
			var handles []*Store
			for range 3 {
				handles = append(handles, openStore(t, Options{KeyPrefix: prefix, OpTimeout: meterTimeout}))
			}
			q := testQuota(store.QuotaBlock, 100)
			var allowed, exceeded, errs atomic.Int64
			var wg sync.WaitGroup
			start := make(chan struct{})
			for i := range 2000 {
				wg.Go(func() {
					<-start
					r := store.Reservation{Subject: "hot", Cost: tc.cost, Quota: q, Origin: fmt.Sprint("instance-", i%3), Seq: int64(i/3 + 1)}
					out, err := handles[i%3].Reserve(context.Background(), r)
					switch {
					case err != nil:
						errs.Add(1)
					case out.Allowed:
						allowed.Add(1)
					case out.QuotaExceeded:
						exceeded.Add(1)
					}
				})
			}
			close(start)
			wg.Wait()
			if errs.Load() != 0 {
				t.Fatalf("%d of 2000 reservations failed", errs.Load())
			}
			if allowed.Load() != tc.want || exceeded.Load() != 2000-tc.want {
				t.Errorf("2000 concurrent cost-%d reservations on a block quota of 100: %d allowed, %d quota-exceeded; want exactly %d allowed, the rest quota-exceeded",
					tc.cost, allowed.Load(), exceeded.Load(), tc.want)
			}
			u, err := handles[1].Usage(context.Background(), "hot", q.PeriodID)
			if err != nil {
				t.Fatal(err)
			}
			if want := (store.Counters{Billed: 100, Requests: tc.want}); u.Counters != want {
				t.Errorf("Usage = %+v, want %+v", u.Counters, want)
			}
		})
	}
}

// TestReserveOneRoundTrip checks that every kind of reservation, and a
// settlement, is one EVALSHA in one round trip (a pipeline, shared with
// whatever else is pending) once Redis has the scripts.
func TestReserveOneRoundTrip(t *testing.T) {
	w := &wire{}
	s := openStore(t, Options{KeyPrefix: newPrefix(t), dial: w.dial})
	ctx := context.Background()
	q := testQuota(store.QuotaBlock, 5)
	q.Thresholds = []int{80, 100}
	rate := limiter.Policy{Limit: 3, Period: time.Hour}
	warm := store.Reservation{Subject: "warm-up", Cost: 1, Quota: q}
	if _, err := s.Reserve(ctx, warm); err != nil {
		t.Fatal(err)
	}
	if err := s.Settle(ctx, store.Settlement{Subject: "warm-up", Quota: q, Reserved: 1, Actual: 0}); err != nil {
		t.Fatal(err)
	}

	warmed := len(w.scripts())
	r := func(cost int64, key string) store.Reservation {
		return store.Reservation{Subject: "rtt", Rate: rate, Cost: cost, Quota: q, IdempotencyKey: key, IdempotencyFingerprint: "fp", IdempotencyRepeats: 3, Origin: "o", Seq: 0}
	}
	steps := []struct {
		name string
		r    store.Reservation
		want func(store.Reserved) bool
	}{
		{"allowed, crossing a threshold", r(2, "k1"), func(o store.Reserved) bool { return o.Allowed && len(o.Crossed) == 0 }},
		{"duplicate", r(1, "k1"), func(o store.Reserved) bool { return o.Duplicate && o.Used == 2 }},
		{"cost 0", r(0, ""), func(o store.Reserved) bool { return o.Allowed && o.Used == 2 }},
		{"rate denied", r(1, ""), func(o store.Reserved) bool { return !o.Allowed && !o.QuotaExceeded }},
		{"quota denied", r(4, ""), func(o store.Reserved) bool { return o.QuotaExceeded }},
	}
	for i, st := range steps {
		st.r.Seq = int64(i + 1)
		out, err := s.Reserve(ctx, st.r)
		if err != nil || !st.want(out) {
			t.Fatalf("%s: %+v, %v", st.name, out, err)
		}
	}
	if err := s.Settle(ctx, store.Settlement{Subject: "rtt", Quota: q, Reserved: 2, Actual: 1, Origin: "o", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	want := slices.Repeat([]string{"pipeline(evalsha)"}, len(steps)+1)
	if got := w.scripts()[warmed:]; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("%d reservations and a settlement sent %q, want one EVALSHA each", len(steps), got)
	}
}

// TestMeterKeys pins the key layout (and the period hash's fields) and
// checks that every key the metering writes expires, and that reservations
// without an idempotency key add no keys per request.
func TestMeterKeys(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix})
	ctx := context.Background()
	q := testQuota(store.QuotaThrottle, 10)
	q.Throttle = limiter.Policy{Limit: 1000, Period: time.Hour}
	q.Thresholds = []int{80}
	rate := limiter.Policy{Limit: 1000, Period: time.Minute}
	hour2 := metering.TimeID(thisMonth().Start.Add(2 * time.Hour))
	for i := range 50 {
		r := store.Reservation{Subject: "acme", Rate: rate, Cost: 1, Quota: q, Origin: "o1", Seq: int64(i + 1)}
		if i == 7 {
			r.IdempotencyKey = "retry-1"
		}
		if i%2 == 1 {
			r.Quota.HourID = hour2
		}
		if out, err := s.Reserve(ctx, r); err != nil || !out.Allowed {
			t.Fatalf("Reserve: %+v, %v", out, err)
		}
	}
	tag := prefix + "{acme}:"
	periodEnd := q.PeriodEnd.Add(store.Retention)
	wantKeys := map[string]time.Time{
		tag + "u:" + q.PeriodID:    periodEnd,
		tag + "idem:retry-1":       time.Now().Add(store.IdempotencyWindow),
		tag + "outbox":             periodEnd,
		prefix + "outbox:subjects": periodEnd,
	}
	var keys []string
	iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
	for iter.Next(ctx) {
		if !meteredIndexKey(prefix, iter.Val()) { // written in the background: hours_test.go
			keys = append(keys, iter.Val())
		}
	}
	if err := iter.Err(); err != nil {
		t.Fatal(err)
	}
	slices.Sort(keys)
	var want []string
	for k := range wantKeys {
		want = append(want, k)
	}
	slices.Sort(want)
	if !slices.Equal(keys, want) {
		t.Fatalf("keys after 50 reservations:\n got  %q\n want %q", keys, want)
	}
	fields, err := c.HKeys(ctx, tag+"u:"+q.PeriodID).Result()
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(fields)
	wantFields := []string{"c", "crossed", "h:" + q.HourID, "h:" + hour2, "w:o1"}
	slices.Sort(wantFields)
	if !slices.Equal(fields, wantFields) {
		t.Errorf("period hash fields:\n got  %q\n want %q", fields, wantFields)
	}
	for k, until := range wantKeys {
		ttl, err := c.PTTL(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		if until.IsZero() {
			if ttl <= 0 || ttl > time.Hour {
				t.Errorf("%s: TTL %v, want in (0, 1h]", strings.TrimPrefix(k, prefix), ttl)
			}
			continue
		}
		if left := time.Until(until); ttl <= 0 || ttl > left+5*time.Second || ttl < left-time.Minute-5*time.Second {
			t.Errorf("%s: TTL %v, want about %v", strings.TrimPrefix(k, prefix), ttl, left)
		}
	}
}

// TestDeniedWritesNothing checks that denied and cost-0 reservations
// leave no key behind.
func TestDeniedWritesNothing(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix})
	ctx := context.Background()
	q := testQuota(store.QuotaBlock, 0)
	q.Thresholds = []int{80}
	for _, r := range []store.Reservation{
		{Subject: "acme", Cost: 1, Quota: q, IdempotencyKey: "k1", Origin: "o", Seq: 1},
		{Subject: "acme", Cost: 6, Quota: testQuota(store.QuotaBill, 10), Rate: limiter.Policy{Limit: 5, Period: time.Hour}, IdempotencyKey: "k2", Origin: "o", Seq: 2},
		{Subject: "acme", Cost: 0, Quota: q, Rate: limiter.Policy{Limit: 5, Period: time.Hour}, IdempotencyKey: "k3", Origin: "o", Seq: 3},
	} {
		if out, err := s.Reserve(ctx, r); err != nil || out.Allowed != (r.Cost == 0) {
			t.Fatalf("Reserve(cost %d) = %+v, %v", r.Cost, out, err)
		}
	}
	keys, err := c.Keys(ctx, prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 0 {
		t.Errorf("denied and cost-0 reservations wrote %q", keys)
	}
}

// TestOutboxPruned checks that outbox entries are dropped once their
// period's retention has passed, when a later entry is written.
func TestOutboxPruned(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix})
	ctx := context.Background()
	cur := testQuota(store.QuotaBill, 10)
	cur.Thresholds = []int{50}
	old := cur
	old.PeriodID, old.PeriodEnd = "20200101T000000Z", time.Date(2020, time.February, 1, 0, 0, 0, 0, time.UTC)
	for _, q := range []store.Quota{old, cur} {
		out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 5, Quota: q})
		if err != nil || !slices.Equal(out.Crossed, []int{50}) {
			t.Fatalf("Reserve in %s = %+v, %v; want 50 crossed", q.PeriodID, out, err)
		}
	}
	if n, err := c.LLen(ctx, prefix+"{acme}:outbox").Result(); err != nil || n != 1 {
		t.Errorf("outbox length %d, %v; want 1 (the expired entry popped)", n, err)
	}
	// A subject whose entries have all expired is not listed.
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "gone", Cost: 5, Quota: old}); err != nil {
		t.Fatal(err)
	}
	evs, err := s.ThresholdEvents(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 1 || evs[0].Subject != "acme" || evs[0].PeriodID != cur.PeriodID {
		t.Errorf("ThresholdEvents = %+v, want only acme's current one", evs)
	}
}

// TestMeterLargeNumbers checks quotas near 2^53 units, where Lua doubles
// stop being exact: overage and thresholds must still be exact.
func TestMeterLargeNumbers(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	ctx := context.Background()
	const included = 1<<53 - 10
	q := testQuota(store.QuotaBill, included)
	q.Thresholds = []int{80, 100, 101}
	for _, step := range []struct {
		cost, used, overage int64
		crossed             []int
	}{
		{included - 1, included - 1, 0, []int{80}},
		{1, included, 0, []int{100}},
		{4, included + 4, 4, nil},
		{3, included + 7, 3, nil},
	} {
		out, err := s.Reserve(ctx, store.Reservation{Subject: "big", Cost: step.cost, Quota: q})
		if err != nil {
			t.Fatal(err)
		}
		if !out.Allowed || out.Used != step.used || out.Overage != step.overage || !slices.Equal(out.Crossed, step.crossed) {
			t.Fatalf("Reserve(cost %d) = %+v; want used %d overage %d crossing %v", step.cost, out, step.used, step.overage, step.crossed)
		}
	}
	u, err := s.Usage(ctx, "big", q.PeriodID)
	if err != nil {
		t.Fatal(err)
	}
	if want := (store.Counters{Billed: included + 7, Overage: 7, Requests: 4}); u.Counters != want {
		t.Errorf("Usage = %+v, want %+v", u.Counters, want)
	}
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "big", Cost: 1 << 53, Quota: q}); err == nil {
		t.Error("Reserve of 2^53 units succeeded, want an error")
	}
}

// TestMeterUnavailable checks that an unreachable Redis fails Reserve and
// Settle with store.ErrUnavailable, and that invalid input fails without
// contacting Redis.
func TestMeterUnavailable(t *testing.T) {
	var dials atomic.Int64
	s := openStore(t, Options{URL: "redis://127.0.0.1:1", dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return nil, errors.New("connection refused")
	}})
	ctx := context.Background()
	q := testQuota(store.QuotaBlock, 10)
	for _, r := range []store.Reservation{
		{Subject: "x", Cost: -1, Quota: q},
		{Subject: "x", Cost: 1 << 53, Quota: q},
		{Subject: "x", Cost: 1, Quota: store.Quota{PeriodID: q.PeriodID, HourID: q.HourID, Mode: store.QuotaBill}},
		{Subject: "x", Cost: 1, Quota: store.Quota{PeriodID: q.PeriodID, PeriodEnd: q.PeriodEnd, HourID: q.HourID, Mode: "overdraft"}},
		{Subject: "", Cost: 1, Quota: q},
	} {
		if _, err := s.Reserve(ctx, r); err == nil || errors.Is(err, store.ErrUnavailable) {
			t.Errorf("Reserve(%+v) error = %v, want a validation error", r, err)
		}
	}
	if err := s.Settle(ctx, store.Settlement{Subject: "x", Quota: q, Reserved: 2, Overage: 3, Actual: 1}); err == nil {
		t.Error("Settle with more overage than units succeeded")
	}
	if dials.Load() != 0 {
		t.Fatalf("invalid input caused %d dials", dials.Load())
	}
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "x", Cost: 1, Quota: q}); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Reserve with Redis unreachable: %v, want ErrUnavailable", err)
	}
	if err := s.Settle(ctx, store.Settlement{Subject: "x", Quota: q, Reserved: 1}); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Settle with Redis unreachable: %v, want ErrUnavailable", err)
	}
	if _, err := s.Usage(ctx, "x", q.PeriodID); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("Usage with Redis unreachable: %v, want ErrUnavailable", err)
	}
	if _, err := s.ThresholdEvents(ctx, ""); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("ThresholdEvents with Redis unreachable: %v, want ErrUnavailable", err)
	}
}

// benchReservation is the common request path: a tier rate, a bill quota
// with thresholds, an origin and a seq.
func benchReservation(subject string) store.Reservation {
	q := testQuota(store.QuotaBill, 1<<40)
	q.Thresholds = []int{80, 100, 120}
	return store.Reservation{
		Subject: subject, Rate: limiter.Policy{Limit: 1 << 30, Period: time.Hour}, Cost: 1,
		Quota: q, Origin: "bench",
	}
}

// benchMeters are the meters besides the default one that BenchmarkReserve
// reserves: REDISSTORE_BENCH_METERS of them (none when unset; at most 2),
// each with a known amount, a bill quota and thresholds, so each is
// counted and written.
func benchMeters(b *testing.B) []store.MeterReservation {
	n, _ := strconv.Atoi(os.Getenv("REDISSTORE_BENCH_METERS"))
	ms := []store.MeterReservation{
		{Meter: "tokens", Amount: 100, Mode: store.QuotaBill, Included: 1 << 40, Thresholds: []int{80, 100}},
		{Meter: "upload", Amount: 2000, Mode: store.QuotaBill, Included: 1 << 45, Thresholds: []int{80}},
	}
	if n < 0 || n > len(ms) {
		b.Fatalf("REDISSTORE_BENCH_METERS=%d: 0 to %d", n, len(ms))
	}
	return ms[:n]
}

// BenchmarkReserve measures one Reserve round trip (one EVALSHA) against
// the test Redis, sequentially (with REDISSTORE_BENCH_METERS meters
// besides the default one: see benchMeters).
func BenchmarkReserve(b *testing.B) {
	s := openStore(b, Options{KeyPrefix: newPrefix(b), OpTimeout: time.Second})
	ctx := context.Background()
	r := benchReservation("bench")
	r.Meters = benchMeters(b)
	b.ReportAllocs()
	for b.Loop() {
		r.Seq++
		if _, err := s.Reserve(ctx, r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkReserveParallel measures Reserve throughput with 8×GOMAXPROCS
// goroutines on one client, each on its own subject.
func BenchmarkReserveParallel(b *testing.B) {
	s := openStore(b, Options{KeyPrefix: newPrefix(b), OpTimeout: time.Second})
	var n atomic.Int64
	b.ReportAllocs()
	b.SetParallelism(8)
	b.RunParallel(func(pb *testing.PB) {
		r := benchReservation(fmt.Sprint("bench-", n.Add(1)))
		for pb.Next() {
			r.Seq++
			if _, err := s.Reserve(context.Background(), r); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkReserveRelease measures a reservation and its release
// (Settle with Actual 0): two EVALSHA round trips, the path of a response
// that is not billable.
func BenchmarkReserveRelease(b *testing.B) {
	s := openStore(b, Options{KeyPrefix: newPrefix(b), OpTimeout: time.Second})
	ctx := context.Background()
	r := benchReservation("bench")
	r.IdempotencyKey, r.IdempotencyFingerprint, r.IdempotencyRepeats = "retry-1", "fp", 3
	b.ReportAllocs()
	for b.Loop() {
		r.Seq++
		out, err := s.Reserve(ctx, r)
		if err != nil || !out.Allowed || out.Duplicate {
			b.Fatalf("Reserve: %+v, %v", out, err)
		}
		if err := s.Settle(ctx, store.Settlement{
			Subject: r.Subject, Quota: r.Quota, IdempotencyKey: r.IdempotencyKey, IdempotencyFingerprint: r.IdempotencyFingerprint,
			Reserved: r.Cost, Overage: out.Overage, Origin: r.Origin, Seq: r.Seq,
		}); err != nil {
			b.Fatal(err)
		}
	}
}

// TestFirstLevel checks the least usage at which the reserve script looks
// for crossed thresholds against metering.Crossed: below it nothing is
// crossed, at it something is.
func TestFirstLevel(t *testing.T) {
	for _, included := range []int64{1, 7, 99, 100, 101, 12345, 1 << 40, maxExact - 1} {
		for _, ts := range [][]int{{80, 100, 120}, {1}, {120, 80}, {999, 1000}, {100}} {
			q := testQuota(store.QuotaBill, included)
			q.Thresholds = ts
			l := firstLevel(q)
			if l < 0 || l >= maxExact {
				if len(metering.Crossed(0, maxExact-1, included, ts)) != 0 {
					t.Errorf("included %d, thresholds %v: level %d, but usage below 2^53 crosses some", included, ts, l)
				}
				continue
			}
			if got := metering.Crossed(0, l, included, ts); len(got) == 0 {
				t.Errorf("included %d, thresholds %v: nothing crossed at level %d", included, ts, l)
			}
			if got := metering.Crossed(0, l-1, included, ts); len(got) != 0 {
				t.Errorf("included %d, thresholds %v: %v crossed below level %d", included, ts, got, l)
			}
		}
	}
	for _, q := range []store.Quota{testQuota(store.QuotaMeter, 100), testQuota(store.QuotaBill, 0)} {
		q.Thresholds = []int{80}
		if l := firstLevel(q); l != -1 {
			t.Errorf("%s quota of %d units: level %d, want -1 (nothing to cross)", q.Mode, q.Included, l)
		}
	}
}

// TestRateStateCrossesPeriods checks that the rate state follows a
// customer into the next period: units spent just before a period ends
// still count in the next one (the state, kept in the period hash, reaches
// past the period's end, so it is carried in the rate key).
func TestRateStateCrossesPeriods(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	ctx := context.Background()
	rate := limiter.Policy{Limit: 10, Period: time.Hour}
	now := time.Now().UTC()
	ending := store.Quota{PeriodID: "ending", PeriodEnd: now.Add(2 * time.Second), HourID: metering.TimeID(now.Truncate(time.Hour)), Mode: store.QuotaMeter}
	next := store.Quota{PeriodID: "next", PeriodEnd: now.AddDate(0, 1, 0), HourID: ending.HourID, Mode: store.QuotaMeter}

	out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Rate: rate, Cost: 10, Quota: ending, Origin: "o", Seq: 1})
	if err != nil || !out.Allowed || out.Rate.Remaining != 0 {
		t.Fatalf("spending the burst: %+v, %v", out, err)
	}
	out, err = s.Reserve(ctx, store.Reservation{Subject: "acme", Rate: rate, Cost: 1, Quota: next, Origin: "o", Seq: 2})
	if err != nil {
		t.Fatal(err)
	}
	if out.Allowed || out.Rate.RetryAfter < 5*time.Minute {
		t.Errorf("first reservation of the next period: %+v; want denied for about 6 minutes (the burst was spent)", out)
	}
	// A cost-0 reservation reports the state: nothing left.
	out, err = s.Reserve(ctx, store.Reservation{Subject: "acme", Rate: rate, Cost: 0, Quota: next, Origin: "o", Seq: 3})
	if err != nil || out.Rate.Remaining != 0 {
		t.Errorf("rate state in the next period: %+v, %v; want Remaining 0", out, err)
	}
}

// TestPackedCounters decodes the period hash's packed fields as the
// scripts write them, and refuses a field of the wrong length as corrupt
// (a permanent error, not a store outage).
func TestPackedCounters(t *testing.T) {
	var c command
	c.ints([]int64{7, 2, 3, 1_700_000_000_000_000, 60_000_000})
	field := string(c.b[len("$40\r\n") : len(c.b)-2])
	got, err := counters(map[string]string{"c": field, "crossed": ",80,"})
	if err != nil || got != (store.Counters{Billed: 7, Overage: 2, Requests: 3}) {
		t.Errorf("counters = %+v, %v; want billed 7, overage 2, requests 3", got, err)
	}
	if got, err := counters(map[string]string{}); err != nil || got != (store.Counters{}) {
		t.Errorf("counters of an empty hash = %+v, %v; want zeros", got, err)
	}
	var h command
	h.ints([]int64{-4, 0, -1}) // a release in a later hour than its reservation
	hour, err := hourCounters(string(h.b[len("$24\r\n") : len(h.b)-2]))
	if err != nil || hour != (store.Counters{Billed: -4, Requests: -1}) {
		t.Errorf("hourCounters = %+v, %v; want billed -4, requests -1", hour, err)
	}
	for _, bad := range []string{"7,2,3", field[:39], field + "x"} {
		var p permanent
		if _, err := counters(map[string]string{"c": bad}); !errors.As(err, &p) {
			t.Errorf("counters(%q): %v, want a permanent error", bad, err)
		}
	}
	if _, err := hourCounters("1,0,1"); err == nil {
		t.Error("hourCounters accepted decimal text")
	}
}
