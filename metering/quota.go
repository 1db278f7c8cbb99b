package metering

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// Over-quota modes: what happens to requests once a customer's included
// units for the period are used up.
const (
	// ModeBlock denies requests that do not fit the remaining quota (429,
	// quota-exceeded, Retry-After until the period ends).
	ModeBlock = "block"
	// ModeBill admits them and records the units beyond the quota as
	// overage, charged at PriceMicros per unit.
	ModeBill = "bill"
	// ModeThrottle admits them at the lower Throttle rate, recording the
	// units beyond the quota as overage (charged when PriceMicros > 0).
	ModeThrottle = "throttle"
)

// OverQuota is a tier's over_quota setting.
type OverQuota struct {
	// Mode is ModeBlock, ModeBill or ModeThrottle.
	Mode string
	// PriceMicros is the price of one overage unit in micro-units of the
	// configured currency; zero for block and for throttle without bill.
	PriceMicros int64
	// Throttle is the rate applied after the quota in ModeThrottle; nil
	// otherwise.
	Throttle *limiter.Policy
}

// Validate checks that the fields are consistent with Mode: no price or
// rate for block, a non-negative price for bill, and a valid rate for
// throttle.
func (o OverQuota) Validate() error {
	if o.PriceMicros < 0 {
		return fmt.Errorf("over_quota: negative price %d micros", o.PriceMicros)
	}
	switch o.Mode {
	case ModeBlock:
		if o.PriceMicros != 0 || o.Throttle != nil {
			return errors.New("over_quota block takes no price and no rate")
		}
	case ModeBill:
		if o.Throttle != nil {
			return errors.New("over_quota bill takes no rate (use throttle <rate> bill <price>)")
		}
	case ModeThrottle:
		if o.Throttle == nil || !o.Throttle.Valid() {
			return errors.New("over_quota throttle needs a valid rate, e.g. throttle 50/min")
		}
	default:
		return fmt.Errorf("over_quota: unknown mode %q (want block, bill or throttle)", o.Mode)
	}
	return nil
}

// ParseOverQuota parses the arguments of the Caddyfile "over_quota"
// directive:
//
//	block
//	bill <price per unit>              e.g. bill 0.002
//	throttle <rate> [burst <n>] [bill <price per unit>]
//	                                   e.g. throttle 50/min bill 0.001
//
// Rates are written as for ParseRate; prices as for ParseMicros.
func ParseOverQuota(args []string) (OverQuota, error) {
	if len(args) == 0 {
		return OverQuota{}, errors.New("over_quota: want block, bill <price> or throttle <rate> [bill <price>]")
	}
	o := OverQuota{Mode: args[0]}
	rest := args[1:]
	switch o.Mode {
	case ModeBlock:
	case ModeBill:
		if len(rest) == 0 {
			return OverQuota{}, errors.New("over_quota bill: missing price per unit, e.g. bill 0.002")
		}
		price, err := ParseMicros(rest[0])
		if err != nil {
			return OverQuota{}, fmt.Errorf("over_quota bill: %w", err)
		}
		o.PriceMicros, rest = price, rest[1:]
	case ModeThrottle:
		if len(rest) == 0 {
			return OverQuota{}, errors.New("over_quota throttle: missing rate, e.g. throttle 50/min")
		}
		p, after, err := ParseRateArgs(rest)
		if err != nil {
			return OverQuota{}, fmt.Errorf("over_quota throttle: %w", err)
		}
		rest = after
		o.Throttle = &p
		if len(rest) > 0 && rest[0] == "bill" {
			if len(rest) < 2 {
				return OverQuota{}, errors.New("over_quota throttle: missing price per unit after bill")
			}
			price, err := ParseMicros(rest[1])
			if err != nil {
				return OverQuota{}, fmt.Errorf("over_quota throttle bill: %w", err)
			}
			o.PriceMicros, rest = price, rest[2:]
		}
	default:
		return OverQuota{}, fmt.Errorf("over_quota: unknown mode %q (want block, bill or throttle)", o.Mode)
	}
	if len(rest) > 0 {
		return OverQuota{}, fmt.Errorf("over_quota %s: unexpected %q", o.Mode, rest[0])
	}
	return o, o.Validate()
}

