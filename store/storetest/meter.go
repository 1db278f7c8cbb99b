package storetest

import (
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// RunMeter runs the contract suite of store.Meter. open must return a
// fresh, empty store that also implements store.Meter, and register its
// cleanup; it is called once per subtest.
//
// Periods are the real calendar months (UTC) around the test's wall clock,
// so a store may expire counters at PeriodEnd plus store.Retention. Hours
// are hours of the current period; a store must not assume HourID is the
// current hour.
//
// Every reservation carries an Origin and a Seq numbered per subject, as the
// module sends them. Besides the doc comments of store.Meter, the suite
// pins these decisions, so that both stores behave alike:
//
//   - The quota is checked before the rate: when a block quota would be
//     exceeded, Reserved.QuotaExceeded is set (even if the rate would deny
//     too) and the rate state is not spent.
//   - A reservation's Overage is metering.Overage(used before, cost,
//     Included) in bill and throttle modes.
//   - Settle with Actual < Reserved takes the released units off the
//     reservation's overage first (its last units are the ones beyond the
//     quota); with Actual > Reserved the added units count after the
//     period's current usage, so their overage is metering.Overage(used
//     now, Actual-Reserved, Included). Added units can cross thresholds.
//   - A repeat of an idempotency key is decided like any reservation (the
//     block quota, the rate or throttle, whose units it spends); admitted,
//     it is a Duplicate only with the stored fingerprint (never an empty
//     one) and within IdempotencyRepeats; otherwise it is billed and the
//     stored record is kept. A release forgets the key only when its
//     fingerprint is the stored one.
//   - A threshold t is crossed when used*100 >= t*Included and t was not
//     crossed before in the period, so it is written once per period even
//     after a release and a new climb.
//   - In throttle mode the tier's rate and the throttle share the subject's
//     rate state: units owed under one carry over to the other (capped at
//     its burst), as on a rate change.
//   - A cost-0 reservation is always Allowed (it is a free request): it
//     reports Used, Throttled and the rate state without spending anything.
//   - Usage lists only hours whose counters are not all zero.
func RunMeter(t *testing.T, open func(t *testing.T) store.Store) {
	client := func(t *testing.T) *meterClient { return newMeterClient(t, open(t), "origin-a") }
	t.Run("BlockExactUnderConcurrency", func(t *testing.T) { testBlockExact(t, client) })
	t.Run("DeniedChangesNothing", func(t *testing.T) { testDenied(t, client) })
	t.Run("BillOverage", func(t *testing.T) { testBill(t, client) })
	t.Run("Throttle", func(t *testing.T) { testThrottle(t, client) })
	t.Run("Settle", func(t *testing.T) { testSettle(t, client) })
	t.Run("Idempotency", func(t *testing.T) { testIdempotency(t, client) })
	t.Run("SubjectsIndependent", func(t *testing.T) { testMeterSubjects(t, client) })
	t.Run("Periods", func(t *testing.T) { testPeriods(t, client) })
	t.Run("UsageHours", func(t *testing.T) { testUsageHours(t, client) })
	t.Run("Thresholds", func(t *testing.T) { testThresholds(t, client) })
	t.Run("CostZeroReports", func(t *testing.T) { testCostZero(t, client) })
	t.Run("RateAndQuota", func(t *testing.T) { testRateAndQuota(t, client) })
	t.Run("Meters", func(t *testing.T) { testMeters(t, client) })
}

// meterClient reserves through one store handle the way one Caddy instance
// does: with its own Origin and a Seq numbered per subject.
type meterClient struct {
	t      *testing.T
	m      store.Meter
	origin string

	mu  sync.Mutex
	seq map[string]int64
}

func newMeterClient(t *testing.T, s store.Store, origin string) *meterClient {
	t.Helper()
	m, ok := s.(store.Meter)
	if !ok {
		t.Fatalf("%T does not implement store.Meter", s)
	}
	return &meterClient{t: t, m: m, origin: origin, seq: map[string]int64{}}
}

// nextSeq numbers a reservation of subject.
func (c *meterClient) nextSeq(subject string) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.seq[subject]++
	return c.seq[subject]
}

// try reserves r, filling in the client's Origin and, for a positive cost
// or meters without one, the next Seq. It may be called from any goroutine.
func (c *meterClient) try(r store.Reservation) (store.Reservation, store.Reserved, error) {
	if r.Origin == "" {
		r.Origin = c.origin
	}
	if (r.Cost > 0 || len(r.Meters) > 0) && r.Seq == 0 {
		r.Seq = c.nextSeq(r.Subject)
	}
	out, err := c.m.Reserve(c.t.Context(), r)
	return r, out, err
}

// reserve is try that fails the test on an error.
func (c *meterClient) reserve(r store.Reservation) (store.Reservation, store.Reserved) {
	c.t.Helper()
	r, out, err := c.try(r)
	if err != nil {
		c.t.Fatalf("Reserve(%s, cost %d): %v", r.Subject, r.Cost, err)
	}
	return r, out
}

// want reserves r and checks the outcome's Allowed, Used and Overage.
func (c *meterClient) want(r store.Reservation, allowed bool, used, overage int64) (store.Reservation, store.Reserved) {
	c.t.Helper()
	r, out := c.reserve(r)
	if out.Allowed != allowed || out.Used != used || out.Overage != overage {
		c.t.Fatalf("Reserve(%s, cost %d, %s %d) = allowed %v used %d overage %d (%+v); want allowed %v used %d overage %d",
			r.Subject, r.Cost, modeName(r.Quota.Mode), r.Quota.Included, out.Allowed, out.Used, out.Overage, out, allowed, used, overage)
	}
	if out.Allowed && out.QuotaExceeded {
		c.t.Errorf("Reserve(%s, cost %d): allowed with QuotaExceeded", r.Subject, r.Cost)
	}
	return r, out
}

// settle settles the reservation r, which recorded out, at actual.
func (c *meterClient) settle(r store.Reservation, out store.Reserved, actual int64) {
	c.t.Helper()
	if err := c.m.Settle(c.t.Context(), settlement(r, out, actual)); err != nil {
		c.t.Fatalf("Settle(%s, reserved %d, actual %d): %v", r.Subject, r.Cost, actual, err)
	}
}

// settlement is the Settlement the module sends for r.
func settlement(r store.Reservation, out store.Reserved, actual int64) store.Settlement {
	return store.Settlement{
		Subject: r.Subject, Quota: r.Quota,
		IdempotencyKey: r.IdempotencyKey, IdempotencyFingerprint: r.IdempotencyFingerprint,
		Reserved: r.Cost, Overage: out.Overage, Actual: actual,
		Origin: r.Origin, Seq: r.Seq,
	}
}

