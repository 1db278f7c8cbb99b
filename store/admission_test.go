package store

import (
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// TestAdmit checks the one admission decision both Go deciders share: the
// throttle applies from the included units on, a block quota refuses what
// does not fit (never a free request or a replay), and nothing overflows.
func TestAdmit(t *testing.T) {
	rate := limiter.Policy{Limit: 10, Period: time.Second}
	thr := limiter.Policy{Limit: 1, Period: time.Second}
	const big = int64(1) << 62
	for _, c := range []struct {
		name     string
		mode     string
		included int64
		used     int64
		cost     int64
		replay   bool
		want     Admission
	}{
		{name: "meter", mode: QuotaMeter, used: 1 << 40, cost: 1, want: Admission{Policy: rate}},
		{name: "bill over", mode: QuotaBill, included: 5, used: 9, cost: 3, want: Admission{Policy: rate}},
		{name: "throttle below", mode: QuotaThrottle, included: 5, used: 4, cost: 3, want: Admission{Policy: rate}},
		{name: "throttle at", mode: QuotaThrottle, included: 5, used: 5, cost: 1, want: Admission{Policy: thr, Throttled: true}},
		{name: "throttle free", mode: QuotaThrottle, included: 5, used: 6, cost: 0, want: Admission{Policy: thr, Throttled: true}},
		{name: "block fits", mode: QuotaBlock, included: 5, used: 2, cost: 3, want: Admission{Policy: rate}},
		{name: "block over", mode: QuotaBlock, included: 5, used: 3, cost: 3, want: Admission{Policy: rate, QuotaExceeded: true}},
		{name: "block free over", mode: QuotaBlock, included: 5, used: 7, cost: 0, want: Admission{Policy: rate}},
		{name: "block replay over", mode: QuotaBlock, included: 5, used: 5, cost: 1, replay: true, want: Admission{Policy: rate}},
		{name: "block no overflow", mode: QuotaBlock, included: big, used: big - 1, cost: big, want: Admission{Policy: rate, QuotaExceeded: true}},
	} {
		r := Reservation{Rate: rate, Cost: c.cost, Replay: c.replay, Quota: Quota{Mode: c.mode, Included: c.included}}
		if c.mode == QuotaThrottle {
			r.Quota.Throttle = thr
		}
		c.want.Units = c.cost
		if got := r.Admit(c.used); got != c.want {
			t.Errorf("%s: Admit(%d) = %+v, want %+v", c.name, c.used, got, c.want)
		}
	}
}

// TestAdmitMeters checks the decision with meters: each block meter
// refuses by its own rule (a known amount that does not fit, an
// after-response meter already used up), the default meter first; any
// used-up throttle meter throttles, at the slowest throttle.
func TestAdmitMeters(t *testing.T) {
	rate := limiter.Policy{Limit: 10, Period: time.Second}
	fast := limiter.Policy{Limit: 5, Period: time.Second}
	slow := limiter.Policy{Limit: 1, Period: time.Second}
	block := func(name string, amount, included int64) MeterReservation {
		return MeterReservation{Meter: name, Mode: QuotaBlock, Amount: amount, Included: included}
	}
	throttle := func(name string, included int64, p limiter.Policy) MeterReservation {
		return MeterReservation{Meter: name, Mode: QuotaThrottle, Included: included, Throttle: p}
	}
	for _, c := range []struct {
		name      string
		quota     Quota
		meters    []MeterReservation
		used      int64
		meterUsed []int64
		cost      int64
		replay    bool
		want      Admission
	}{
		{name: "amount fits", meters: []MeterReservation{block("a", 3, 10)}, meterUsed: []int64{7}, cost: 1, want: Admission{Policy: rate}},
		{name: "amount over", meters: []MeterReservation{block("a", 4, 10)}, meterUsed: []int64{7}, cost: 1,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "a"}},
		{name: "after response below", meters: []MeterReservation{block("a", 0, 10)}, meterUsed: []int64{9}, cost: 1, want: Admission{Policy: rate}},
		{name: "after response used up", meters: []MeterReservation{block("a", 0, 10)}, meterUsed: []int64{10}, cost: 1,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "a"}},
		{name: "first refusing meter", meters: []MeterReservation{block("a", 1, 10), block("b", 0, 1), block("c", 0, 1)}, meterUsed: []int64{0, 1, 1}, cost: 1,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "b"}},
		{name: "default first", quota: Quota{Mode: QuotaBlock, Included: 1}, used: 1, meters: []MeterReservation{block("a", 0, 1)}, meterUsed: []int64{1}, cost: 1,
			want: Admission{Policy: rate, QuotaExceeded: true}},
		{name: "free refused by a meter", meters: []MeterReservation{block("a", 0, 1)}, meterUsed: []int64{5}, cost: 0,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "a"}},
		{name: "free, amount over", meters: []MeterReservation{block("a", 2, 5)}, meterUsed: []int64{4}, cost: 0,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "a"}},
		{name: "free, default block not", quota: Quota{Mode: QuotaBlock, Included: 1}, used: 1, meters: []MeterReservation{block("a", 1, 5)}, cost: 0,
			meterUsed: []int64{0}, want: Admission{Policy: rate}},
		{name: "free, meter throttle spends one", meters: []MeterReservation{throttle("a", 5, slow)}, meterUsed: []int64{5}, cost: 0,
			want: Admission{Policy: slow, Throttled: true, Units: 1}},
		{name: "free, default throttle spends none", quota: Quota{Mode: QuotaThrottle, Included: 1, Throttle: slow}, used: 1,
			meters: []MeterReservation{throttle("a", 5, fast)}, meterUsed: []int64{4}, cost: 0, want: Admission{Policy: slow, Throttled: true}},
		{name: "replay never refused", meters: []MeterReservation{block("a", 9, 1)}, meterUsed: []int64{5}, cost: 1, replay: true, want: Admission{Policy: rate}},
		{name: "no overflow", meters: []MeterReservation{block("a", 1<<62, 1<<62)}, meterUsed: []int64{1<<62 - 1}, cost: 1,
			want: Admission{Policy: rate, QuotaExceeded: true, QuotaExceededMeter: "a"}},
		{name: "throttle meter below", meters: []MeterReservation{throttle("a", 5, slow)}, meterUsed: []int64{4}, cost: 1, want: Admission{Policy: rate}},
		{name: "throttle meter at", meters: []MeterReservation{throttle("a", 5, slow)}, meterUsed: []int64{5}, cost: 1, want: Admission{Policy: slow, Throttled: true}},
		{name: "slowest of meters", meters: []MeterReservation{throttle("a", 0, fast), throttle("b", 0, slow), throttle("c", 0, fast)}, meterUsed: []int64{0, 0, 0}, cost: 1,
			want: Admission{Policy: slow, Throttled: true}},
		{name: "slower than the default's", quota: Quota{Mode: QuotaThrottle, Included: 1, Throttle: fast}, used: 1,
			meters: []MeterReservation{throttle("a", 0, slow)}, meterUsed: []int64{0}, cost: 1, want: Admission{Policy: slow, Throttled: true}},
		{name: "the default's slower", quota: Quota{Mode: QuotaThrottle, Included: 1, Throttle: slow}, used: 1,
			meters: []MeterReservation{throttle("a", 0, fast)}, meterUsed: []int64{0}, cost: 1, want: Admission{Policy: slow, Throttled: true}},
	} {
		r := Reservation{Rate: rate, Cost: c.cost, Replay: c.replay, Quota: c.quota, Meters: c.meters}
		if c.want.Units == 0 {
			c.want.Units = c.cost
		}
		if got := r.AdmitMeters(c.used, c.meterUsed); got != c.want {
			t.Errorf("%s: AdmitMeters = %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestSlowerPolicy(t *testing.T) {
	none := limiter.Policy{}
	invalid := limiter.Policy{Limit: -1, Period: time.Second}
	a := limiter.Policy{Limit: 1, Period: time.Second}
	b := limiter.Policy{Limit: 2, Period: time.Second}
	aBurst := limiter.Policy{Limit: 1, Period: time.Second, Burst: 5}
	for _, c := range []struct {
		x, y limiter.Policy
		want bool
	}{
		{a, b, true}, {b, a, false}, {a, a, false},
		{a, aBurst, true}, {aBurst, a, false},
		{invalid, a, true}, {a, invalid, false}, {invalid, invalid, false},
		{a, none, true}, {none, a, false}, {none, none, false}, {invalid, none, true},
	} {
		if got := SlowerPolicy(c.x, c.y); got != c.want {
			t.Errorf("SlowerPolicy(%+v, %+v) = %v, want %v", c.x, c.y, got, c.want)
		}
	}
}

func TestCheckMeters(t *testing.T) {
	ok := []MeterReservation{{Meter: "tokens", Mode: QuotaBill, Included: 10, Thresholds: []int{80, 100}}, {Meter: "up.load-2_x", Amount: 3}}
	if err := CheckMeters(ok); err != nil {
		t.Errorf("CheckMeters(%+v) = %v", ok, err)
	}
	long := string(make([]byte, MaxMeterNameLen+1))
	for _, ms := range [][]MeterReservation{
		{{Meter: ""}}, {{Meter: "a:b"}}, {{Meter: "a|b"}}, {{Meter: "a b"}}, {{Meter: "é"}}, {{Meter: DefaultMeter}}, {{Meter: long}},
		{{Meter: "a"}, {Meter: "a"}},
		{{Meter: "a", Mode: "later"}}, {{Meter: "a", Amount: -1}}, {{Meter: "a", Included: -1}},
		{{Meter: "a", Thresholds: []int{100, 80}}}, {{Meter: "a", Thresholds: []int{0}}},
		make([]MeterReservation, MaxMeters+1),
	} {
		if err := CheckMeters(ms); err == nil {
			t.Errorf("CheckMeters(%+v) accepted", ms)
		}
	}
	if err := CheckMeterSettlements([]MeterSettlement{{Meter: "a", Reserved: 3, Overage: 4}}); err == nil {
		t.Error("a settlement with more overage than reserved units accepted")
	}
	if id := ThresholdEventID("acme", "p", 80, ""); id != "acme|p|80" {
		t.Errorf("default meter's event id %q", id)
	}
	if id := ThresholdEventID("acme", "p", 80, "tokens"); id != "acme|p|80|tokens" {
		t.Errorf("tokens' event id %q", id)
	}
}
