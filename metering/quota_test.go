package metering

import (
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

func TestParseOverQuota(t *testing.T) {
	perMin := func(n int64) *limiter.Policy { return &limiter.Policy{Limit: n, Period: time.Minute} }
	tests := []struct {
		args string
		want OverQuota
	}{
		{"block", OverQuota{Mode: ModeBlock}},
		{"bill 0.002", OverQuota{Mode: ModeBill, PriceMicros: 2000}},
		{"bill 0", OverQuota{Mode: ModeBill}},
		{"throttle 50/min", OverQuota{Mode: ModeThrottle, Throttle: perMin(50)}},
		{"throttle 50/min bill 0.001", OverQuota{Mode: ModeThrottle, PriceMicros: 1000, Throttle: perMin(50)}},
		{"throttle 50/minute burst 5", OverQuota{Mode: ModeThrottle, Throttle: &limiter.Policy{Limit: 50, Period: time.Minute, Burst: 5}}},
		{"throttle 50/m burst 5 bill 1.5", OverQuota{Mode: ModeThrottle, PriceMicros: 1_500_000, Throttle: &limiter.Policy{Limit: 50, Period: time.Minute, Burst: 5}}},
		{"throttle 2/s", OverQuota{Mode: ModeThrottle, Throttle: &limiter.Policy{Limit: 2, Period: time.Second}}},
		{"throttle 1000/day", OverQuota{Mode: ModeThrottle, Throttle: &limiter.Policy{Limit: 1000, Period: 24 * time.Hour}}},
	}
	for _, tc := range tests {
		t.Run(tc.args, func(t *testing.T) {
			got, err := ParseOverQuota(strings.Fields(tc.args))
			if err != nil {
				t.Fatal(err)
			}
			if got.Mode != tc.want.Mode || got.PriceMicros != tc.want.PriceMicros ||
				(got.Throttle == nil) != (tc.want.Throttle == nil) ||
				got.Throttle != nil && *got.Throttle != *tc.want.Throttle {
				t.Errorf("got %+v (throttle %+v), want %+v (throttle %+v)", got, got.Throttle, tc.want, tc.want.Throttle)
			}
		})
	}
}

func TestParseOverQuotaRejects(t *testing.T) {
	tests := []struct{ args, err string }{
		{"", "want block, bill"},
		{"charge 0.1", `unknown mode "charge"`},
		{"block 0.1", `over_quota block: unexpected "0.1"`},
		{"bill", "missing price"},
		{"bill -0.1", "negative"},
		{"bill 0.0000001", "at most 6 decimal places"},
		{"bill 1e-3", "exponent"},
		{"bill 0.1 0.2", `unexpected "0.2"`},
		{"throttle", "missing rate"},
		{"throttle 50", "expected <units>/<window>"},
		{"throttle 50/week", `unknown window "week"`},
		{"throttle 0/min", "at least 1 unit per window"},
		{"throttle -5/min", "at least 1 unit per window"},
		{"throttle +5/min", "at least 1 unit per window"},
		{"throttle 5.5/min", "at least 1 unit per window"},
		{"throttle /min", "at least 1 unit per window"},
		{"throttle 50/min bill", "missing price"},
		{"throttle 50/min bill x", "want a decimal number"},
		{"throttle 50/min burst", "expected burst <units>"},
		{"throttle 50/min burst +5", `invalid burst "+5"`},
		{"throttle 50/min burst -5", `invalid burst "-5"`},
		{"throttle 50/min burst 0", `invalid burst "0"`},
		{"throttle 50/min bill 0.1 burst 5", `unexpected "burst"`},
		{"throttle 50/min bill 0.1 extra", `unexpected "extra"`},
		{"throttle 9223372036854775807/s", "too large"},
		{"throttle 1/day burst 9223372036854775807", "too large"},
	}
	for _, tc := range tests {
		t.Run(tc.args, func(t *testing.T) {
			got, err := ParseOverQuota(strings.Fields(tc.args))
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Fatalf("got %+v, %v; want an error containing %q", got, err, tc.err)
			}
		})
	}
}

func TestOverQuotaValidate(t *testing.T) {
	ok := []OverQuota{
		{Mode: ModeBlock},
		{Mode: ModeBill, PriceMicros: 2000},
		{Mode: ModeThrottle, Throttle: &limiter.Policy{Limit: 1, Period: time.Minute}, PriceMicros: 5},
	}
	for _, o := range ok {
		if err := o.Validate(); err != nil {
			t.Errorf("Validate(%+v) = %v", o, err)
		}
	}
	bad := []OverQuota{
		{},
		{Mode: "Block"},
		{Mode: ModeBlock, PriceMicros: 1},
		{Mode: ModeBlock, Throttle: &limiter.Policy{Limit: 1, Period: time.Minute}},
		{Mode: ModeBill, PriceMicros: -1},
		{Mode: ModeBill, Throttle: &limiter.Policy{Limit: 1, Period: time.Minute}},
		{Mode: ModeThrottle},
		{Mode: ModeThrottle, Throttle: &limiter.Policy{Limit: 0, Period: time.Minute}},
	}
	for _, o := range bad {
		if err := o.Validate(); err == nil {
			t.Errorf("Validate(%+v) accepted", o)
		}
	}
}