// usage returns the subject's ledger for the period and checks that the
// period totals equal the sum of the hours, in order, none of them empty.
func (c *meterClient) usage(subject, periodID string) store.PeriodUsage {
	c.t.Helper()
	u, err := c.m.Usage(c.t.Context(), subject, periodID)
	if err != nil {
		c.t.Fatalf("Usage(%s, %s): %v", subject, periodID, err)
	}
	if u.PeriodID != periodID {
		c.t.Errorf("Usage(%s, %s).PeriodID = %q", subject, periodID, u.PeriodID)
	}
	var sum store.Counters
	for i, h := range u.Hours {
		if i > 0 && h.HourID <= u.Hours[i-1].HourID {
			c.t.Errorf("Usage(%s) hours out of order: %q after %q", subject, h.HourID, u.Hours[i-1].HourID)
		}
		if h.Counters == (store.Counters{}) {
			c.t.Errorf("Usage(%s) lists hour %s with no usage", subject, h.HourID)
		}
		sum.Billed += h.Billed
		sum.Overage += h.Overage
		sum.Requests += h.Requests
	}
	if sum != u.Counters {
		c.t.Errorf("Usage(%s, %s) totals %+v, but its hours sum to %+v", subject, periodID, u.Counters, sum)
	}
	return u
}

// usageWant checks the period totals of subject.
func (c *meterClient) usageWant(subject, periodID string, want store.Counters) store.PeriodUsage {
	c.t.Helper()
	u := c.usage(subject, periodID)
	if u.Counters != want {
		c.t.Fatalf("Usage(%s, %s) = %+v, want %+v", subject, periodID, u.Counters, want)
	}
	return u
}

// events returns the threshold outbox of subject (all when empty) and
// checks it is ordered oldest first.
func (c *meterClient) events(subject string) []store.ThresholdEvent {
	c.t.Helper()
	evs, err := c.m.ThresholdEvents(c.t.Context(), subject)
	if err != nil {
		c.t.Fatalf("ThresholdEvents(%q): %v", subject, err)
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].At.Before(evs[i-1].At) {
			c.t.Errorf("ThresholdEvents(%q) not oldest first: %v after %v", subject, evs[i].At, evs[i-1].At)
		}
	}
	return evs
}

func modeName(mode string) string {
	if mode == store.QuotaMeter {
		return "meter"
	}
	return mode
}

// periods returns the current calendar month (UTC) and the next one.
func periods() (cur, next metering.Period) {
	var rule metering.PeriodRule
	cur = rule.Period(time.Now(), time.Time{})
	return cur, rule.Period(cur.End, time.Time{})
}

// hourID is the id of the k-th hour of p.
func hourID(p metering.Period, k int) string {
	return metering.TimeID(metering.HourStart(p.Start).Add(time.Duration(k) * time.Hour))
}

// quota is a quota of p in mode with included units, counted in p's first
// hour, with no thresholds.
func quota(p metering.Period, mode string, included int64) store.Quota {
	return store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: hourID(p, 0), Included: included, Mode: mode}
}

// res is a reservation of cost for subject under q, without a rate limit.
func res(subject string, q store.Quota, cost int64) store.Reservation {
	return store.Reservation{Subject: subject, Quota: q, Cost: cost}
}

// withRate returns r limited by p.
func withRate(r store.Reservation, p limiter.Policy) store.Reservation {
	r.Rate = p
	return r
}

// keyRepeats is how many repeats of a key withKey lets be duplicates.
const keyRepeats = 3

// withKey returns r with an idempotency key, the fingerprint "same" and
// keyRepeats unbilled repeats.
func withKey(r store.Reservation, key string) store.Reservation {
	return withKeyFP(r, key, "same")
}

// withKeyFP returns r with an idempotency key and fingerprint fp, and
// keyRepeats unbilled repeats.
func withKeyFP(r store.Reservation, key, fp string) store.Reservation {
	r.IdempotencyKey, r.IdempotencyFingerprint, r.IdempotencyRepeats = key, fp, keyRepeats
	return r
}

// inHour returns r counted in hour k of p.
func inHour(r store.Reservation, p metering.Period, k int) store.Reservation {
	r.Quota.HourID = hourID(p, k)
	return r
}

// outcome is one concurrent reservation's result.
type outcome struct {
	r   store.Reservation
	out store.Reserved
}

// reserveConcurrently sends n reservations made by mk at once, spread over
// clients, and returns their outcomes (errors fail the test).
func reserveConcurrently(t *testing.T, clients []*meterClient, n int, mk func(i int) store.Reservation) []outcome {
	t.Helper()
	results := make([]outcome, n)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			r, out, err := clients[i%len(clients)].try(mk(i))
			if err != nil {
				t.Errorf("Reserve: %v", err)
			}
			results[i] = outcome{r, out}
		})
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return results
}

// admitted sums the cost and counts the admitted reservations.
func admitted(results []outcome) (units, count int64) {
	for _, o := range results {
		if o.out.Allowed {
			units += o.r.Cost
			count++
		}
	}
	return units, count
}

func testBlockExact(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	q := quota(cur, store.QuotaBlock, 100)
	run := func(t *testing.T, clients []*meterClient, cost func(i int) int64, wantUnits, wantCount int64) []outcome {
		t.Helper()
		results := reserveConcurrently(t, clients, 300, func(i int) store.Reservation { return res("acme", q, cost(i)) })
		units, count := admitted(results)
		if units != wantUnits || (wantCount >= 0 && count != wantCount) {
			t.Errorf("300 concurrent reservations against a block quota of 100: admitted %d units in %d requests, want %d units", units, count, wantUnits)
		}
		for _, o := range results {
			if !o.out.Allowed && (!o.out.QuotaExceeded || o.out.Used+o.r.Cost <= 100) {
				t.Errorf("denied reservation of cost %d: %+v; want QuotaExceeded with Used+cost > 100", o.r.Cost, o.out)
				break
			}
			if o.out.Allowed && (o.out.Used > 100 || o.out.Overage != 0) {
				t.Errorf("admitted reservation reports Used %d Overage %d on a block quota of 100", o.out.Used, o.out.Overage)
				break
			}
		}
		clients[0].usageWant("acme", cur.ID(), store.Counters{Billed: units, Requests: count})
		return results
	}
	t.Run("Cost1", func(t *testing.T) {
		results := run(t, []*meterClient{client(t)}, func(int) int64 { return 1 }, 100, 100)
		// Each admission saw a distinct count: exactly 1..100.
		var used []int64
		for _, o := range results {
			if o.out.Allowed {
				used = append(used, o.out.Used)
			}
		}
		slices.Sort(used)
		for i, u := range used {
			if u != int64(i+1) {
				t.Fatalf("admitted reservations reported Used %v, want each of 1..100 once", used)
			}
		}
	})
	t.Run("Cost5", func(t *testing.T) {
		run(t, []*meterClient{client(t)}, func(int) int64 { return 5 }, 100, 20)
	})
	t.Run("MixedCosts", func(t *testing.T) {
		// With 150 cost-1 requests, one of them is denied only once the
		// quota is full, so the admitted units are exactly 100.
		run(t, []*meterClient{client(t)}, func(i int) int64 { return int64(1 + 4*(i%2)) }, 100, -1)
	})
}

