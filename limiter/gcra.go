// Package limiter implements the Generic Cell Rate Algorithm (GCRA) with
// integer microsecond arithmetic, and an in-process limiter built on it.
//
// A policy admits Limit units per Period with bursts of up to Burst units.
// The only state per subject is the theoretical arrival time (TAT): the
// instant, in microseconds since the Unix epoch, at which the subject's
// bucket would be full again. A denied request never moves the TAT, so it
// consumes nothing.
package limiter

import "time"

// Policy is a GCRA rate-limit policy: Limit units per Period, with bursts of
// up to Burst units (Burst defaults to Limit when zero).
type Policy struct {
	// Limit is how many units are admitted per Period.
	Limit int64
	// Period is the window the Limit applies to.
	Period time.Duration
	// Burst is the largest number of units admitted at once. Zero means Limit.
	Burst int64
}

// Interval is the emission interval in microseconds: the time one unit takes
// to be restored. It is rounded up, so a policy never admits more than Limit
// units per Period.
func (p Policy) Interval() int64 {
	period := p.Period.Microseconds()
	return (period + p.Limit - 1) / p.Limit
}

// BurstUnits is the effective burst: Burst, or Limit when Burst is unset.
func (p Policy) BurstUnits() int64 {
	if p.Burst > 0 {
		return p.Burst
	}
	return p.Limit
}

// Valid reports whether the policy can admit anything at all.
func (p Policy) Valid() bool {
	return p.Limit > 0 && p.Period >= time.Microsecond
}

// Decision is the outcome of one GCRA evaluation.
type Decision struct {
	// Allowed reports whether the request's cost was admitted.
	Allowed bool
	// Remaining is how many units could still be admitted right now, after
	// this decision.
	Remaining int64
	// RetryAfter is, when denied, how long to wait until the same cost would
	// be admitted. It is zero when allowed. When the cost exceeds the burst it
	// can never be admitted; see CostExceedsBurst.
	RetryAfter time.Duration
	// ResetAfter is how long until the bucket is full again (Remaining equal
	// to the burst) if nothing else is admitted.
	ResetAfter time.Duration
	// CostExceedsBurst reports that the cost is larger than the burst, so no
	// amount of waiting admits it.
	CostExceedsBurst bool
}

// Decide evaluates cost units against the policy for a subject whose stored
// TAT is tat (zero when unknown), at now (microseconds since the epoch). It
// returns the TAT to store (unchanged when denied or when cost is zero) and
// the decision. A zero cost only reports the current state.
func (p Policy) Decide(tat, now, cost int64) (int64, Decision) {
	interval := p.Interval()
	burstSpan := interval * p.BurstUnits()
	if tat < now {
		tat = now
	}
	newTAT := tat + interval*cost
	allowAt := newTAT - burstSpan
	if now < allowAt {
		d := Decision{
			Remaining:  max(0, (now-(tat-burstSpan))/interval),
			RetryAfter: time.Duration(allowAt-now) * time.Microsecond,
			ResetAfter: time.Duration(tat-now) * time.Microsecond,
		}
		if cost > p.BurstUnits() {
			d.CostExceedsBurst = true
		}
		return tat, d
	}
	return newTAT, Decision{
		Allowed:    true,
		Remaining:  (now - allowAt) / interval,
		ResetAfter: time.Duration(newTAT-now) * time.Microsecond,
	}
}
