package limiter

import (
	"math/rand/v2"
	"testing"
	"time"
)

const t0 = int64(1_700_000_000_000_000) // microseconds since the epoch

var perMinute100 = Policy{Limit: 100, Period: time.Minute}

func TestDecideSequences(t *testing.T) {
	type step struct {
		at   int64 // microseconds after t0
		cost int64
		want Decision
	}
	const ms = int64(1000)
	tests := []struct {
		name  string
		p     Policy
		steps []step
	}{
		{"fresh 100/min admits with 99 remaining", perMinute100, []step{
			{0, 1, Decision{Allowed: true, Remaining: 99, ResetAfter: 600 * time.Millisecond}},
		}},
		{"cost 5 of burst 100", perMinute100, []step{
			{0, 5, Decision{Allowed: true, Remaining: 95, ResetAfter: 3 * time.Second}},
			{0, 5, Decision{Allowed: true, Remaining: 90, ResetAfter: 6 * time.Second}},
			{0, 5, Decision{Allowed: true, Remaining: 85, ResetAfter: 9 * time.Second}},
		}},
		{"exhausted bucket refills one unit per interval", perMinute100, []step{
			{0, 100, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Minute}},
			{0, 1, Decision{RetryAfter: 600 * time.Millisecond, ResetAfter: time.Minute}},
			{600*ms - 1, 1, Decision{RetryAfter: time.Microsecond, ResetAfter: time.Minute - 600*time.Millisecond + time.Microsecond}},
			{600 * ms, 1, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Minute}},
		}},
		{"denied requests consume nothing", perMinute100, []step{
			{0, 100, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Minute}},
			{1, 1, Decision{RetryAfter: 600*time.Millisecond - time.Microsecond, ResetAfter: time.Minute - time.Microsecond}},
			{2, 1, Decision{RetryAfter: 600*time.Millisecond - 2*time.Microsecond, ResetAfter: time.Minute - 2*time.Microsecond}},
			{3, 50, Decision{RetryAfter: 30*time.Second - 3*time.Microsecond, ResetAfter: time.Minute - 3*time.Microsecond}},
			{30_000 * ms, 50, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Minute}},
		}},
		{"cost above burst can never be admitted", perMinute100, []step{
			{0, 101, Decision{Remaining: 100, CostExceedsBurst: true}},
			{0, 40, Decision{Allowed: true, Remaining: 60, ResetAfter: 24 * time.Second}},
			{0, 101, Decision{Remaining: 60, ResetAfter: 24 * time.Second, CostExceedsBurst: true}},
			{0, 100, Decision{Remaining: 60, RetryAfter: 24 * time.Second, ResetAfter: 24 * time.Second}},
		}},
		{"cost 0 reports without consuming", perMinute100, []step{
			{0, 0, Decision{Allowed: true, Remaining: 100}},
			{0, 30, Decision{Allowed: true, Remaining: 70, ResetAfter: 18 * time.Second}},
			{0, 0, Decision{Allowed: true, Remaining: 70, ResetAfter: 18 * time.Second}},
			{0, 0, Decision{Allowed: true, Remaining: 70, ResetAfter: 18 * time.Second}},
			{0, -3, Decision{Allowed: true, Remaining: 70, ResetAfter: 18 * time.Second}},
			{6000 * ms, 0, Decision{Allowed: true, Remaining: 80, ResetAfter: 12 * time.Second}},
			{18_000 * ms, 0, Decision{Allowed: true, Remaining: 100}},
		}},
		{"1000/min with burst 200", Policy{Limit: 1000, Period: time.Minute, Burst: 200}, []step{
			{0, 1, Decision{Allowed: true, Remaining: 199, ResetAfter: 60 * time.Millisecond}},
			{0, 199, Decision{Allowed: true, Remaining: 0, ResetAfter: 12 * time.Second}},
			{0, 1, Decision{RetryAfter: 60 * time.Millisecond, ResetAfter: 12 * time.Second}},
			{60 * ms, 1, Decision{Allowed: true, Remaining: 0, ResetAfter: 12 * time.Second}},
			{6060 * ms, 0, Decision{Allowed: true, Remaining: 100, ResetAfter: 6 * time.Second}},
			{6060 * ms, 201, Decision{Remaining: 100, ResetAfter: 6 * time.Second, CostExceedsBurst: true}},
			{20_000 * ms, 200, Decision{Allowed: true, Remaining: 0, ResetAfter: 12 * time.Second}},
		}},
		{"burst smaller than limit 10/s burst 1", Policy{Limit: 10, Period: time.Second, Burst: 1}, []step{
			{0, 1, Decision{Allowed: true, Remaining: 0, ResetAfter: 100 * time.Millisecond}},
			{50 * ms, 1, Decision{RetryAfter: 50 * time.Millisecond, ResetAfter: 50 * time.Millisecond}},
			{100 * ms, 1, Decision{Allowed: true, Remaining: 0, ResetAfter: 100 * time.Millisecond}},
			{100 * ms, 2, Decision{ResetAfter: 100 * time.Millisecond, CostExceedsBurst: true}},
		}},
		{"partial refill rounds remaining down", Policy{Limit: 10, Period: time.Second}, []step{
			{0, 10, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Second}},
			{250 * ms, 0, Decision{Allowed: true, Remaining: 2, ResetAfter: 750 * time.Millisecond}},
			{250 * ms, 3, Decision{Remaining: 2, RetryAfter: 50 * time.Millisecond, ResetAfter: 750 * time.Millisecond}},
			{300 * ms, 3, Decision{Allowed: true, Remaining: 0, ResetAfter: time.Second}},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var tat int64
			for i, s := range tt.steps {
				newTAT, got := tt.p.Decide(tat, t0+s.at, s.cost)
				if got != s.want {
					t.Fatalf("step %d (at +%dµs, cost %d): got %+v, want %+v", i, s.at, s.cost, got, s.want)
				}
				if !got.Allowed || s.cost <= 0 {
					if newTAT != tat {
						t.Fatalf("step %d: TAT changed from %d to %d without admitting anything", i, tat, newTAT)
					}
				}
				tat = newTAT
			}
		})
	}
}