func testDenied(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("ByQuota", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 10)
		c.want(res("acme", q, 8), true, 8, 0)
		before := c.usageWant("acme", cur.ID(), store.Counters{Billed: 8, Requests: 1})
		for range 3 {
			_, out := c.want(res("acme", q, 5), false, 8, 0)
			if !out.QuotaExceeded || out.Duplicate || len(out.Crossed) != 0 {
				t.Fatalf("reservation beyond a block quota: %+v; want QuotaExceeded only", out)
			}
		}
		if after := c.usageWant("acme", cur.ID(), store.Counters{Billed: 8, Requests: 1}); !slices.Equal(after.Hours, before.Hours) {
			t.Errorf("denied reservations changed the hours: %+v, then %+v", before.Hours, after.Hours)
		}
		c.want(res("acme", q, 2), true, 10, 0)
		c.want(res("acme", q, 1), false, 10, 0)
	})
	t.Run("ByRate", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		c.want(withRate(res("acme", q, 3), hourly(3, 3)), true, 3, 0)
		for range 3 {
			_, out := c.want(withRate(res("acme", q, 1), hourly(3, 3)), false, 3, 0)
			if out.QuotaExceeded || out.Rate.Allowed || out.Rate.RetryAfter <= 0 || out.Rate.RetryAfter > 20*time.Minute {
				t.Fatalf("reservation beyond a 3/hour rate: %+v; want a rate denial with RetryAfter in (0, 20m]", out)
			}
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
	t.Run("CostExceedsBurst", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		_, out := c.want(withRate(res("acme", q, 6), hourly(10, 5)), false, 0, 0)
		if !out.Rate.CostExceedsBurst {
			t.Errorf("cost 6 on burst 5: %+v; want Rate.CostExceedsBurst", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{})
		c.want(withRate(res("acme", q, 5), hourly(10, 5)), true, 5, 0)
	})
	t.Run("KeepsNoIdempotencyKey", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 5)
		r, out := c.want(res("acme", q, 5), true, 5, 0)
		c.want(withKey(res("acme", q, 1), "retry-1"), false, 5, 0)
		c.settle(r, out, 0)
		// The retry of the denied request is counted, not a duplicate.
		if _, out := c.want(withKey(res("acme", q, 1), "retry-1"), true, 1, 0); out.Duplicate {
			t.Error("a retry of a denied reservation was treated as a duplicate")
		}
	})
}

func testBill(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("OverageIsTheExcess", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		c.want(res("acme", q, 4), true, 4, 0)
		c.want(res("acme", q, 4), true, 8, 0)
		c.want(res("acme", q, 5), true, 13, 3) // straddles the quota
		c.want(res("acme", q, 2), true, 15, 2)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 15, Overage: 5, Requests: 4})
	})
	t.Run("NothingIncluded", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 0)
		c.want(res("acme", q, 3), true, 3, 3)
		c.want(res("acme", q, 1), true, 4, 1)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 4, Overage: 4, Requests: 2})
	})
	t.Run("ExactUnderConcurrency", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		results := reserveConcurrently(t, []*meterClient{c}, 300, func(i int) store.Reservation { return res("acme", q, int64(1+4*(i%2))) })
		units, count := admitted(results)
		var overage int64
		for _, o := range results {
			overage += o.out.Overage
		}
		if count != 300 || units != 900 || overage != 800 {
			t.Errorf("300 concurrent reservations of 900 units on bill 100: admitted %d (%d units), overage %d; want all, overage 800", count, units, overage)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 900, Overage: 800, Requests: 300})
	})
	t.Run("MeterOnly", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaMeter, 0)
		c.want(res("acme", q, 7), true, 7, 0)
		c.want(res("acme", q, 3), true, 10, 0)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 10, Requests: 2})
	})
}

func testThrottle(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("AppliesOnceIncludedIsUsed", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaThrottle, 5)
		q.Throttle = hourly(2, 2)
		check := func(cost int64, throttled, allowed bool, used, overage, remaining int64) store.Reserved {
			t.Helper()
			_, out := c.want(res("acme", q, cost), allowed, used, overage)
			if out.Throttled != throttled || out.QuotaExceeded || (throttled && out.Rate.Remaining != remaining) {
				t.Fatalf("Reserve(cost %d) at used %d = %+v; want Throttled %v, Rate.Remaining %d", cost, used, out, throttled, remaining)
			}
			return out
		}
		check(3, false, true, 3, 0, 0)
		check(3, false, true, 6, 1, 0) // used was 3 < 5: not throttled yet
		check(1, true, true, 7, 1, 1)
		check(1, true, true, 8, 1, 0)
		out := check(1, true, false, 8, 0, 0)
		if out.Rate.Allowed || out.Rate.RetryAfter <= 0 || out.Rate.RetryAfter > 30*time.Minute {
			t.Errorf("denied by the 2/hour throttle: Rate %+v; want RetryAfter in (0, 30m]", out.Rate)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 8, Overage: 3, Requests: 4})
	})
	t.Run("TierRateUntilThen", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaThrottle, 5)
		q.Throttle = hourly(2, 2)
		tier := hourly(100, 100)
		_, out := c.want(withRate(res("acme", q, 4), tier), true, 4, 0)
		if out.Throttled || out.Rate.Remaining != 96 {
			t.Fatalf("under the quota: %+v; want the tier rate (Remaining 96)", out)
		}
		_, out = c.want(withRate(res("acme", q, 1), tier), true, 5, 0)
		if out.Throttled || out.Rate.Remaining != 95 {
			t.Fatalf("reaching the quota: %+v; want the tier rate (Remaining 95)", out)
		}
		// The 5 units owed under the tier rate carry over to the throttle,
		// capped at its burst of 2: nothing is left.
		_, out = c.want(withRate(res("acme", q, 0), tier), true, 5, 0)
		if !out.Throttled || out.Rate.Remaining != 0 {
			t.Fatalf("state at the quota: %+v; want Throttled with Remaining 0", out)
		}
		_, out = c.want(withRate(res("acme", q, 1), tier), false, 5, 0)
		if !out.Throttled || out.QuotaExceeded || out.Rate.RetryAfter <= 0 {
			t.Fatalf("beyond the quota with the throttle spent: %+v; want a throttle denial", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 5, Requests: 2})
	})
}