// rateUnits maps the unit of a rate ("50/min") to its window.
var rateUnits = map[string]time.Duration{
	"s": time.Second, "sec": time.Second, "second": time.Second,
	"m": time.Minute, "min": time.Minute, "minute": time.Minute,
	"h": time.Hour, "hour": time.Hour,
	"d": 24 * time.Hour, "day": 24 * time.Hour,
}

// ParseRate parses a rate written "<units>/<window>", e.g. "50/min", into a
// policy with Limit units per Period and the default burst (Limit). The
// window is one of s, sec, second, m, min, minute, h, hour, d, day; the
// units a whole number of at least 1, digits only.
func ParseRate(s string) (limiter.Policy, error) {
	n, unit, ok := strings.Cut(s, "/")
	if !ok {
		return limiter.Policy{}, fmt.Errorf("invalid rate %q: expected <units>/<window>, as in 100/min", s)
	}
	window, ok := rateUnits[unit]
	if !ok {
		return limiter.Policy{}, fmt.Errorf("invalid rate %q: unknown window %q; expected s, sec, second, m, min, minute, h, hour, d or day", s, unit)
	}
	limit, err := ParseUnits(n)
	if err != nil || limit == 0 {
		return limiter.Policy{}, fmt.Errorf("invalid rate %q: the limit must be a whole number of at least 1 unit per window", s)
	}
	p := limiter.Policy{Limit: limit, Period: window}
	if !p.Valid() {
		return limiter.Policy{}, fmt.Errorf("invalid rate %q: too large to enforce", s)
	}
	return p, nil
}

// ParseRateArgs parses a rate and its optional burst from the start of
// args, as the Caddyfile writes them after `rate` and `over_quota
// throttle`: "<units>/<window> [burst <units>]". It returns the arguments
// that follow. The burst is a whole number of at least 1, digits only.
func ParseRateArgs(args []string) (p limiter.Policy, rest []string, err error) {
	if len(args) == 0 {
		return limiter.Policy{}, nil, errors.New("expected <units>/<window> [burst <units>], as in 100/min or 1000/min burst 200")
	}
	if p, err = ParseRate(args[0]); err != nil {
		return limiter.Policy{}, nil, err
	}
	rest = args[1:]
	if len(rest) > 0 && rest[0] == "burst" {
		if len(rest) < 2 {
			return limiter.Policy{}, nil, errors.New("expected burst <units> after the rate, as in 1000/min burst 200")
		}
		b, err := ParseUnits(rest[1])
		if err != nil || b == 0 {
			return limiter.Policy{}, nil, fmt.Errorf("invalid burst %q: must be a whole number of at least 1", rest[1])
		}
		p.Burst, rest = b, rest[2:]
		if !p.Valid() {
			return limiter.Policy{}, nil, fmt.Errorf("invalid rate %q burst %d: too large to enforce", args[0], b)
		}
	}
	return p, rest, nil
}

// ParseUnits parses a whole, non-negative number of units written in
// decimal digits only (no sign, no spaces), as quotas, bursts and cost
// limits are written.
func ParseUnits(s string) (int64, error) {
	if s == "" || !allDigits(s) {
		return 0, fmt.Errorf("invalid number %q: expected a whole number written in digits", s)
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("invalid number %q: too large", s)
	}
	return n, nil
}

// Overage is how many of cost units, spent when usedBefore units of the
// period were already used, lie beyond the included units. With included 0
// every unit is overage. Negative arguments count as 0.
func Overage(usedBefore, cost, included int64) int64 {
	usedBefore, cost, included = max(usedBefore, 0), max(cost, 0), max(included, 0)
	if usedBefore >= included {
		return cost
	}
	left := included - usedBefore // > 0, no overflow for non-negative inputs
	return max(cost-left, 0)
}