func TestOverage(t *testing.T) {
	tests := []struct {
		name                       string
		usedBefore, cost, included int64
		want                       int64
	}{
		{"well within", 0, 10, 100, 0},
		{"lands exactly on the quota", 90, 10, 100, 0},
		{"straddles the quota", 95, 10, 100, 5},
		{"starts exactly at the quota", 100, 10, 100, 10},
		{"already beyond", 150, 10, 100, 10},
		{"cost 0", 150, 0, 100, 0},
		{"nothing included: all overage", 0, 7, 0, 7},
		{"negative cost is nothing", 95, -3, 100, 0},
		{"negative used counts as 0", -50, 120, 100, 20},
		{"big numbers without overflow", math.MaxInt64 - 10, 20, math.MaxInt64, 10},
		{"big numbers within", math.MaxInt64 - 30, 20, math.MaxInt64, 0},
		{"big quota, big cost", 0, math.MaxInt64, math.MaxInt64 - 1, 1},
	}
	for _, tc := range tests {
		if got := Overage(tc.usedBefore, tc.cost, tc.included); got != tc.want {
			t.Errorf("%s: Overage(%d, %d, %d) = %d, want %d", tc.name, tc.usedBefore, tc.cost, tc.included, got, tc.want)
		}
	}
}

func TestCrossed(t *testing.T) {
	def := []int{80, 100, 120}
	tests := []struct {
		name                    string
		before, after, included int64
		thresholds              []int
		want                    []int
	}{
		{"below the first", 0, 79, 100, def, nil},
		{"exactly 80 % crosses 80", 79, 80, 100, def, []int{80}},
		{"starting exactly at 80 % crosses nothing new", 80, 99, 100, def, nil},
		{"exactly 100 %", 99, 100, 100, def, []int{100}},
		{"jump from 50 % to 130 % crosses all three", 500, 1300, 1000, def, []int{80, 100, 120}},
		{"jump from 85 % to 120 %", 85, 120, 100, def, []int{100, 120}},
		{"beyond every threshold", 130, 500, 100, def, nil},
		{"not growing", 90, 90, 100, def, nil},
		{"shrinking (a released reservation)", 101, 79, 100, def, nil},
		{"included 0: no percentage, nothing crossed", 0, 1000, 0, def, nil},
		{"no thresholds", 0, 1000, 100, []int{}, nil},
		{"thresholds of 0 or less are ignored", 0, 1000, 100, []int{-10, 0, 80}, []int{80}},
		{"a negative threshold is not read as a huge one", 0, math.MaxInt64, 1, []int{-1}, nil},
		// 80 % of 7 is 5.6: 5 units are below, 6 reach it.
		{"fractional threshold, below", 4, 5, 7, def, nil},
		{"fractional threshold, reached", 5, 6, 7, def, []int{80}},
		// Of 3 units, 80 % is 2.4 (reached at 3), 100 % is 3, 120 % is 3.6
		// (reached at 4).
		{"small quota, from 2 to 3", 2, 3, 3, def, []int{80, 100}},
		{"small quota, from 3 to 4", 3, 4, 3, def, []int{120}},
		{"large thresholds", 0, 10_000, 1000, []int{500, 1000}, []int{500, 1000}},
		// used*100 and t*included overflow int64 here.
		{"huge numbers are compared exactly", 7_200_000_000_000_000_000 - 1, 7_200_000_000_000_000_000, 9_000_000_000_000_000_000, def, []int{80}},
		{"huge numbers, one unit short", 7_200_000_000_000_000_000 - 2, 7_200_000_000_000_000_000 - 1, 9_000_000_000_000_000_000, def, nil},
		{"huge usage against a 120 % threshold", 8_400_000_000_000_000_000 - 1, 8_400_000_000_000_000_000, 7_000_000_000_000_000_000, def, []int{120}},
		{"huge quota, all at once", 0, math.MaxInt64, math.MaxInt64, def, []int{80, 100}},
	}
	for _, tc := range tests {
		got := Crossed(tc.before, tc.after, tc.included, tc.thresholds)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: Crossed(%d, %d, %d, %v) = %v, want %v", tc.name, tc.before, tc.after, tc.included, tc.thresholds, got, tc.want)
		}
	}
}