func testSettle(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("ReleaseTakesEverythingBack", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		r1, out1 := c.want(inHour(withKey(res("acme", q, 8), "k1"), cur, 0), true, 8, 0)
		r2, out2 := c.want(inHour(res("acme", q, 5), cur, 1), true, 13, 3)
		c.settle(r2, out2, 0)
		u := c.usageWant("acme", cur.ID(), store.Counters{Billed: 8, Requests: 1})
		if len(u.Hours) != 1 || u.Hours[0].HourID != hourID(cur, 0) {
			t.Errorf("hours after releasing the only reservation of hour 1: %+v; want hour 0 only", u.Hours)
		}
		c.settle(r1, out1, 0)
		if u := c.usageWant("acme", cur.ID(), store.Counters{}); len(u.Hours) != 0 {
			t.Errorf("hours after releasing everything: %+v; want none", u.Hours)
		}
		// The released key is forgotten: a retry is billed.
		if _, out := c.want(withKey(res("acme", q, 8), "k1"), true, 8, 0); out.Duplicate {
			t.Error("retry after a released reservation was a duplicate; want it billed")
		}
	})
	t.Run("ReleaseFreesBlockQuota", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 10)
		r, out := c.want(res("acme", q, 10), true, 10, 0)
		c.want(res("acme", q, 1), false, 10, 0)
		c.settle(r, out, 0)
		c.want(res("acme", q, 10), true, 10, 0)
	})
	t.Run("ActualAboveReserved", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		r, out := c.want(res("acme", q, 8), true, 8, 0)
		c.settle(r, out, 12)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 12, Overage: 2, Requests: 1})
		c.want(res("acme", q, 1), true, 13, 1)
	})
	t.Run("ActualBelowReserved", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		c.want(res("acme", q, 8), true, 8, 0)
		r, out := c.want(res("acme", q, 5), true, 13, 3)
		c.settle(r, out, 4) // one overage unit remains
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 12, Overage: 2, Requests: 2})
		r, out = c.want(res("acme", q, 3), true, 15, 3)
		c.settle(r, out, 1) // the released units were all overage
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 13, Overage: 3, Requests: 3})
	})
	t.Run("ReleaseBelowQuotaKeepsOverageTheExcess", func(t *testing.T) {
		// A reservation made below the quota is released after a later
		// one was counted as overage: billed usage is back within the
		// quota, so there is no overage any more.
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		c.want(res("acme", q, 9), true, 9, 0)
		r, out := c.want(res("acme", q, 1), true, 10, 0)
		c.want(res("acme", q, 1), true, 11, 1)
		c.settle(r, out, 0)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 10, Overage: 0, Requests: 2})
		// And a partial release of an under-quota reservation likewise.
		r, out = c.want(res("acme", q, 4), true, 14, 4)
		c.want(res("acme", q, 2), true, 16, 2)
		c.settle(r, out, 1)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 13, Overage: 3, Requests: 4})
	})
	t.Run("ActualBelowKeepsIdempotencyKey", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		r, out := c.want(withKey(res("acme", q, 3), "k1"), true, 3, 0)
		c.settle(r, out, 2)
		if _, out := c.want(withKey(res("acme", q, 3), "k1"), true, 2, 0); !out.Duplicate {
			t.Error("retry of a billed (adjusted) reservation was not a duplicate")
		}
	})
	t.Run("AddedUnitsCrossThresholds", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		q.Thresholds = []int{80, 100, 120}
		r, out := c.want(res("acme", q, 5), true, 5, 0)
		c.settle(r, out, 10)
		u := c.usageWant("acme", cur.ID(), store.Counters{Billed: 10, Requests: 1})
		if !slices.Equal(u.Thresholds, []int{80, 100}) {
			t.Errorf("thresholds after a settlement raised usage to 100%%: %v, want [80 100]", u.Thresholds)
		}
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 10, 10}, {"acme", cur.ID(), 100, 10, 10}})
	})
}

func testIdempotency(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("DuplicateNotCounted", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		q.Thresholds = []int{1}
		c.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0)
		for range keyRepeats {
			_, out := c.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0)
			if !out.Duplicate || len(out.Crossed) != 0 || out.Overage != 0 {
				t.Fatalf("retry with the same key: %+v; want a Duplicate", out)
			}
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
	t.Run("RepeatsBounded", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		c.want(withKey(res("acme", q, 2), "retry-1"), true, 2, 0)
		for range keyRepeats {
			c.want(withKey(res("acme", q, 2), "retry-1"), true, 2, 0)
		}
		// Beyond keyRepeats, every repeat is billed.
		for i := range 3 {
			if _, out := c.want(withKey(res("acme", q, 2), "retry-1"), true, int64(4+2*i), 0); out.Duplicate {
				t.Fatalf("repeat %d of a key allowing %d: a Duplicate", keyRepeats+1+i, keyRepeats)
			}
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 8, Requests: 4})
	})
	t.Run("RepeatIsRateLimited", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		rate := hourly(3, 3)
		c.want(withRate(withKey(res("acme", q, 1), "retry-1"), rate), true, 1, 0)
		for i := range 2 {
			_, out := c.want(withRate(withKey(res("acme", q, 1), "retry-1"), rate), true, 1, 0)
			if !out.Duplicate || !out.Rate.Allowed || out.Rate.Remaining != int64(1-i) {
				t.Fatalf("repeat %d within the rate: %+v; want a Duplicate spending one unit (remaining %d)", i+1, out, 1-i)
			}
		}
		// The repeats spent the rate: the next one is denied.
		_, out := c.want(withRate(withKey(res("acme", q, 1), "retry-1"), rate), false, 1, 0)
		if out.Duplicate || out.Rate.Allowed || out.Rate.RetryAfter <= 0 {
			t.Errorf("repeat beyond the rate: %+v; want a rate denial", out)
		}
		c.want(withRate(res("acme", q, 1), rate), false, 1, 0)
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 1, Requests: 1})
	})
	t.Run("RepeatIsThrottled", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaThrottle, 2)
		q.Throttle = hourly(1, 1)
		c.want(withKey(res("acme", q, 2), "retry-1"), true, 2, 0)
		_, out := c.want(withKey(res("acme", q, 2), "retry-1"), false, 2, 0)
		if !out.Throttled || out.Duplicate {
			t.Errorf("repeat of cost 2 over a throttle of burst 1: %+v; want a throttled denial", out)
		}
	})
	t.Run("RepeatBlockedWhenQuotaUsedUp", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 3)
		c.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0)
		if _, out := c.want(withKey(res("acme", q, 3), "retry-1"), false, 3, 0); !out.QuotaExceeded || out.Duplicate {
			t.Errorf("retry with the same key on a used-up quota: %+v; want QuotaExceeded", out)
		}
	})
	t.Run("OtherRequestBilled", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		c.want(withKeyFP(res("acme", q, 2), "k", "a"), true, 2, 0)
		if _, out := c.want(withKeyFP(res("acme", q, 2), "k", "b"), true, 4, 0); out.Duplicate {
			t.Error("another request with the key was a Duplicate")
		}
		if _, out := c.want(withKeyFP(res("acme", q, 2), "k", ""), true, 6, 0); out.Duplicate {
			t.Error("a request without a fingerprint was a Duplicate")
		}
		// The key still belongs to the first request.
		if _, out := c.want(withKeyFP(res("acme", q, 2), "k", "a"), true, 6, 0); !out.Duplicate {
			t.Errorf("a repeat of the first request: %+v; want a Duplicate", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 6, Requests: 3})
	})
	t.Run("ReleaseForgetsOnlyItsOwnKey", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		c.want(withKeyFP(res("acme", q, 2), "k", "a"), true, 2, 0)
		r, out := c.want(withKeyFP(res("acme", q, 2), "k", "b"), true, 4, 0)
		c.settle(r, out, 0)
		if _, out := c.want(withKeyFP(res("acme", q, 2), "k", "a"), true, 2, 0); !out.Duplicate {
			t.Error("releasing another request with the key forgot the key")
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 1})
	})
	t.Run("WindowExpires", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		short := func(r store.Reservation) store.Reservation {
			r.IdempotencyWindow = time.Second
			return r
		}
		c.want(short(withKey(res("acme", q, 2), "retry-1")), true, 2, 0)
		if _, out := c.want(short(withKey(res("acme", q, 2), "retry-1")), true, 2, 0); !out.Duplicate {
			t.Fatal("repeat within the window: not a Duplicate")
		}
		time.Sleep(1100 * time.Millisecond) // the window is 1s
		if _, out := c.want(short(withKey(res("acme", q, 2), "retry-1")), true, 4, 0); out.Duplicate {
			t.Error("repeat after the window: a Duplicate")
		}
		// The billed repeat stored the key again, with a fresh count.
		if _, out := c.want(short(withKey(res("acme", q, 2), "retry-1")), true, 4, 0); !out.Duplicate {
			t.Error("repeat of the re-stored key: not a Duplicate")
		}
	})
	t.Run("PerSubject", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		c.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0)
		if _, out := c.want(withKey(res("globex", q, 3), "retry-1"), true, 3, 0); out.Duplicate {
			t.Error("another subject's reservation with the same key was a duplicate")
		}
	})
	t.Run("ConcurrentRetries", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		results := reserveConcurrently(t, []*meterClient{c}, 50, func(int) store.Reservation { return withKey(res("acme", q, 2), "retry-1") })
		dups := 0
		for _, o := range results {
			if !o.out.Allowed {
				t.Fatalf("a retry was denied: %+v", o.out)
			}
			if o.out.Duplicate {
				dups++
			}
		}
		if dups != keyRepeats {
			t.Errorf("50 concurrent reservations with one key: %d duplicates, want %d", dups, keyRepeats)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 2 * (50 - keyRepeats), Requests: 50 - keyRepeats})
	})
}

