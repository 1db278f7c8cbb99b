package module

import (
	"context"
	"math"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// The on_store_error local fallback continues from what the store last
// said and takes this instance's share of each customer's budget, so that
// n instances deciding on their own admit together what one limiter with a
// full bucket would (see the README, "Stores, reloads and failures"):
//
//   - Each decision of the store leaves, per customer, its rate state: when
//     the customer's shared bucket will be full again (the TAT, in this
//     process's clock), in units of the policy that applied. A local
//     decision starts from it: the units the store had counted as owed are
//     still owed.
//   - While the store answers, every instance records itself in it every
//     heartbeatInterval and reads how many instances are live (n). Locally,
//     an instance admits 1/n of the rate (its emission interval is
//     ⌈n·period/limit⌉) with 1/n of the burst (⌊B/n⌋, at least 1; a single
//     request costing more than that, but no more than B, passes only on a
//     full local bucket), and of the units left in the shared bucket when
//     it last saw it, its share ⌊(B − owed)/n⌋.
//
// Over an outage of length D, instance i admits at most max(1, ⌊B/n⌋) +
// ⌊D/Tₙ⌋ units (Tₙ its share's emission interval), so all n together at
// most n·max(1, ⌊B/n⌋) + n·⌊D/Tₙ⌋, which is ≤ B + ⌊D·limit/period⌋ when
// B ≥ n.

// Instance heartbeats (see shared.heartbeatLoop).
const (
	// heartbeatInterval is how often a live instance records itself.
	heartbeatInterval = time.Second
	// heartbeatTTL is how long an instance counts as live after its last
	// heartbeat: three missed heartbeats.
	heartbeatTTL = 3 * heartbeatInterval
	// maxShareInstances caps the instance count a share is computed for.
	maxShareInstances = 1024
)

// instanceCounter is implemented by stores shared by several instances
// (redisstore): Heartbeat records instance as live for ttl and returns how
// many are live. A store without it is used by one instance.
type instanceCounter interface {
	Heartbeat(ctx context.Context, instance string, ttl time.Duration) (int, error)
}

// liveInstances is how many instances shared the store when it last
// answered a heartbeat (1 before the first one, or without heartbeats).
func (s *shared) liveInstances() int64 {
	return max(1, min(s.instances.Load(), maxShareInstances))
}

// heartbeatLoop records this instance in the store every
// heartbeatInterval and keeps the live instance count, until ctx is done.
// It runs in the background: the request path only reads the count.
func (s *shared) heartbeatLoop(ctx context.Context, hb instanceCounter) {
	t := time.NewTicker(heartbeatInterval)
	defer t.Stop()
	for {
		beat, cancel := context.WithTimeout(ctx, heartbeatInterval)
		n, err := hb.Heartbeat(beat, s.instanceID, heartbeatTTL)
		cancel()
		switch {
		case err == nil:
			if old := s.instances.Swap(int64(n)); old != int64(n) {
				getMetrics().liveInstances.Set(float64(n))
				s.logger.Info("instances sharing the store", zap.Int("live", n), zap.Int64("before", old))
			}
		case ctx.Err() == nil:
			// The count seen last stays: it is the share during an outage.
			s.logger.Debug("instance heartbeat failed", zap.Error(err))
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// observe records what the store said about a reservation: the period's
// usage (for quotas) and the rate state (for the local rate fallback), at
// now (µs, this process's clock; the state is at least as full as the
// store's, since the reply came after the decision).
func (u *usageCache) observe(res store.Reservation, out store.Reserved, now int64) {
	interval := int64(0)
	if !out.Duplicate {
		switch {
		case out.Throttled:
			if p, _ := appliedThrottle(res, out); p.Valid() {
				interval = p.Interval()
			}
		case !out.Throttled && res.Rate.Valid():
			interval = res.Rate.Interval()
		}
	}
	if res.Cost == 0 && len(res.Meters) == 0 && interval == 0 {
		return
	}
	e := u.entry(res.Subject)
	e.mu.Lock()
	if res.Cost > 0 || len(res.Meters) > 0 {
		if e.period != res.Quota.PeriodID {
			e.meters = nil
		}
		e.period, e.used = res.Quota.PeriodID, out.Used
		if len(res.Meters) > 0 && len(out.Meters) == len(res.Meters) {
			if e.meters == nil {
				e.meters = make(map[string]int64, len(res.Meters))
			}
			for i, m := range res.Meters {
				e.meters[m.Meter] = out.Meters[i].Used
			}
		}
	}
	if interval > 0 {
		e.rateTAT, e.rateInterval = now+out.Rate.ResetAfter.Microseconds(), interval
	}
	e.mu.Unlock()
}

// rateSeen returns subject's rate state as the store last reported it:
// its TAT and the emission interval it is in (0 when none was seen).
func (u *usageCache) rateSeen(subject string) (tat, interval int64) {
	e := u.entry(subject)
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.rateTAT, e.rateInterval
}

// localShare returns the policy this instance applies for p, one of n
// live instances, to a request of cost units while the store is
// unreachable, and the TAT floor (µs) it starts from at now: its share of
// what the store last left in the customer's bucket, whose TAT was seenTAT
// under the emission interval seenInterval (0: never seen).
func localShare(p limiter.Policy, n, cost, seenTAT, seenInterval, now int64) (limiter.Policy, int64) {
	burst := p.BurstUnits()
	owed := int64(0)
	if seenInterval > 0 && seenTAT > now {
		owed = min(burst, (seenTAT-now+seenInterval-1)/seenInterval)
	}
	share := max(1, burst/n)
	left := (burst - owed) / n
	periodUS := p.Period.Microseconds()
	if n > math.MaxInt64/periodUS {
		n = math.MaxInt64 / periodUS
	}
	interval := (n*periodUS-1)/p.Limit + 1
	interval = min(interval, math.MaxInt64/int64(time.Microsecond))
	sp := limiter.Policy{Limit: 1, Period: time.Duration(interval) * time.Microsecond, Burst: share}
	if cost > share && cost <= burst {
		// One request above the share passes on a full local bucket.
		sp.Burst = cost
	}
	if !sp.Valid() {
		return p, seenTAT
	}
	return sp, now + (share-left)*interval
}
