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
}

// Admit decides r's quota and the rate policy that applies, given used, the
// period's billed units before r.
func (r Reservation) Admit(used int64) Admission {
	q := r.Quota
	a := Admission{Policy: r.Rate}
	if q.Mode == QuotaThrottle && used >= q.Included {
		a.Policy, a.Throttled = q.Throttle, true
	}
	// Cost > Included-used rather than used+Cost > Included: no overflow.
	a.QuotaExceeded = q.Mode == QuotaBlock && !r.Replay && r.Cost > 0 && r.Cost > q.Included-used
	return a
}