func TestDecideStaleTATIsFullBucket(t *testing.T) {
	stale := t0 - int64(time.Hour/time.Microsecond)
	for _, cost := range []int64{0, 101} {
		newTAT, d := perMinute100.Decide(stale, t0, cost)
		if newTAT != stale {
			t.Errorf("cost %d: TAT changed from %d to %d", cost, stale, newTAT)
		}
		if d.Remaining != 100 || d.ResetAfter != 0 {
			t.Errorf("cost %d: got %+v, want a full bucket", cost, d)
		}
	}
	newTAT, d := perMinute100.Decide(stale, t0, 1)
	if !d.Allowed || d.Remaining != 99 || newTAT != t0+600_000 {
		t.Errorf("got TAT %d, %+v; want admitted from a full bucket", newTAT, d)
	}
}

func TestDecideAfterBurstShrank(t *testing.T) {
	// A TAT stored under burst 100 evaluated under burst 10.
	tat, _ := perMinute100.Decide(0, t0, 100)
	small := Policy{Limit: 100, Period: time.Minute, Burst: 10}
	newTAT, d := small.Decide(tat, t0, 1)
	want := Decision{RetryAfter: 54600 * time.Millisecond, ResetAfter: time.Minute}
	if d != want || newTAT != tat {
		t.Errorf("got TAT %d, %+v; want %+v and TAT unchanged", newTAT, d, want)
	}
	if _, d := small.Decide(tat, t0, 0); d.Remaining != 0 || !d.Allowed {
		t.Errorf("cost 0: got %+v, want allowed with 0 remaining", d)
	}
}