// TestCrossedEachOnce walks usage up one unit at a time and in uneven steps:
// each threshold is reported exactly once, at the first usage where
// used*100 >= t*included.
func TestCrossedEachOnce(t *testing.T) {
	for _, included := range []int64{1, 3, 7, 100, 1001} {
		for _, step := range []int64{1, 2, 5, 97} {
			seen := map[int]int64{}
			for used := int64(0); used < 2*included; {
				next := used + step
				for _, th := range Crossed(used, next, included, DefaultThresholds()) {
					if _, dup := seen[th]; dup {
						t.Fatalf("included %d step %d: %d%% reported twice", included, step, th)
					}
					seen[th] = next
				}
				used = next
			}
			for _, th := range DefaultThresholds() {
				first := (int64(th)*included + 99) / 100 // smallest used with used*100 >= th*included
				at, ok := seen[th]
				if !ok || at < first || at-step >= first {
					t.Errorf("included %d step %d: %d%% reported at %d (ok %v), first reached at %d", included, step, th, at, ok, first)
				}
			}
		}
	}
}

func TestParseThresholds(t *testing.T) {
	tests := []struct {
		args string
		want []int
	}{
		{"80 100 120", []int{80, 100, 120}},
		{"100 80", []int{80, 100}},
		{"50% 90%", []int{50, 90}},
		{"1 1000", []int{1, 1000}},
		{"off", []int{}},
	}
	for _, tc := range tests {
		got, err := ParseThresholds(strings.Fields(tc.args))
		if err != nil || !slices.Equal(got, tc.want) || got == nil {
			t.Errorf("ParseThresholds(%q) = %v, %v; want %v", tc.args, got, err, tc.want)
		}
	}
	bad := []struct{ args, err string }{
		{"", "want percentages"},
		{"0", `invalid "0"`},
		{"1001", `invalid "1001"`},
		{"-5", `invalid "-5"`},
		{"+5", `invalid "+5"`},
		{"80.5", `invalid "80.5"`},
		{"eighty", `invalid "eighty"`},
		{"%", `invalid "%"`},
		{"80 100 80", "80% is listed twice"},
		{"80 80%", "80% is listed twice"},
		{"off 80", `invalid "off"`},
	}
	for _, tc := range bad {
		got, err := ParseThresholds(strings.Fields(tc.args))
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("ParseThresholds(%q) = %v, %v; want an error containing %q", tc.args, got, err, tc.err)
		}
	}
}

func TestDefaultThresholdsIsACopy(t *testing.T) {
	DefaultThresholds()[0] = 1
	if got := DefaultThresholds(); !slices.Equal(got, []int{80, 100, 120}) {
		t.Errorf("DefaultThresholds() = %v after a caller modified its copy", got)
	}
}

func TestBillOn(t *testing.T) {
	statuses := []int{0, -1, 99, 100, 101, 199, 200, 204, 299, 300, 304, 399, 400, 404, 429, 499, 500, 502, 599, 600, 999}
	tests := []struct {
		args     string // "" is the zero BillOn
		billable []int
	}{
		{"", []int{200, 204, 299, 300, 304, 399}},
		{"2xx 3xx", []int{200, 204, 299, 300, 304, 399}},
		{"2xx", []int{200, 204, 299}},
		{"2XX 404", []int{200, 204, 299, 404}},
		{"1xx 5xx", []int{100, 101, 199, 500, 502, 599}},
		{"200 429 599", []int{200, 429, 599}},
		{"4xx 404", []int{400, 404, 429, 499}},
	}
	for _, tc := range tests {
		var b BillOn
		if tc.args != "" {
			var err error
			if b, err = ParseBillOn(strings.Fields(tc.args)); err != nil {
				t.Fatalf("ParseBillOn(%q): %v", tc.args, err)
			}
		}
		for _, s := range statuses {
			if got, want := b.Billable(s), slices.Contains(tc.billable, s); got != want {
				t.Errorf("bill_on %q: Billable(%d) = %v, want %v", tc.args, s, got, want)
			}
		}
	}
	if def, _ := ParseBillOn([]string{"2xx", "3xx"}); def.Billable(0) {
		t.Error("status 0 (no response) is billable")
	}
}

func TestParseBillOnRejects(t *testing.T) {
	for _, args := range []string{"", "6xx", "0xx", "2x", "2xxx", "x2x", "99", "600", "2000", "+200", "ok", "20 0"} {
		if _, err := ParseBillOn(strings.Fields(args)); err == nil {
			t.Errorf("ParseBillOn(%q) accepted", args)
		}
	}
}
