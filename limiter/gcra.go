// Package limiter implements the Generic Cell Rate Algorithm (GCRA) with
// integer microsecond arithmetic, and an in-process limiter built on it.
//
// A policy admits Limit units per Period with bursts of up to Burst units.
// The only state per subject is the theoretical arrival time (TAT): the
// instant, in microseconds since the Unix epoch, at which the subject's
// bucket would be full again. A denied request never moves the TAT, so it
// consumes nothing, and a TAT at or before now is equivalent to no TAT.
package limiter

import "time"

// MaxBurstSpan is the longest time, in microseconds, a policy's full burst may
// take to be restored (Interval times BurstUnits): about 142 years. It keeps
// every sum and every Duration in Decide within int64.
const MaxBurstSpan = 1 << 52

// Policy is a GCRA rate-limit policy: Limit units per Period, with bursts of
// up to Burst units (Burst defaults to Limit when zero or negative).
type Policy struct {
	// Limit is how many units are admitted per Period.
	Limit int64
	// Period is the window the Limit applies to.
	Period time.Duration
	// Burst is the largest number of units admitted at once. Zero means Limit.
	Burst int64
}

// Interval is the emission interval in microseconds: the time one unit takes
// to be restored. It is rounded up, so the sustained rate never exceeds Limit
// units per Period. The policy must be Valid.
func (p Policy) Interval() int64 {
	return (p.Period.Microseconds()-1)/p.Limit + 1
}

// BurstUnits is the effective burst: Burst, or Limit when Burst is unset.
func (p Policy) BurstUnits() int64 {
	if p.Burst > 0 {
		return p.Burst
	}
	return p.Limit
}

// Valid reports whether the policy can admit anything at all: a positive
// Limit, a Period of at least a microsecond, and a burst span no longer than
// MaxBurstSpan.
func (p Policy) Valid() bool {
	return p.Limit > 0 && p.Period >= time.Microsecond &&
		p.BurstUnits() <= MaxBurstSpan/p.Interval()
}

// Decision is the outcome of one GCRA evaluation.
type Decision struct {
	// Allowed reports whether the request's cost was admitted.
	Allowed bool
	// Remaining is how many units could still be admitted right now, after
	// this decision.
	Remaining int64
	// RetryAfter is, when denied, exactly how long to wait until the same
	// cost would be admitted (if nothing else is admitted meanwhile). It is
	// zero when allowed, and zero when CostExceedsBurst.
	RetryAfter time.Duration
	// ResetAfter is how long until the bucket is full again (Remaining equal
	// to the burst) if nothing else is admitted.
	ResetAfter time.Duration
	// CostExceedsBurst reports that the cost is larger than the burst (or the
	// policy is not Valid), so no amount of waiting admits it.
	CostExceedsBurst bool
}

// Decide evaluates cost units against the policy for a subject whose stored
// TAT is tat (zero when unknown), at now (microseconds since the epoch). It
// returns the TAT to store and the decision. The returned TAT equals tat
// unless cost units were admitted. A cost of zero or less only reports the
// current state and is always Allowed. An invalid policy admits nothing and
// reports CostExceedsBurst for any positive cost.
func (p Policy) Decide(tat, now, cost int64) (int64, Decision) {
	if !p.Valid() {
		return tat, Decision{CostExceedsBurst: cost > 0}
	}
	interval := p.Interval()
	burst := p.BurstUnits()
	burstSpan := interval * burst
	base := max(tat, now) // a TAT in the past is a full bucket
	// Units admissible now: k such that base + k*interval - burstSpan <= now.
	// It is negative only when tat was stored under a larger burst.
	avail := max(0, (now+burstSpan-base)/interval)
	reset := usec(base - now)
	switch {
	case cost <= 0:
		return tat, Decision{Allowed: true, Remaining: avail, ResetAfter: reset}
	case cost > burst:
		return tat, Decision{Remaining: avail, ResetAfter: reset, CostExceedsBurst: true}
	}
	newTAT := base + interval*cost
	allowAt := newTAT - burstSpan
	if now < allowAt {
		return tat, Decision{Remaining: avail, RetryAfter: usec(allowAt - now), ResetAfter: reset}
	}
	return newTAT, Decision{
		Allowed:    true,
		Remaining:  (now - allowAt) / interval,
		ResetAfter: usec(newTAT - now),
	}
}

func usec(us int64) time.Duration {
	return time.Duration(us) * time.Microsecond
}

// Rescale converts a TAT stored under the emission interval from into this
// policy's interval, so that a rate change (a tier upgrade, a reload)
// carries over the units still owed rather than the time: 4 units spent
// under 10/min are still 4 units spent under 100/min. Owed units are
// rounded up and capped at one full burst. A TAT in the past, an unknown
// interval (0) or an unchanged one is returned as is.
func (p Policy) Rescale(tat, now, from int64) int64 {
	to := p.Interval()
	if tat <= now || from <= 0 || from == to || !p.Valid() {
		return tat
	}
	owed := (tat - now + from - 1) / from
	if burst := p.BurstUnits(); owed > burst {
		owed = burst
	}
	return now + owed*to
}