// TestDecideRetryAfterAndRemainingExact checks, over many policies and
// states, that retrying exactly RetryAfter later succeeds and one
// microsecond earlier fails, and that Remaining units are admissible right
// now while one more is not.
func TestDecideRetryAfterAndRemainingExact(t *testing.T) {
	policies := []Policy{
		perMinute100,
		{Limit: 1000, Period: time.Minute, Burst: 200},
		{Limit: 7, Period: time.Second},
		{Limit: 3, Period: time.Hour, Burst: 10},
		{Limit: 1_000_000, Period: time.Second},
		{Limit: 5, Period: 3 * time.Microsecond, Burst: 2},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, p := range policies {
		burst, interval := p.BurstUnits(), p.Interval()
		var tat int64
		now := t0
		for range 2000 {
			now += rng.Int64N(2 * interval)
			cost := 1 + rng.Int64N(burst)
			newTAT, d := p.Decide(tat, now, cost)
			if d.Allowed {
				if d.RetryAfter != 0 || newTAT != max(tat, now)+cost*interval {
					t.Fatalf("%+v: allowed with RetryAfter %v, TAT %d", p, d.RetryAfter, newTAT)
				}
				tat = newTAT
			} else {
				if newTAT != tat {
					t.Fatalf("%+v: denied but TAT moved", p)
				}
				wait := int64(d.RetryAfter / time.Microsecond)
				if wait <= 0 {
					t.Fatalf("%+v at %d cost %d: denied with RetryAfter %v", p, now, cost, d.RetryAfter)
				}
				if _, early := p.Decide(tat, now+wait-1, cost); early.Allowed {
					t.Fatalf("%+v: admitted 1µs before RetryAfter %v", p, d.RetryAfter)
				}
				if _, later := p.Decide(tat, now+wait, cost); !later.Allowed {
					t.Fatalf("%+v: denied at RetryAfter %v: %+v", p, d.RetryAfter, later)
				}
			}
			if d.Remaining > 0 {
				if _, r := p.Decide(tat, now, d.Remaining); !r.Allowed {
					t.Fatalf("%+v: Remaining %d not admissible", p, d.Remaining)
				}
			}
			if _, r := p.Decide(tat, now, d.Remaining+1); r.Allowed {
				t.Fatalf("%+v: Remaining %d but %d admissible", p, d.Remaining, d.Remaining+1)
			}
			if reset := int64(d.ResetAfter / time.Microsecond); max(tat-now, 0) != reset {
				t.Fatalf("%+v: ResetAfter %v, TAT is %dµs ahead", p, d.ResetAfter, tat-now)
			}
		}
	}
}

func TestSustainedRateNeverExceedsLimit(t *testing.T) {
	// Greedy client asking every microsecond for 7/s (interval rounded up):
	// after the initial burst, at most Limit units per Period.
	p := Policy{Limit: 7, Period: time.Second}
	var tat int64
	admitted := 0
	start := t0
	tat, _ = p.Decide(tat, start, p.BurstUnits()) // spend the burst
	for now := start; now < start+10_000_000; now += 1000 {
		var d Decision
		if tat, d = p.Decide(tat, now, 1); d.Allowed {
			admitted++
		}
	}
	if admitted > 70 || admitted < 69 {
		t.Errorf("admitted %d units in 10s after the burst, want 69 or 70 (7/s)", admitted)
	}
}

func TestPolicyHelpers(t *testing.T) {
	tests := []struct {
		p        Policy
		valid    bool
		interval int64
		burst    int64
	}{
		{perMinute100, true, 600_000, 100},
		{Policy{Limit: 1000, Period: time.Minute, Burst: 200}, true, 60_000, 200},
		{Policy{Limit: 7, Period: time.Second}, true, 142_858, 7}, // rounded up
		{Policy{Limit: 10, Period: time.Microsecond}, true, 1, 10},
		{Policy{Limit: 1, Period: MaxBurstSpan * time.Microsecond}, true, MaxBurstSpan, 1},
		{Policy{Limit: 1, Period: (MaxBurstSpan + 1) * time.Microsecond}, false, 0, 1},
		{Policy{Limit: 1, Period: time.Second, Burst: MaxBurstSpan/1_000_000 + 1}, false, 0, MaxBurstSpan/1_000_000 + 1},
		{Policy{Limit: 0, Period: time.Second}, false, 0, 0},
		{Policy{Limit: -1, Period: time.Second}, false, 0, -1},
		{Policy{Limit: 1, Period: 999 * time.Nanosecond}, false, 0, 1},
		{Policy{Limit: 5, Period: time.Second, Burst: -2}, true, 200_000, 5},
	}
	for _, tt := range tests {
		if got := tt.p.Valid(); got != tt.valid {
			t.Errorf("%+v.Valid() = %v, want %v", tt.p, got, tt.valid)
		}
		if got := tt.p.BurstUnits(); got != tt.burst {
			t.Errorf("%+v.BurstUnits() = %d, want %d", tt.p, got, tt.burst)
		}
		if tt.valid {
			if got := tt.p.Interval(); got != tt.interval {
				t.Errorf("%+v.Interval() = %d, want %d", tt.p, got, tt.interval)
			}
			continue
		}
		newTAT, d := tt.p.Decide(42, t0, 1)
		if newTAT != 42 || d != (Decision{CostExceedsBurst: true}) {
			t.Errorf("%+v.Decide on invalid policy = %d, %+v; want nothing admitted", tt.p, newTAT, d)
		}
	}
}

func TestRescaleKeepsOwedUnits(t *testing.T) {
	const now = 1_000_000_000_000
	free := Policy{Limit: 10, Period: time.Minute} // 6 s per unit
	pro := Policy{Limit: 100, Period: time.Minute} // 0.6 s per unit
	tiny := Policy{Limit: 2, Period: time.Minute}  // 30 s per unit, burst 2
	owed4 := int64(now + 4*6_000_000)              // 4 units owed under free
	if got, want := pro.Rescale(owed4, now, free.Interval()), int64(now+4*600_000); got != want {
		t.Errorf("upgrade: TAT %d, want %d (4 units at the pro interval)", got, want)
	}
	if got, want := tiny.Rescale(owed4, now, free.Interval()), int64(now+2*30_000_000); got != want {
		t.Errorf("downgrade: TAT %d, want %d (capped at a full burst)", got, want)
	}
	// A partly restored unit still counts as owed (rounded up).
	if got, want := pro.Rescale(now+1, now, free.Interval()), int64(now+600_000); got != want {
		t.Errorf("partial unit: TAT %d, want %d", got, want)
	}
	for _, tc := range []struct{ tat, from int64 }{{now - 5, free.Interval()}, {owed4, 0}, {owed4, pro.Interval()}} {
		if got := pro.Rescale(tc.tat, now, tc.from); got != tc.tat {
			t.Errorf("Rescale(%d, from %d) = %d, want unchanged", tc.tat, tc.from, got)
		}
	}
}
