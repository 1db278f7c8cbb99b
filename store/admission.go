package store

import "github.com/apimonetize/caddy-api-monetize/limiter"

// Admission is the part of a reservation's decision that depends on the
// period's usage: which rate policy applies and whether a block quota
// refuses. It is written once, here, for both deciders in Go (the embedded
// store's Reserve and the api_monetize app's decision while its store is
// unreachable); redisstore's script writes the same rules in Lua, and
// storetest holds every store to them.
type Admission struct {
	// Policy is the rate policy to apply: the tier's rate, or the
	// throttle once a throttle quota's included units are used up. A zero
	// Limit means none.
	Policy limiter.Policy
	// Throttled reports that Policy is the throttle.
	Throttled bool
	// QuotaExceeded reports that a block quota refuses the reservation:
	// its cost does not fit the included units left. A reservation that
	// costs nothing, or a Replay (already served), is never refused.
	QuotaExceeded bool
	// QuotaExceededMeter names the meter whose block quota refuses (see
	// AdmitMeters): "" for the default meter.
	QuotaExceededMeter string
	// Units is what the applicable rate spends: the reservation's Cost,
	// or, for a zero Cost with Meters that a meter's throttle applies to
	// (one of its meters in QuotaThrottle mode is used up), 1.
	Units int64
}

// Admit decides r's quota and the rate policy that applies, given used, the
// period's billed units before r.
func (r Reservation) Admit(used int64) Admission {
	q := r.Quota
	a := Admission{Policy: r.Rate, Units: r.Cost}
	if q.Mode == QuotaThrottle && used >= q.Included {
		a.Policy, a.Throttled = q.Throttle, true
	}
	// Cost > Included-used rather than used+Cost > Included: no overflow.
	a.QuotaExceeded = q.Mode == QuotaBlock && !r.Replay && r.Cost > 0 && r.Cost > q.Included-used
	return a
}

// AdmitMeters is Admit for a reservation with Meters: used is the default
// meter's billed units before r and meterUsed[i] those of r.Meters[i]. A
// block meter refuses when its Amount does not fit the units left, or, for
// a meter known only after the response (Amount 0), once it is used up;
// the first refusing meter, the default one first, is reported. The
// throttle applies when any throttle-mode meter (the default one included)
// is used up; when several are, the slowest of their throttles applies
// (see SlowerPolicy). A zero Cost makes the default meter free, not the
// others: their block quotas refuse as for any Cost, and a zero-Cost
// reservation a meter's throttle applies to spends one unit of the
// throttle (Units).
func (r Reservation) AdmitMeters(used int64, meterUsed []int64) Admission {
	a := r.Admit(used)
	for i, m := range r.Meters {
		u := meterUsed[i]
		if m.Mode == QuotaThrottle && u >= m.Included {
			if !a.Throttled || SlowerPolicy(m.Throttle, a.Policy) {
				a.Policy = m.Throttle
			}
			a.Throttled = true
			if a.Units == 0 {
				a.Units = 1
			}
		}
		if !a.QuotaExceeded && m.Mode == QuotaBlock && !r.Replay && m.Exceeds(u) {
			a.QuotaExceeded, a.QuotaExceededMeter = true, m.Meter
		}
	}
	return a
}

// Exceeds reports whether m's block quota refuses a request at used, the
// meter's units before it: a known Amount that does not fit the units
// left, or, for an Amount of 0 (known only after the response), a meter
// already used up. It does not look at Mode.
func (m MeterReservation) Exceeds(used int64) bool {
	if m.Amount > 0 {
		return m.Amount > m.Included-used // no overflow: both non-negative
	}
	return used >= m.Included
}

// SlowerPolicy reports whether rate policy a admits less than b: an
// invalid policy (which admits nothing) is the slowest, no policy (a zero
// Limit) the fastest; otherwise the longer emission interval, then the
// smaller burst, is slower.
func SlowerPolicy(a, b limiter.Policy) bool {
	rank := func(p limiter.Policy) int {
		switch {
		case p.Limit == 0:
			return 0
		case !p.Valid():
			return 2
		}
		return 1
	}
	ra, rb := rank(a), rank(b)
	if ra != rb || ra != 1 {
		return ra > rb
	}
	ia, ib := a.Interval(), b.Interval()
	return ia > ib || ia == ib && a.BurstUnits() < b.BurstUnits()
}