func testMeterSubjects(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	c := client(t)
	q := quota(cur, store.QuotaBlock, 5)
	c.want(res("acme", q, 5), true, 5, 0)
	c.want(res("acme", q, 1), false, 5, 0)
	c.want(res("globex", q, 4), true, 4, 0)
	c.want(res("acme", q, 1), false, 5, 0)
	c.want(res("globex", q, 1), true, 5, 0)
	c.usageWant("acme", cur.ID(), store.Counters{Billed: 5, Requests: 1})
	c.usageWant("globex", cur.ID(), store.Counters{Billed: 5, Requests: 2})
}

func testPeriods(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, next := periods()
	c := client(t)
	q := quota(cur, store.QuotaBill, 5)
	c.want(res("acme", q, 7), true, 7, 2)
	nq := quota(next, store.QuotaBill, 5)
	c.want(res("acme", nq, 3), true, 3, 0)
	c.want(res("acme", nq, 3), true, 6, 1)
	c.usageWant("acme", cur.ID(), store.Counters{Billed: 7, Overage: 2, Requests: 1})
	u := c.usageWant("acme", next.ID(), store.Counters{Billed: 6, Overage: 1, Requests: 2})
	if len(u.Hours) != 1 || u.Hours[0].HourID != hourID(next, 0) {
		t.Errorf("hours of the new period: %+v; want its first hour only", u.Hours)
	}
}

func testUsageHours(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("InOrder", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		c.want(inHour(res("acme", q, 5), cur, 0), true, 5, 0)
		r, out := c.want(inHour(res("acme", q, 4), cur, 2), true, 9, 0)
		c.settle(r, out, 0)
		c.want(inHour(res("acme", q, 2), cur, 3), true, 7, 0)
		c.want(inHour(res("acme", q, 7), cur, 1), true, 14, 4)
		c.want(inHour(res("acme", q, 1), cur, 3), true, 15, 1)
		u := c.usageWant("acme", cur.ID(), store.Counters{Billed: 15, Overage: 5, Requests: 4})
		want := []store.HourUsage{
			{HourID: hourID(cur, 0), Counters: store.Counters{Billed: 5, Requests: 1}},
			{HourID: hourID(cur, 1), Counters: store.Counters{Billed: 7, Overage: 4, Requests: 1}},
			{HourID: hourID(cur, 3), Counters: store.Counters{Billed: 3, Overage: 1, Requests: 2}},
		}
		if !slices.Equal(u.Hours, want) {
			t.Errorf("hours:\n got  %+v\n want %+v", u.Hours, want)
		}
	})
	t.Run("Unknown", func(t *testing.T) {
		c := client(t)
		u := c.usageWant("nobody", cur.ID(), store.Counters{})
		if len(u.Hours) != 0 || len(u.Thresholds) != 0 {
			t.Errorf("Usage of an unknown subject: %+v; want nothing", u)
		}
	})
}

// wantEvent is the expected content of a threshold event.
type wantEvent struct {
	subject, period string
	threshold       int
	used, included  int64
}

// checkEvents compares events with want, in order, and checks their ids and
// that each was written within a minute of now.
func checkEvents(t *testing.T, got []store.ThresholdEvent, want []wantEvent) {
	t.Helper()
	ok := len(got) == len(want)
	for i := 0; ok && i < len(got); i++ {
		g, w := got[i], want[i]
		ok = g.Subject == w.subject && g.PeriodID == w.period && g.Threshold == w.threshold &&
			g.Used == w.used && g.Included == w.included &&
			g.ID == fmt.Sprintf("%s|%s|%d", w.subject, w.period, w.threshold)
	}
	if !ok {
		t.Fatalf("threshold events:\n got  %+v\n want %+v", got, want)
	}
	for _, g := range got {
		checkNear(t, "threshold event time", g.At)
	}
}