// Crossed returns the thresholds, in percent of included, that usage
// crosses by going from usedBefore to usedAfter, in the order given
// (ascending when from ParseThresholds). A threshold t is crossed when
// usedBefore*100 < t*included <= usedAfter*100, compared exactly (in 128
// bits), so reaching exactly 80 % crosses 80 and one request may cross
// several thresholds at once. Nothing is crossed when included <= 0 (there
// is no quota to take a percentage of) or when usage does not grow.
// Negative usage counts as 0; thresholds of 0 or less are never crossed.
func Crossed(usedBefore, usedAfter, included int64, thresholds []int) []int {
	if included <= 0 || usedAfter <= usedBefore {
		return nil
	}
	before, after := uint64(max(usedBefore, 0)), uint64(max(usedAfter, 0))
	var crossed []int
	for _, t := range thresholds {
		if t <= 0 {
			continue
		}
		if !reaches(before, uint64(included), uint64(t)) && reaches(after, uint64(included), uint64(t)) {
			crossed = append(crossed, t)
		}
	}
	return crossed
}

// reaches reports whether used*100 >= percent*included, exactly.
func reaches(used, included, percent uint64) bool {
	uh, ul := bits.Mul64(used, 100)
	th, tl := bits.Mul64(percent, included)
	return uh > th || uh == th && ul >= tl
}

// DefaultThresholds returns the default notification thresholds, 80, 100
// and 120 percent of the included units, as a new slice.
func DefaultThresholds() []int { return []int{80, 100, 120} }

// MaxThreshold is the largest threshold accepted, in percent.
const MaxThreshold = 1000

// ParseThresholds parses the arguments of the Caddyfile "thresholds"
// directive: percentages of the included units from 1 to MaxThreshold, each
// optionally followed by '%' (e.g. "80 100 120"), returned in ascending
// order; duplicates are an error. A single "off" returns an empty, non-nil
// slice: no notifications.
func ParseThresholds(args []string) ([]int, error) {
	if len(args) == 0 {
		return nil, errors.New("thresholds: want percentages such as 80 100 120, or off")
	}
	if len(args) == 1 && args[0] == "off" {
		return []int{}, nil
	}
	ts := make([]int, 0, len(args))
	for _, a := range args {
		digits := strings.TrimSuffix(a, "%")
		t, err := strconv.Atoi(digits)
		if err != nil || !allDigits(digits) || t < 1 || t > MaxThreshold {
			return nil, fmt.Errorf("thresholds: invalid %q (want a whole percentage from 1 to %d)", a, MaxThreshold)
		}
		if slices.Contains(ts, t) {
			return nil, fmt.Errorf("thresholds: %d%% is listed twice", t)
		}
		ts = append(ts, t)
	}
	slices.Sort(ts)
	return ts, nil
}

// BillOn selects which responses are billable, by HTTP status. The zero
// BillOn is the default: 2xx and 3xx responses.
type BillOn struct {
	set    bool
	status [10]uint64 // bit s-100 is set when status s is billable; 100..599
}

// ParseBillOn parses the arguments of the Caddyfile "bill_on" directive:
// status classes 1xx to 5xx and specific status codes 100 to 599, e.g.
// "2xx 3xx" (the default) or "2xx 404".
func ParseBillOn(args []string) (BillOn, error) {
	if len(args) == 0 {
		return BillOn{}, errors.New("bill_on: want status classes or codes, e.g. 2xx 3xx")
	}
	b := BillOn{set: true}
	for _, a := range args {
		if len(a) == 3 && a[0] >= '1' && a[0] <= '5' && strings.EqualFold(a[1:], "xx") {
			first := int(a[0]-'0') * 100
			for s := first; s < first+100; s++ {
				b.add(s)
			}
			continue
		}
		code, err := strconv.Atoi(a)
		if err != nil || len(a) != 3 || !allDigits(a) || code < 100 || code > 599 {
			return BillOn{}, fmt.Errorf("bill_on: invalid %q (want a class 1xx-5xx or a status code 100-599)", a)
		}
		b.add(code)
	}
	return b, nil
}

func (b *BillOn) add(status int) {
	i := status - 100
	b.status[i/64] |= 1 << (i % 64)
}

// Billable reports whether a response with this status is billed. Status 0
// (no response: the client went away, or nothing was written) and statuses
// outside 100..599 are never billable.
func (b BillOn) Billable(status int) bool {
	if !b.set {
		return status >= 200 && status <= 399
	}
	if status < 100 || status > 599 {
		return false
	}
	i := status - 100
	return b.status[i/64]&(1<<(i%64)) != 0
}
