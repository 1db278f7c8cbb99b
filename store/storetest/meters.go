package storetest

import (
	"slices"
	"sync"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// The contract of reservations with several meters (store.Reservation's
// Meters). Besides the doc comments of store.MeterReservation and
// store.MeterSettlement, the suite pins these decisions:
//
//   - A meter's Requests counts the requests that added units to it: a
//     reservation with a positive Amount, a settlement raising 0 reserved
//     units to more; a settlement taking all of a meter's units back takes
//     its request back.
//   - Overage per meter follows the default meter's rules
//     (metering.Overage, released units off the reservation's overage
//     first), per the meter's Included and Mode.
//   - A meter's threshold event has the ID store.ThresholdEventID(subject,
//     period, threshold, meter) and its Meter set.

// mres is a reservation of cost for subject under q with meters ms.
func mres(subject string, q store.Quota, cost int64, ms ...store.MeterReservation) store.Reservation {
	r := res(subject, q, cost)
	r.Meters = ms
	return r
}

// mq is a meter reservation of amount under mode with included units.
func mq(name, mode string, amount, included int64, thresholds ...int) store.MeterReservation {
	return store.MeterReservation{Meter: name, Mode: mode, Amount: amount, Included: included, Thresholds: thresholds}
}

// msettlement is the Settlement the module sends for r (which recorded
// out) when the default meter's final amount is actual and the meters'
// are actuals (by name; a meter not named keeps its reserved amount).
func msettlement(r store.Reservation, out store.Reserved, actual int64, actuals map[string]int64) store.Settlement {
	s := settlement(r, out, actual)
	for i, m := range r.Meters {
		a, ok := actuals[m.Meter]
		if !ok || a == m.Amount {
			continue
		}
		var over int64
		if i < len(out.Meters) {
			over = out.Meters[i].Overage
		}
		s.Meters = append(s.Meters, store.MeterSettlement{Meter: m.Meter, Reserved: m.Amount, Overage: over, Actual: a, Quota: m})
	}
	return s
}

// msettle settles r with msettlement.
func (c *meterClient) msettle(r store.Reservation, out store.Reserved, actual int64, actuals map[string]int64) {
	c.t.Helper()
	if err := c.m.Settle(c.t.Context(), msettlement(r, out, actual, actuals)); err != nil {
		c.t.Fatalf("Settle(%s, actual %d, meters %v): %v", r.Subject, actual, actuals, err)
	}
}

// mwant reserves r and checks Allowed and each meter's Used and Overage
// (pairs in r.Meters' order).
func (c *meterClient) mwant(r store.Reservation, allowed bool, usedOver ...int64) (store.Reservation, store.Reserved) {
	c.t.Helper()
	r, out := c.reserve(r)
	ok := out.Allowed == allowed && len(out.Meters) == len(r.Meters) && len(usedOver) == 2*len(r.Meters)
	for i := 0; ok && i < len(out.Meters); i++ {
		ok = out.Meters[i].Used == usedOver[2*i] && out.Meters[i].Overage == usedOver[2*i+1]
	}
	if !ok {
		c.t.Fatalf("Reserve(%s, cost %d, meters %+v) = %+v; want allowed %v, meters' used and overage %v", r.Subject, r.Cost, r.Meters, out, allowed, usedOver)
	}
	if out.Allowed && (out.QuotaExceeded || out.QuotaExceededMeter != "") {
		c.t.Errorf("Reserve(%s): allowed with QuotaExceeded %v (meter %q)", r.Subject, out.QuotaExceeded, out.QuotaExceededMeter)
	}
	return r, out
}

// meterUsage returns the ledger of meter name (store.DefaultMeter for the
// default one) and checks that the meters are listed once each, ordered
// by name, and that each meter's totals equal the sum of its hours.
func (c *meterClient) meterUsage(subject, periodID, name string) store.MeterUsage {
	c.t.Helper()
	u := c.usage(subject, periodID)
	for i, m := range u.Meters {
		if i > 0 && m.Meter <= u.Meters[i-1].Meter {
			c.t.Errorf("Usage(%s).Meters out of order: %q after %q", subject, m.Meter, u.Meters[i-1].Meter)
		}
		var sum store.Counters
		for j, h := range m.Hours {
			if j > 0 && h.HourID <= m.Hours[j-1].HourID {
				c.t.Errorf("Usage(%s) meter %s hours out of order", subject, m.Meter)
			}
			if h.Counters == (store.Counters{}) {
				c.t.Errorf("Usage(%s) meter %s lists hour %s with no usage", subject, m.Meter, h.HourID)
			}
			sum.Billed += h.Billed
			sum.Overage += h.Overage
			sum.Requests += h.Requests
		}
		if sum != m.Counters {
			c.t.Errorf("Usage(%s) meter %s totals %+v, but its hours sum to %+v", subject, m.Meter, m.Counters, sum)
		}
	}
	return u.Meter(name)
}

// meterWant checks the period totals of meter name.
func (c *meterClient) meterWant(subject, periodID, name string, want store.Counters) store.MeterUsage {
	c.t.Helper()
	m := c.meterUsage(subject, periodID, name)
	if m.Counters != want {
		c.t.Fatalf("Usage(%s, %s) meter %s = %+v, want %+v", subject, periodID, name, m.Counters, want)
	}
	return m
}

// checkMeterEvents compares the events with want, in order, each naming
// its meter ("" for the default one) and carrying its ID.
func checkMeterEvents(t *testing.T, got []store.ThresholdEvent, want []wantMeterEvent) {
	t.Helper()
	ok := len(got) == len(want)
	for i := 0; ok && i < len(got); i++ {
		g, w := got[i], want[i]
		ok = g.Subject == w.subject && g.PeriodID == w.period && g.Threshold == w.threshold &&
			g.Used == w.used && g.Included == w.included && g.Meter == w.meter &&
			g.ID == store.ThresholdEventID(w.subject, w.period, w.threshold, w.meter)
	}
	if !ok {
		t.Fatalf("threshold events:\n got  %+v\n want %+v", got, want)
	}
	for _, g := range got {
		checkNear(t, "threshold event time", g.At)
	}
}

// wantMeterEvent is the expected content of a meter's threshold event.
type wantMeterEvent struct {
	subject, period, meter string
	threshold              int
	used, included         int64
}

// testMeters is the multi-meter part of RunMeter.
func testMeters(t *testing.T, client func(t *testing.T) *meterClient) {
	cur, _ := periods()
	t.Run("EveryMeterCounted", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 100)
		tokens := mq("tokens", store.QuotaBill, 0, 1000)
		upload := mq("upload", store.QuotaBlock, 50, 200)
		r, out := c.mwant(mres("acme", q, 1, tokens, upload), true, 0, 0, 50, 0)
		if out.Used != 1 {
			t.Fatalf("default meter Used %d, want 1", out.Used)
		}
		c.msettle(r, out, 1, map[string]int64{"tokens": 300})
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 1, Requests: 1})
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 300, Requests: 1})
		up := c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 50, Requests: 1})
		if len(up.Hours) != 1 || up.Hours[0].HourID != hourID(cur, 0) {
			t.Errorf("upload hours %+v, want the reservation's hour", up.Hours)
		}
		if u := c.usage("acme", cur.ID()); len(u.Meters) != 2 {
			t.Errorf("Usage.Meters = %+v, want tokens and upload", u.Meters)
		}
		// A meter-only settlement (the default meter unchanged), and a
		// second request in another hour.
		r, out = c.mwant(inHour(mres("acme", q, 1, tokens, upload), cur, 3), true, 300, 0, 100, 0)
		c.msettle(r, out, 1, map[string]int64{"tokens": 25, "upload": 20})
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 2})
		tk := c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 325, Requests: 2})
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 70, Requests: 2})
		if len(tk.Hours) != 2 || tk.Hours[1].HourID != hourID(cur, 3) || tk.Hours[1].Billed != 25 {
			t.Errorf("tokens hours %+v, want 300 in hour 0 and 25 in hour 3", tk.Hours)
		}
	})
	t.Run("BlockKnownAmount", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		up := func(n int64) store.MeterReservation { return mq("upload", store.QuotaBlock, n, 100) }
		c.mwant(mres("acme", q, 1, up(60)), true, 60, 0)
		c.mwant(mres("acme", q, 1, up(40)), true, 100, 0)
		_, out := c.mwant(mres("acme", q, 1, up(1)), false, 100, 0)
		if !out.QuotaExceeded || out.QuotaExceededMeter != "upload" || out.Used != 2 {
			t.Fatalf("beyond the upload quota: %+v; want QuotaExceeded by meter upload, default Used 2", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 2})
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 100, Requests: 2})
		// Amount 0 on a used-up meter is denied too.
		if _, out := c.mwant(mres("acme", q, 1, up(0)), false, 100, 0); out.QuotaExceededMeter != "upload" {
			t.Fatalf("after-response meter at its quota: %+v; want denied by upload", out)
		}
	})
	t.Run("BlockAfterResponse", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		tokens := mq("tokens", store.QuotaBlock, 0, 100)
		r, out := c.mwant(mres("acme", q, 1, tokens), true, 0, 0)
		c.msettle(r, out, 1, map[string]int64{"tokens": 99})
		r, out = c.mwant(mres("acme", q, 1, tokens), true, 99, 0)
		// The overshoot of an admitted request is recorded.
		c.msettle(r, out, 1, map[string]int64{"tokens": 31})
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 130, Overage: 30, Requests: 2})
		_, out = c.mwant(mres("acme", q, 1, tokens), false, 130, 0)
		if !out.QuotaExceeded || out.QuotaExceededMeter != "tokens" {
			t.Fatalf("tokens used up: %+v; want QuotaExceeded by tokens", out)
		}
		// Exactly used up denies too.
		c2 := client(t)
		r, out = c2.mwant(mres("acme", q, 1, tokens), true, 0, 0)
		c2.msettle(r, out, 1, map[string]int64{"tokens": 100})
		if _, out := c2.mwant(mres("acme", q, 1, tokens), false, 100, 0); out.QuotaExceededMeter != "tokens" {
			t.Fatalf("tokens exactly used up: %+v; want denied by tokens", out)
		}
	})
	t.Run("DeniedChangesNoMeter", func(t *testing.T) {
		c := client(t)
		a := mq("alpha", store.QuotaBill, 5, 100, 1)
		b := mq("beta", store.QuotaBlock, 10, 10, 1)
		// Denied by the default meter's block quota.
		qb := quota(cur, store.QuotaBlock, 0)
		if _, out := c.mwant(mres("acme", qb, 1, a, b), false, 0, 0, 0, 0); !out.QuotaExceeded || out.QuotaExceededMeter != "" {
			t.Fatalf("denied by the default quota: %+v; want QuotaExceeded, no meter named", out)
		}
		// Denied by the rate.
		q := quota(cur, store.QuotaBill, 100)
		c.mwant(withRate(mres("acme", q, 1, a), hourly(1, 1)), true, 5, 0)
		if _, out := c.mwant(withRate(mres("acme", q, 1, a, b), hourly(1, 1)), false, 5, 0, 0, 0); out.Rate.Allowed || out.QuotaExceeded {
			t.Fatalf("denied by the rate: %+v", out)
		}
		// Denied by the second meter: the first is untouched.
		c.mwant(mres("acme", q, 1, a, b), true, 10, 0, 10, 0)
		if _, out := c.mwant(mres("acme", q, 1, a, b), false, 10, 0, 10, 0); out.QuotaExceededMeter != "beta" {
			t.Fatalf("denied by beta: %+v", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 2})
		c.meterWant("acme", cur.ID(), "alpha", store.Counters{Billed: 10, Requests: 2})
		c.meterWant("acme", cur.ID(), "beta", store.Counters{Billed: 10, Requests: 1})
		checkMeterEvents(t, c.events("acme"), []wantMeterEvent{
			{"acme", cur.ID(), "alpha", 1, 5, 100}, {"acme", cur.ID(), "beta", 1, 10, 10},
		})
	})
	t.Run("BillOverage", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaMeter, 0)
		tokens := mq("tokens", store.QuotaBill, 0, 100)
		up := func(n int64) store.MeterReservation { return mq("upload", store.QuotaBill, n, 10) }
		c.mwant(mres("acme", q, 1, tokens, up(8)), true, 0, 0, 8, 0)
		r, out := c.mwant(mres("acme", q, 1, tokens, up(8)), true, 0, 0, 16, 6)
		c.msettle(r, out, 1, map[string]int64{"tokens": 90})
		r, out = c.mwant(mres("acme", q, 1, tokens, up(4)), true, 90, 0, 20, 4)
		// Releasing units takes the reservation's overage back first.
		c.msettle(r, out, 1, map[string]int64{"tokens": 30, "upload": 1})
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 120, Overage: 20, Requests: 2})
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 17, Overage: 7, Requests: 3})
		// A meter-only meter counts and is never limited.
		free := mq("free", store.QuotaMeter, 7, 0)
		c.mwant(mres("acme", q, 1, free), true, 7, 0)
		c.meterWant("acme", cur.ID(), "free", store.Counters{Billed: 7, Requests: 1})
	})
	t.Run("ReleaseTakesEveryMeterBack", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1)
		tokens := mq("tokens", store.QuotaBill, 0, 100)
		up := mq("upload", store.QuotaBill, 30, 20)
		r1, out1 := c.mwant(mres("acme", q, 1, tokens, up), true, 0, 0, 30, 10)
		c.msettle(r1, out1, 1, map[string]int64{"tokens": 150})
		r2, out2 := c.mwant(withKey(mres("acme", q, 1, tokens, up), "k1"), true, 150, 0, 60, 30)
		c.msettle(r2, out2, 0, map[string]int64{"upload": 0})
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 1, Requests: 1})
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 150, Overage: 50, Requests: 1})
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 30, Overage: 10, Requests: 1})
		c.msettle(r1, out1, 0, map[string]int64{"upload": 0})
		c.usageWant("acme", cur.ID(), store.Counters{})
		if u := c.meterWant("acme", cur.ID(), "upload", store.Counters{}); len(u.Hours) != 0 {
			t.Errorf("upload hours after releasing everything: %+v", u.Hours)
		}
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 150, Overage: 50, Requests: 1})
	})
	t.Run("Throttle", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		tier := hourly(100, 100)
		tokens := mq("tokens", store.QuotaThrottle, 0, 10)
		tokens.Throttle = hourly(5, 5)
		r, out := c.mwant(withRate(mres("acme", q, 1, tokens), tier), true, 0, 0)
		if out.Throttled || out.Meters[0].Throttled || out.Rate.Remaining != 99 {
			t.Fatalf("tokens not used up: %+v; want the tier rate", out)
		}
		c.msettle(r, out, 1, map[string]int64{"tokens": 10})
		_, out = c.mwant(withRate(mres("acme", q, 1, tokens), tier), true, 10, 0)
		// One unit owed under the tier rate carries over to the throttle.
		if !out.Throttled || !out.Meters[0].Throttled || out.Rate.Remaining != 3 {
			t.Fatalf("tokens used up: %+v; want the tokens throttle (Remaining 3)", out)
		}
		// Several meters used up: the slowest throttle applies.
		c2 := client(t)
		a := mq("alpha", store.QuotaThrottle, 0, 0)
		a.Throttle = hourly(5, 5)
		b := mq("beta", store.QuotaThrottle, 1, 0)
		b.Throttle = hourly(1, 1)
		if _, out := c2.mwant(mres("acme", q, 1, a, b), true, 0, 0, 1, 1); !out.Throttled || !out.Meters[1].Throttled || out.Rate.Remaining != 0 {
			t.Fatalf("alpha and beta used up: %+v; want beta's 1/hour throttle", out)
		}
		if _, out := c2.mwant(mres("acme", q, 1, a, b), false, 0, 0, 1, 0); !out.Throttled || out.QuotaExceeded || out.Rate.RetryAfter <= 0 {
			t.Fatalf("beta's throttle spent: %+v; want a throttle denial", out)
		}
		c2.usageWant("acme", cur.ID(), store.Counters{Billed: 1, Requests: 1})
	})
	t.Run("Thresholds", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		q.Thresholds = []int{80}
		tokens := mq("tokens", store.QuotaBill, 0, 100, 80, 100)
		up := func(n int64) store.MeterReservation { return mq("upload", store.QuotaBlock, n, 10, 50) }
		r, out := c.mwant(mres("acme", q, 8, tokens, up(5)), true, 0, 0, 5, 0)
		if !slices.Equal(out.Crossed, []int{80}) || len(out.Meters[0].Crossed) != 0 || !slices.Equal(out.Meters[1].Crossed, []int{50}) {
			t.Fatalf("crossings at reserve: %+v; want default 80, upload 50", out)
		}
		// After-response meters cross at settlement.
		c.msettle(r, out, 8, map[string]int64{"tokens": 85})
		r, out = c.mwant(mres("acme", q, 1, tokens, up(1)), true, 85, 0, 6, 0)
		c.msettle(r, out, 1, map[string]int64{"tokens": 20})
		// Released and climbed again: never crossed twice in a period.
		calls := mq("calls", store.QuotaBill, 6, 10, 50)
		r, out = c.mwant(mres("acme", q, 1, calls), true, 6, 0)
		if !slices.Equal(out.Meters[0].Crossed, []int{50}) {
			t.Fatalf("calls crossing: %+v; want 50", out)
		}
		c.msettle(r, out, 0, map[string]int64{"calls": 0})
		if _, out = c.mwant(mres("acme", q, 1, calls), true, 6, 0); len(out.Meters[0].Crossed) != 0 {
			t.Fatalf("calls crossed again after a release: %+v", out)
		}
		checkMeterEvents(t, c.events("acme"), []wantMeterEvent{
			{"acme", cur.ID(), "", 80, 8, 10},
			{"acme", cur.ID(), "upload", 50, 5, 10},
			{"acme", cur.ID(), "tokens", 80, 85, 100},
			{"acme", cur.ID(), "tokens", 100, 105, 100},
			{"acme", cur.ID(), "calls", 50, 6, 10},
		})
		u := c.usage("acme", cur.ID())
		if !slices.Equal(u.Thresholds, []int{80}) || !slices.Equal(u.Meter("tokens").Thresholds, []int{80, 100}) ||
			!slices.Equal(u.Meter("upload").Thresholds, []int{50}) {
			t.Errorf("Usage thresholds: default %v, tokens %v, upload %v; want [80], [80 100], [50]",
				u.Thresholds, u.Meter("tokens").Thresholds, u.Meter("upload").Thresholds)
		}
	})
	t.Run("ThresholdReachedBeforeATierChange", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaMeter, 0)
		c.mwant(mres("acme", q, 1, mq("upload", store.QuotaMeter, 90, 0)), true, 90, 0)
		_, out := c.mwant(mres("acme", q, 1, mq("upload", store.QuotaBill, 1, 100, 80)), true, 91, 0)
		if !slices.Equal(out.Meters[0].Crossed, []int{80}) {
			t.Fatalf("upload at 91 of 100 after a tier change: %+v; want 80 crossed", out)
		}
		checkMeterEvents(t, c.events("acme"), []wantMeterEvent{{"acme", cur.ID(), "upload", 80, 91, 100}})
	})
	t.Run("CostZeroCountsMeters", func(t *testing.T) {
		// A zero Cost makes only the default meter free: the other meters
		// are reserved, enforced and settled as for any cost.
		c := client(t)
		q := quota(cur, store.QuotaBlock, 10)
		up := mq("upload", store.QuotaBlock, 4, 10)
		c.mwant(mres("acme", q, 1, up), true, 4, 0)
		c.mwant(mres("acme", q, 0, up), true, 8, 0)
		if _, out := c.mwant(mres("acme", q, 0, up), false, 8, 0); !out.QuotaExceeded || out.QuotaExceededMeter != "upload" {
			t.Fatalf("upload used up at cost 0: %+v; want denied by upload", out)
		}
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 8, Requests: 2})
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 1, Requests: 1})
		// Known after the response: settled, then enforced.
		tokens := mq("tokens", store.QuotaBlock, 0, 5)
		r, out := c.mwant(mres("acme", q, 0, tokens), true, 0, 0)
		c.msettle(r, out, 0, map[string]int64{"tokens": 7})
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 7, Overage: 2, Requests: 1})
		if _, out := c.mwant(mres("acme", q, 0, tokens), false, 7, 0); out.QuotaExceededMeter != "tokens" {
			t.Fatalf("tokens used up at cost 0: %+v; want denied by tokens", out)
		}
		// Not billable: every meter taken back, the default meter untouched.
		bill := mq("upload", store.QuotaBill, 3, 100)
		r, out = c.mwant(mres("beta", q, 1, bill), true, 3, 0)
		r0, out0 := c.mwant(mres("beta", q, 0, bill), true, 6, 0)
		c.msettle(r0, out0, 0, map[string]int64{"upload": 0})
		c.meterWant("beta", cur.ID(), "upload", store.Counters{Billed: 3, Requests: 1})
		c.usageWant("beta", cur.ID(), store.Counters{Billed: 1, Requests: 1})
		c.msettle(r, out, 0, map[string]int64{"upload": 0})
		c.usageWant("beta", cur.ID(), store.Counters{})
		// Without meters a zero Cost still only reports.
		c.want(res("gamma", q, 0), true, 0, 0)
		c.usageWant("gamma", cur.ID(), store.Counters{})
	})
	t.Run("CostZeroThrottled", func(t *testing.T) {
		// A meter's throttle spends one unit of a zero-Cost request; the
		// tier's rate spends none.
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		tokens := mq("tokens", store.QuotaThrottle, 0, 10)
		tokens.Throttle = hourly(1, 1)
		for range 3 {
			if _, out := c.mwant(withRate(mres("acme", q, 0, tokens), hourly(1, 1)), true, 0, 0); out.Throttled {
				t.Fatalf("tokens not used up: %+v", out)
			}
		}
		r, out := c.mwant(withRate(mres("acme", q, 0, tokens), hourly(1, 1)), true, 0, 0)
		c.msettle(r, out, 0, map[string]int64{"tokens": 10})
		// The first throttled request fits the throttle's burst ...
		if _, out := c.mwant(withRate(mres("acme", q, 0, tokens), hourly(1, 1)), true, 10, 0); !out.Throttled || !out.Meters[0].Throttled {
			t.Fatalf("tokens used up: %+v; want the tokens throttle", out)
		}
		// ... and spends it.
		if _, out := c.mwant(withRate(mres("acme", q, 0, tokens), hourly(1, 1)), false, 10, 0); !out.Throttled || out.Rate.RetryAfter <= 0 || out.QuotaExceeded {
			t.Fatalf("throttle spent: %+v; want a throttle denial", out)
		}
		c.usageWant("acme", cur.ID(), store.Counters{})
	})
	t.Run("DuplicateCountsNoMeter", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		up := mq("upload", store.QuotaBill, 4, 10)
		c.mwant(withKey(mres("acme", q, 1, up), "k1"), true, 4, 0)
		if _, out := c.mwant(withKey(mres("acme", q, 1, up), "k1"), true, 4, 0); !out.Duplicate {
			t.Fatalf("repeat: %+v; want a Duplicate", out)
		}
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 4, Requests: 1})
	})
	t.Run("ExactUnderConcurrency", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		results := reserveConcurrently(t, []*meterClient{c}, 300, func(int) store.Reservation {
			return mres("acme", q, 1, mq("tokens", store.QuotaBill, 0, 0), mq("upload", store.QuotaBlock, 2, 200))
		})
		_, count := admitted(results)
		if count != 100 {
			t.Errorf("300 concurrent reservations of 2 upload units against 200: admitted %d, want 100", count)
		}
		c.usageWant("acme", cur.ID(), store.Counters{Billed: 100, Requests: 100})
		c.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 200, Requests: 100})
	})
	t.Run("ConcurrentSettlementsCrossOnce", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 1000)
		tokens := mq("tokens", store.QuotaBill, 0, 100, 50, 100)
		results := reserveConcurrently(t, []*meterClient{c}, 150, func(int) store.Reservation { return mres("acme", q, 1, tokens) })
		var wg sync.WaitGroup
		for _, o := range results {
			wg.Go(func() {
				if err := c.m.Settle(t.Context(), msettlement(o.r, o.out, 1, map[string]int64{"tokens": 1})); err != nil {
					t.Errorf("Settle: %v", err)
				}
			})
		}
		wg.Wait()
		c.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 150, Overage: 50, Requests: 150})
		checkMeterEvents(t, c.events("acme"), []wantMeterEvent{
			{"acme", cur.ID(), "tokens", 50, 50, 100}, {"acme", cur.ID(), "tokens", 100, 100, 100},
		})
	})
	t.Run("Invalid", func(t *testing.T) {
		c := client(t)
		q := quota(cur, store.QuotaBill, 10)
		for _, ms := range [][]store.MeterReservation{
			{mq("", store.QuotaBill, 1, 1)},
			{mq("a:b", store.QuotaBill, 1, 1)},
			{mq("a|b", store.QuotaBill, 1, 1)},
			{mq(store.DefaultMeter, store.QuotaBill, 1, 1)},
			{mq("x", store.QuotaBill, 1, 1), mq("x", store.QuotaBill, 1, 1)},
			{mq("x", "sometimes", 1, 1)},
			{mq("x", store.QuotaBill, -1, 1)},
			{mq("x", store.QuotaBill, 1, store.MaxMeterAmount+1)},
			{mq("x", store.QuotaBill, store.MaxMeterAmount+1, 1)},
		} {
			if _, out, err := c.try(mres("acme", q, 1, ms...)); err == nil {
				t.Errorf("Reserve with meters %+v = %+v; want an error", ms, out)
			}
		}
		c.usageWant("acme", cur.ID(), store.Counters{})
	})
}