func testThresholds(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, next := periods()
	thresholds := func(q store.Quota) store.Quota {
		q.Thresholds = []int{80, 100, 120}
		return q
	}
	crossed := func(t *testing.T, c *meterClient, r store.Reservation, want ...int) (store.Reservation, store.Reserved) {
		t.Helper()
		r, out := c.reserve(r)
		if !out.Allowed || !slices.Equal(out.Crossed, want) {
			t.Fatalf("Reserve(%s, cost %d) = %+v; want allowed, crossing %v", r.Subject, r.Cost, out, want)
		}
		return r, out
	}
	t.Run("EachOnceInOrder", func(t *testing.T) {
		c := client(t)
		q := thresholds(quota(cur, store.QuotaBill, 100))
		crossed(t, c, res("acme", q, 79))
		crossed(t, c, res("acme", q, 1), 80)
		crossed(t, c, res("acme", q, 50), 100, 120) // one reservation, two thresholds
		crossed(t, c, res("acme", q, 10))
		u := c.usage("acme", cur.ID())
		if !slices.Equal(u.Thresholds, []int{80, 100, 120}) {
			t.Errorf("Usage.Thresholds = %v, want [80 100 120]", u.Thresholds)
		}
		checkEvents(t, c.events("acme"), []wantEvent{
			{"acme", cur.ID(), 80, 80, 100}, {"acme", cur.ID(), 100, 130, 100}, {"acme", cur.ID(), 120, 130, 100},
		})
	})
	t.Run("BlockReachesExactly", func(t *testing.T) {
		c := client(t)
		q := thresholds(quota(cur, store.QuotaBlock, 10))
		crossed(t, c, res("acme", q, 8), 80)
		crossed(t, c, res("acme", q, 2), 100)
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 8, 10}, {"acme", cur.ID(), 100, 10, 10}})
	})
	t.Run("NeverAgainInPeriod", func(t *testing.T) {
		c := client(t)
		q := thresholds(quota(cur, store.QuotaBill, 100))
		r, out := crossed(t, c, res("acme", q, 85), 80)
		c.settle(r, out, 0)
		crossed(t, c, res("acme", q, 85))
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 85, 100}})
	})
	t.Run("AgainInNewPeriod", func(t *testing.T) {
		c := client(t)
		crossed(t, c, res("acme", thresholds(quota(cur, store.QuotaBill, 100)), 90), 80)
		crossed(t, c, res("acme", thresholds(quota(next, store.QuotaBill, 100)), 95), 80)
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 90, 100}, {"acme", next.ID(), 80, 95, 100}})
		if u := c.usage("acme", next.ID()); !slices.Equal(u.Thresholds, []int{80}) {
			t.Errorf("Usage.Thresholds of the new period = %v, want [80]", u.Thresholds)
		}
	})
	t.Run("FilterBySubject", func(t *testing.T) {
		c := client(t)
		q := thresholds(quota(cur, store.QuotaBill, 10))
		crossed(t, c, res("acme", q, 8), 80)
		crossed(t, c, res("globex", q, 10), 80, 100)
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 8, 10}})
		checkEvents(t, c.events("globex"), []wantEvent{{"globex", cur.ID(), 80, 10, 10}, {"globex", cur.ID(), 100, 10, 10}})
		if evs := c.events("initech"); len(evs) != 0 {
			t.Errorf("ThresholdEvents of a subject without any: %+v", evs)
		}
		all := c.events("")
		var ids []string
		for _, e := range all {
			ids = append(ids, e.ID)
		}
		slices.Sort(ids)
		want := []string{"acme|" + cur.ID() + "|80", "globex|" + cur.ID() + "|100", "globex|" + cur.ID() + "|80"}
		if !slices.Equal(ids, want) {
			t.Errorf("ThresholdEvents of all subjects: ids %q, want %q", ids, want)
		}
	})
	t.Run("OnceUnderConcurrency", func(t *testing.T) {
		c := client(t)
		q := thresholds(quota(cur, store.QuotaBill, 100))
		results := reserveConcurrently(t, []*meterClient{c}, 300, func(int) store.Reservation { return res("acme", q, 1) })
		var all []int
		for _, o := range results {
			all = append(all, o.out.Crossed...)
		}
		slices.Sort(all)
		if !slices.Equal(all, []int{80, 100, 120}) {
			t.Errorf("300 concurrent cost-1 reservations crossed %v, want 80, 100 and 120 once each", all)
		}
		checkEvents(t, c.events("acme"), []wantEvent{
			{"acme", cur.ID(), 80, 80, 100}, {"acme", cur.ID(), 100, 100, 100}, {"acme", cur.ID(), 120, 120, 100},
		})
	})
	t.Run("ReachedBeforeATierChange", func(t *testing.T) {
		// 90 units counted without thresholds (another tier), then a tier
		// with 100 included and thresholds: 80 is reached and was never
		// crossed, so the next growth crosses it.
		c := client(t)
		crossed(t, c, res("acme", quota(cur, store.QuotaMeter, 0), 90))
		crossed(t, c, res("acme", thresholds(quota(cur, store.QuotaBill, 100)), 1), 80)
		checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 80, 91, 100}})
	})
	t.Run("NoneWithoutIncludedUnits", func(t *testing.T) {
		c := client(t)
		crossed(t, c, res("acme", thresholds(quota(cur, store.QuotaBill, 0)), 10))
		crossed(t, c, res("acme", quota(cur, store.QuotaBill, 10), 20)) // no thresholds configured
		if evs := c.events(""); len(evs) != 0 {
			t.Errorf("threshold events without included units or thresholds: %+v", evs)
		}
	})
}

func testCostZero(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	c := client(t)
	q := quota(cur, store.QuotaBlock, 5)
	q.Thresholds = []int{50}
	rate := hourly(10, 10)
	if _, out := c.want(withRate(res("acme", q, 0), rate), true, 0, 0); out.Rate.Remaining != 10 {
		t.Errorf("cost 0 on an untouched subject: %+v; want Rate.Remaining 10", out)
	}
	c.want(withRate(res("acme", q, 2), rate), true, 2, 0)
	for range 3 {
		_, out := c.want(withRate(res("acme", q, 0), rate), true, 2, 0)
		if out.Rate.Remaining != 8 || !out.Rate.Allowed || out.Duplicate || len(out.Crossed) != 0 {
			t.Fatalf("cost 0: %+v; want the state reported (Remaining 8) and nothing else", out)
		}
	}
	c.want(withRate(res("acme", q, 3), rate), true, 5, 0)
	// A free request is admitted even with the quota used up.
	if _, out := c.want(withRate(res("acme", q, 0), rate), true, 5, 0); out.QuotaExceeded {
		t.Errorf("cost 0 on a used-up quota: %+v; want admitted", out)
	}
	c.usageWant("acme", cur.ID(), store.Counters{Billed: 5, Requests: 2})
	checkEvents(t, c.events("acme"), []wantEvent{{"acme", cur.ID(), 50, 5, 5}})
	// And beyond it (a reported cost above the reserved one): the rule
	// store.Reservation.Admit writes for the Go deciders.
	r, out := c.reserve(res("over", quota(cur, store.QuotaBlock, 5), 5))
	c.settle(r, out, 7)
	if _, out := c.reserve(res("over", quota(cur, store.QuotaBlock, 5), 0)); !out.Allowed || out.QuotaExceeded || out.Used != 7 {
		t.Errorf("cost 0 beyond a block quota (7 of 5 used): %+v; want admitted, used 7", out)
	}
}

func testRateAndQuota(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("QuotaDenialSpendsNoRate", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 3)
		rate := hourly(10, 10)
		c.want(withRate(res("acme", q, 3), rate), true, 3, 0)
		for range 3 {
			c.want(withRate(res("acme", q, 1), rate), false, 3, 0)
		}
		if _, out := c.want(withRate(res("acme", q, 0), rate), true, 3, 0); out.Rate.Remaining != 7 {
			t.Errorf("rate state after quota denials: %+v; want Remaining 7 (nothing spent)", out.Rate)
		}
	})
	t.Run("QuotaReportedFirst", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBlock, 3)
		c.want(withRate(res("acme", q, 3), hourly(3, 3)), true, 3, 0)
		if _, out := c.want(withRate(res("acme", q, 1), hourly(3, 3)), false, 3, 0); !out.QuotaExceeded {
			t.Errorf("rate and quota both used up: %+v; want QuotaExceeded", out)
		}
	})
	t.Run("ExactUnderConcurrency", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		results := reserveConcurrently(t, []*meterClient{c}, 300, func(int) store.Reservation {
			return withRate(res("acme", q, 1), hourly(50, 50))
		})
		if units, _ := admitted(results); units != 50 {
			t.Errorf("300 concurrent cost-1 reservations on 50/hour: admitted %d, want 50", units)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 50, Requests: 50})
	})
}

// RunMeterShared runs the metering checks for stores shared by several
// instances. open must return two handles on one fresh, empty shared store
// (as two Caddy instances hold), both implementing store.Meter, and
// register cleanup for both. Reservations through a carry Origin
// "origin-a", through b "origin-b".
//
// Besides one quota, one idempotency key space and one outbox for both
// handles, it checks the replay rules of store.Reservation and
// store.Settlement, including these decisions:
//
//   - A Replay that is not applied (its (Origin, Seq) was already reserved
//     or settled) is reported Allowed and Duplicate, and changes nothing.
//   - A Replay is deduplicated against its idempotency key too.
//   - A Replay whose Seq is store.SeqWindow or more below the highest Seq
//     the store saw for (Subject, Origin) is not applied: the store cannot
//     tell, and an entry can only fall that far behind when its call's
//     outcome was unknown while later calls of the same instance
//     succeeded, so it most likely ran. (The module replays its spool in
//     order before new reservations of the subject, so this does not
//     happen in normal operation.)
//   - Non-Replay settlements are always applied; a non-Replay reservation
//     is applied unless its Seq is already marked in the window (a void,
//     or its own Replay, came first).
//   - A void (store.Settlement.Void) takes back what its reservation
//     counted, or, sent first, makes the reservation count nothing.
func RunMeterShared(t *testing.T, open func(t *testing.T) (a, b store.Store)) {
	clients := func(t *testing.T) (ca, cb *meterClient) {
		a, b := open(t)
		return newMeterClient(t, a, "origin-a"), newMeterClient(t, b, "origin-b")
	}
	cur, _ := periods()
	t.Run("QuotaExact", func(t *testing.T) {
		for _, tc := range []struct {
			name  string
			cost  func(i int) int64
			count int64
		}{
			{"Cost1", func(int) int64 { return 1 }, 100},
			{"Cost5", func(int) int64 { return 5 }, 20},
			{"MixedCosts", func(i int) int64 { return int64(1 + 4*(i/2%2)) }, -1},
		} {
			t.Run(tc.name, func(t *testing.T) {
				ca, cb := clients(t)
				q := quota(cur, store.QuotaBlock, 100)
				results := reserveConcurrently(t, []*meterClient{ca, cb}, 300, func(i int) store.Reservation { return res("acme", q, tc.cost(i)) })
				units, count := admitted(results)
				if units != 100 || (tc.count >= 0 && count != tc.count) {
					t.Errorf("300 concurrent reservations through two handles against a block quota of 100: admitted %d units in %d requests, want 100 units", units, count)
				}
				ua := ca.usageWant("acme", cur.ID(), store.Counters{Billed: units, Requests: count})
				if ub := cb.usage("acme", cur.ID()); !slices.Equal(ub.Hours, ua.Hours) || ub.Counters != ua.Counters {
					t.Errorf("handles disagree on Usage: %+v and %+v", ua, ub)
				}
			})
		}
	})
	t.Run("BillExact", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		results := reserveConcurrently(t, []*meterClient{ca, cb}, 300, func(i int) store.Reservation { return res("acme", q, int64(1+2*(i%3))) })
		var overage int64
		for _, o := range results {
			overage += o.out.Overage
		}
		units, count := admitted(results)
		if count != 300 || units != 900 || overage != 800 {
			t.Errorf("300 concurrent reservations through two handles on bill 100: admitted %d (%d units), overage %d; want all 900 units, overage 800", count, units, overage)
		}
		cb.usageWant("acme", cur.ID(), store.Counters{Billed: 900, Overage: 800, Requests: 300})
	})
	t.Run("IdempotencyAcrossHandles", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(withKey(res("acme", q, 4), "retry-1"), true, 4, 0)
		if _, out := cb.want(withKey(res("acme", q, 4), "retry-1"), true, 4, 0); !out.Duplicate {
			t.Errorf("retry through the other handle: %+v; want a Duplicate", out)
		}
	})
	t.Run("ThresholdsOnceAcrossHandles", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		q.Thresholds = []int{80, 100, 120}
		reserveConcurrently(t, []*meterClient{ca, cb}, 300, func(int) store.Reservation { return res("acme", q, 1) })
		checkEvents(t, cb.events(""), []wantEvent{
			{"acme", cur.ID(), 80, 80, 100}, {"acme", cur.ID(), 100, 100, 100}, {"acme", cur.ID(), 120, 120, 100},
		})
	})
	t.Run("Replay", func(t *testing.T) { testReplay(t, clients) })
	t.Run("Void", func(t *testing.T) { testVoid(t, clients) })
	t.Run("Meters", func(t *testing.T) { testMetersShared(t, clients) })
}

// replayed marks r, as reserved by a, as a Replay (sent through any handle).
func replayed(r store.Reservation) store.Reservation {
	r.Replay = true
	return r
}

// settleReplay sends the settlement of r at actual as a Replay.
func settleReplay(t *testing.T, c *meterClient, r store.Reservation, out store.Reserved, actual int64) {
	t.Helper()
	s := settlement(r, out, actual)
	s.Replay = true
	if err := c.m.Settle(t.Context(), s); err != nil {
		t.Fatalf("Settle(replay of %s seq %d): %v", r.Origin, r.Seq, err)
	}
}