// testMetersShared is the multi-meter part of RunMeterShared: replays
// apply every meter exactly once, and reservations through two handles
// are exact per meter.
func testMetersShared(t *testing.T, clients func(t *testing.T) (ca, cb *meterClient)) {
	cur, _ := periods()
	spooled := func(ca *meterClient, r store.Reservation) store.Reservation {
		r.Origin, r.Seq, r.Replay = ca.origin, ca.nextSeq(r.Subject), true
		return r
	}
	tokens := mq("tokens", store.QuotaBill, 0, 100, 100)
	up := mq("upload", store.QuotaBlock, 6, 10)
	t.Run("ReplaysAppliedOnce", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		r, out := ca.mwant(mres("acme", q, 1, tokens, up), true, 0, 0, 6, 0)
		for range 2 {
			if _, o := cb.reserve(replayed(r)); !o.Duplicate {
				t.Fatalf("Replay of a reserved seq: %+v; want a Duplicate", o)
			}
		}
		// Beyond the upload block quota: a replay is never denied.
		s := spooled(ca, mres("acme", q, 1, tokens, up))
		_, sout := cb.mwant(s, true, 0, 0, 12, 2)
		cb.mwant(s, true, 0, 0, 12, 0) // not applied again
		for range 2 {
			st := msettlement(r, out, 1, map[string]int64{"tokens": 70})
			st.Replay = true
			if err := cb.m.Settle(t.Context(), st); err != nil {
				t.Fatal(err)
			}
			st = msettlement(s, sout, 1, map[string]int64{"tokens": 40})
			st.Replay = true
			if err := ca.m.Settle(t.Context(), st); err != nil {
				t.Fatal(err)
			}
		}
		ca.usageWant("acme", cur.ID(), store.Counters{Billed: 2, Requests: 2})
		cb.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 110, Overage: 10, Requests: 2})
		u := ca.meterUsage("acme", cur.ID(), "upload")
		if u.Billed != 12 || u.Requests != 2 {
			t.Errorf("upload after replays: %+v; want 12 units in 2 requests", u.Counters)
		}
		checkMeterEvents(t, ca.events("acme"), []wantMeterEvent{{"acme", cur.ID(), "tokens", 100, 110, 100}})
	})
	t.Run("CostZeroReplaysAppliedOnce", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 100)
		s := spooled(ca, mres("acme", q, 0, tokens, up))
		_, sout := cb.mwant(s, true, 0, 0, 6, 0)
		cb.mwant(s, true, 0, 0, 6, 0) // not applied again
		for range 2 {
			st := msettlement(s, sout, 0, map[string]int64{"tokens": 40})
			st.Replay = true
			if err := ca.m.Settle(t.Context(), st); err != nil {
				t.Fatal(err)
			}
		}
		ca.usageWant("acme", cur.ID(), store.Counters{})
		cb.meterWant("acme", cur.ID(), "tokens", store.Counters{Billed: 40, Requests: 1})
		cb.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 6, Requests: 1})
	})
	t.Run("ExactAcrossHandles", func(t *testing.T) {
		ca, cb := clients(t)
		q := quota(cur, store.QuotaBill, 1000)
		q.Thresholds = []int{50}
		results := reserveConcurrently(t, []*meterClient{ca, cb}, 300, func(i int) store.Reservation {
			return mres("acme", q, 1, mq("upload", store.QuotaBlock, 2, 200, 50, 100))
		})
		if _, count := admitted(results); count != 100 {
			t.Errorf("admitted %d, want 100", count)
		}
		ca.meterWant("acme", cur.ID(), "upload", store.Counters{Billed: 200, Requests: 100})
		checkMeterEvents(t, cb.events(""), []wantMeterEvent{
			{"acme", cur.ID(), "upload", 50, 100, 200}, {"acme", cur.ID(), "upload", 100, 200, 200},
		})
	})
}