func testReplay(t *testing.T, clients func(t *testing.T) (ca, cb *meterClient)) {
	cur, _ := periods()
	// spooled is a reservation of a that never reached the store: it has
	// a's Origin and the next Seq.
	spooled := func(ca *meterClient, r store.Reservation) store.Reservation {
		r.Origin = ca.origin
		r.Seq = ca.nextSeq(r.Subject)
		r.Replay = true
		return r
	}
	dupWant := func(t *testing.T, c *meterClient, r store.Reservation, used int64) {
		t.Helper()
		if _, out := c.want(r, true, used, 0); !out.Duplicate {
			t.Fatalf("Replay of %s seq %d: %+v; want not applied (Duplicate)", r.Origin, r.Seq, out)
		}
	}
	t.Run("ReservedNotAppliedAgain", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		r, _ := ca.want(res("acme", q, 3), true, 3, 0)
		dupWant(t, cb, replayed(r), 3)
		dupWant(t, ca, replayed(r), 3)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
	t.Run("UnseenAppliedOnce", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBlock, 5)
		ca.want(res("acme", q, 5), true, 5, 0)
		// Served while the store was unreachable: never denied, even
		// beyond the block quota.
		r := spooled(ca, res("acme", q, 4))
		if _, out := cb.reserve(r); !out.Allowed || out.Duplicate || out.QuotaExceeded || out.Used != 9 {
			t.Fatalf("Replay of an unseen seq beyond a used-up block quota: %+v; want applied, Used 9", out)
		}
		dupWant(t, cb, r, 9)
		// (Whether a block quota's excess is recorded as overage is left
		// to the store.)
		if u := ca.usage("acme", cur.ID()); u.Billed != 9 || u.Requests != 2 {
			t.Errorf("Usage after the Replay = %+v, want 9 units in 2 requests", u.Counters)
		}
	})
	t.Run("BillOverage", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 5)
		ca.want(res("acme", q, 4), true, 4, 0)
		cb.want(spooled(ca, res("acme", q, 3)), true, 7, 2)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 7, Overage: 2, Requests: 2})
	})
	t.Run("TouchesNoRateState", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		rate := hourly(10, 10)
		cb.want(withRate(spooled(ca, res("acme", q, 5)), rate), true, 5, 0)
		if _, out := ca.want(withRate(res("acme", q, 0), rate), true, 5, 0); out.Rate.Remaining != 10 {
			t.Errorf("rate state after a Replay: %+v; want Remaining 10 (untouched)", out.Rate)
		}
		ca.want(withRate(res("acme", q, 10), rate), true, 15, 0)
		// The rate is spent; a Replay is still applied.
		cb.want(withRate(spooled(ca, res("acme", q, 2)), rate), true, 17, 0)
	})
	t.Run("SettlementAppliedOnce", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(res("acme", q, 2), true, 2, 0)
		r, out := ca.want(withKey(res("acme", q, 5), "retry-1"), true, 7, 0)
		for range 2 {
			settleReplay(t, cb, r, out, 0)
			ca.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 1})
		}
		// Released: the key is forgotten.
		if _, out := ca.want(withKey(res("acme", q, 5), "retry-1"), true, 7, 0); out.Duplicate {
			t.Error("retry after a replayed release was a duplicate")
		}
	})
	t.Run("SettlementAfterLiveSettlementNotApplied", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		r, out := ca.want(res("acme", q, 5), true, 5, 0)
		ca.settle(r, out, 3)
		settleReplay(t, cb, r, out, 3)
		dupWant(t, cb, replayed(r), 3)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
	})
	t.Run("SettlementOfUnreservedNotApplied", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(res("acme", q, 5), true, 5, 0)
		r := spooled(ca, res("acme", q, 4)) // never reserved
		settleReplay(t, cb, r, store.Reserved{}, 0)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 5, Requests: 1})
		// Reserving it later still works, and then its settlement applies.
		_, out := cb.want(r, true, 9, 0)
		settleReplay(t, cb, r, out, 1)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 6, Requests: 2})
	})
	t.Run("InterruptedSpoolReplayedAgain", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 10)
		q.Thresholds = []int{100}
		ca.want(res("acme", q, 1), true, 1, 0)
		var spool []store.Reservation
		for _, cost := range []int64{2, 3, 4, 5, 6} {
			spool = append(spool, spooled(ca, res("acme", q, cost)))
		}
		replay := func(n int) {
			for i, r := range spool[:n] {
				_, out := cb.reserve(r)
				if i == 2 { // the third response was not billable
					settleReplay(t, cb, r, out, 0)
				}
			}
		}
		replay(3) // interrupted
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 6, Requests: 3})
		replay(5) // restarted from the beginning
		replay(5) // and once more
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 17, Overage: 7, Requests: 5})
		checkEvents(t, ca.events("acme"), []wantEvent{{"acme", cur.ID(), 100, 10, 10}})
	})
	t.Run("LiveReservationsKeepWorking", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 1000)
		// Seqs are taken in order but arrive in any order.
		results := reserveConcurrently(t, []*meterClient{ca}, 200, func(int) store.Reservation { return res("acme", q, 1) })
		if _, count := admitted(results); count != 200 {
			t.Fatalf("admitted %d of 200 live reservations with increasing seqs, want all", count)
		}
		for _, o := range results {
			if o.out.Duplicate {
				t.Fatalf("a live reservation was a duplicate: %+v", o)
			}
		}
		last := results[0].r
		last.Seq = 200
		dupWant(t, cb, replayed(last), 200)
		cb.want(spooled(ca, res("acme", q, 1)), true, 201, 0) // seq 201
		ca.want(res("acme", q, 1), true, 202, 0)              // seq 202, live
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 202, Requests: 202})
	})
	t.Run("GapInWindowApplied", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		var missed store.Reservation
		for i := range 10 {
			r := res("acme", q, 1)
			r.Seq = ca.nextSeq("acme")
			if i == 4 {
				missed = r // its call never reached the store
				continue
			}
			ca.reserve(r)
		}
		cb.want(replayed(missed), true, 10, 0)
		dupWant(t, cb, replayed(missed), 10)
	})
	t.Run("OutOfWindowNotApplied", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 1000)
		// Seq 1 never reaches the store; SeqWindow later ones do, so seq 1
		// falls out of the window: its Replay is not applied.
		lost := spooled(ca, res("acme", q, 1))
		for range store.SeqWindow {
			ca.reserve(res("acme", q, 1))
		}
		dupWant(t, cb, lost, store.SeqWindow)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: store.SeqWindow, Requests: store.SeqWindow})
	})
	t.Run("IdempotencyKeyChecked", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0)
		r := spooled(ca, withKey(res("acme", q, 3), "retry-1"))
		_, out := cb.want(r, true, 3, 0)
		if !out.Duplicate {
			t.Fatalf("Replay with a held idempotency key: %+v; want a Duplicate", out)
		}
		// Its settlement has nothing to correct, and keeps the key held.
		settleReplay(t, cb, r, out, 0)
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 3, Requests: 1})
		if _, out := ca.want(withKey(res("acme", q, 3), "retry-1"), true, 3, 0); !out.Duplicate {
			t.Error("the key was released by the settlement of a duplicate Replay")
		}
	})
	t.Run("OriginsIndependent", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		ca.want(res("acme", q, 3), true, 3, 0) // origin-a seq 1
		cb.want(spooled(cb, res("acme", q, 4)), true, 7, 0)
		r := res("acme", q, 5)
		r.Origin, r.Seq, r.Replay = "origin-b", 1, true
		dupWant(t, ca, r, 7)
	})
}
