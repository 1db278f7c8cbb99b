package module

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/spool"
)

// settleTimeout bounds a settlement made after the response: it no longer
// delays the client, but must not pile up goroutines either.
const settleTimeout = 2 * time.Second

// reservation builds the store reservation of a request.
func (a *App) reservation(c caller, cost int64, r *http.Request, now time.Time) (store.Reservation, metering.Period) {
	t := c.tier
	period, periodID := t.period(now, c.customer.BillingAnchor())
	res := store.Reservation{
		Subject: c.customer.ID,
		Cost:    cost,
		Quota: store.Quota{
			PeriodID:   periodID,
			PeriodEnd:  period.End,
			HourID:     hourID(now),
			Included:   t.included,
			Mode:       t.quotaMode,
			Throttle:   t.throttle,
			Thresholds: t.thresholds,
		},
	}
	if t.hasRate {
		res.Rate = t.policy
	}
	// A zero cost makes only the default meter free: the other meters are
	// reserved, enforced and settled as for any cost. A meter whose paths
	// the request is outside of is omitted: neither counted nor enforced.
	if len(t.meters) > 0 {
		res.Meters = make([]store.MeterReservation, 0, len(t.meters))
		for i := range t.meters {
			if tm := &t.meters[i]; tm.appliesTo(r) {
				res.Meters = append(res.Meters, tm.reservation(tm.advance(r, cost)))
			}
		}
		if len(res.Meters) == 0 {
			res.Meters = nil
		}
	}
	a.idempotency.apply(&res, r, cost)
	if cost > 0 || len(res.Meters) > 0 {
		o := a.shared.liveOrigin()
		res.Origin, res.Seq = o.id, o.seq.next(c.customer.ID)
	}
	return res, period
}

// reserve decides a request. When the store cannot be reached, the tier's
// on_store_error decides and the usage of an admitted request is kept for
// replay. errStoreDenied means the tier denies during outages; an error
// wrapping store.ErrBusy means the call could not be sent in time (local
// saturation): the request is shed, not decided without the store.
func (a *App) reserve(ctx context.Context, m store.Meter, res store.Reservation, t *tierRuntime) (store.Reserved, bool, error) {
	var out store.Reserved
	var err error
	if storeFailedBefore(ctx) && ctx.Err() != nil {
		// The key lookup spent the request's deadline on an unreachable
		// store: no time is left to ask it.
		err = fmt.Errorf("%w: %w: no time left after the key lookup: %w", store.ErrUnavailable, store.ErrNotSent, ctx.Err())
	} else {
		out, err = m.Reserve(ctx, res)
	}
	if err == nil {
		a.shared.usage.observe(res, out, time.Now().UnixMicro())
		return out, false, nil
	}
	if errors.Is(err, store.ErrBusy) && !storeFailedBefore(ctx) {
		// Never sent: this process is saturated, and deciding without
		// the store would admit beyond the shared budget. Shed it. (Not
		// sent because the request's key lookup spent its deadline on an
		// unreachable store: that outage decides, below.)
		return store.Reserved{}, false, err
	}
	getMetrics().storeErrors.WithLabelValues("reserve").Inc()
	a.logStoreError("reserve", err)
	// The outcome is unknown when the call may have been sent: the store
	// did not answer in time or the caller gave up (not a refusal of its
	// own checks, nor a call certainly never sent).
	unknown := (errors.Is(err, store.ErrUnavailable) || errors.Is(err, context.Canceled)) && !errors.Is(err, store.ErrNotSent)
	out, err = a.reserveDegraded(res, t)
	if unknown && (err != nil || !out.Allowed) {
		a.void(res)
	}
	return out, true, err
}

// void spools the release of res, a reservation whose call may have been
// sent (its outcome is unknown) and whose request is refused without the
// store: should the call still run when the store answers again, the
// replayed void takes back what it counted, and if it has not run yet, its
// (Origin, Seq) is marked so that it counts nothing when it does (see
// store.Settlement.Void). Only a shared store (with a spool) can run a
// call after its caller gave up on it.
func (a *App) void(res store.Reservation) {
	if res.Seq < 1 || res.Origin == "" || a.shared.spool.Load() == nil {
		return
	}
	s := store.VoidOf(res)
	a.shared.keep(spool.Record{Settlement: &s})
}

// reserveDegraded decides without the store, per the tier's
// on_store_error: "deny" refuses, "allow" admits, "local" applies this
// instance's share of the rate from the last rate state the store reported
// (see localShare) and the quota against the last usage this process saw
// plus what it admitted since. Admitted usage is spooled for replay.
func (a *App) reserveDegraded(res store.Reservation, t *tierRuntime) (store.Reserved, error) {
	if t.onStoreError == storeErrorDeny {
		return store.Reserved{}, errStoreDenied
	}
	out := store.Reserved{Allowed: true}
	used := a.shared.usage.get(res.Subject, res.Quota.PeriodID)
	var meterUsed []int64
	if len(res.Meters) > 0 {
		meterUsed = a.shared.usage.getMeters(res.Subject, res.Quota.PeriodID, res.Meters)
	}
	q := res.Quota
	if t.onStoreError == storeErrorLocal {
		adm := res.AdmitMeters(used, meterUsed) // the stores' decision (store/admission.go)
		if adm.QuotaExceeded {
			return store.Reserved{QuotaExceeded: true, QuotaExceededMeter: adm.QuotaExceededMeter, Used: used, Meters: meterOutcomes(res.Meters, meterUsed)}, nil
		}
		policy := adm.Policy
		out.Throttled = adm.Throttled
		if policy.Valid() {
			// This instance's share, from the store's last word (see
			// fallback.go).
			now := time.Now().UnixMicro()
			tat, interval := a.shared.usage.rateSeen(res.Subject)
			share, floor := localShare(policy, a.shared.liveInstances(), adm.Units, tat, interval, now)
			out.Rate = a.shared.local.AdmitFrom(res.Subject, share, adm.Units, now, floor)
			out.Allowed = out.Rate.Allowed
		}
	}
	if !out.Allowed || res.Cost == 0 && len(res.Meters) == 0 {
		out.Used = used
		out.Meters = meterOutcomes(res.Meters, meterUsed)
		return out, nil
	}
	if q.Mode != store.QuotaMeter {
		out.Overage = metering.Overage(used, res.Cost, q.Included)
	}
	out.Used = a.shared.usage.add(res.Subject, q.PeriodID, res.Cost)
	if len(res.Meters) > 0 {
		out.Meters = make([]store.MeterReserved, len(res.Meters))
		for i, m := range res.Meters {
			if m.Mode != store.QuotaMeter {
				out.Meters[i].Overage = metering.Overage(meterUsed[i], m.Amount, m.Included)
			}
			out.Meters[i].Used = a.shared.usage.addMeter(res.Subject, q.PeriodID, m.Meter, m.Amount)
		}
	}
	res.Replay = true
	a.shared.keep(spool.Record{Reservation: &res})
	return out, nil
}

// meterOutcomes reports the meters' usage, unchanged, for a reservation
// decided without the store and not counted.
func meterOutcomes(ms []store.MeterReservation, used []int64) []store.MeterReserved {
	if len(ms) == 0 {
		return nil
	}
	out := make([]store.MeterReserved, len(ms))
	for i := range ms {
		out[i].Used = used[i]
	}
	return out
}

// settle corrects the reservation once the response is known: a response
// outside bill_on (or none) releases it, an upstream-reported cost
// replaces it. A billable response at the reserved cost needs no store
// call.
func (a *App) settle(m store.Meter, res store.Reservation, out store.Reserved, degraded bool, mw *meteredWriter, serveErr error) {
	actual := res.Cost
	billable := serveErr == nil && mw.status != 0 && a.billOn.Billable(mw.status)
	switch {
	case !billable:
		actual = 0
	case mw.hasReported && res.Cost > 0: // a zero cost keeps the default meter free
		actual = mw.reported
	}
	var meters []store.MeterSettlement
	if len(res.Meters) > 0 {
		meters = mw.tally.settlements(res, out, billable, actual)
	}
	if actual == res.Cost && len(meters) == 0 {
		return
	}
	s := store.Settlement{
		Subject: res.Subject, Quota: res.Quota,
		IdempotencyKey: res.IdempotencyKey, IdempotencyFingerprint: res.IdempotencyFingerprint,
		Reserved: res.Cost, Overage: out.Overage, Actual: actual,
		Origin: res.Origin, Seq: res.Seq, Meters: meters,
	}
	a.shared.usage.add(res.Subject, res.Quota.PeriodID, actual-res.Cost)
	for _, ms := range meters {
		a.shared.usage.addMeter(res.Subject, res.Quota.PeriodID, ms.Meter, ms.Actual-ms.Reserved)
	}
	if !degraded {
		ctx, cancel := context.WithTimeout(context.Background(), settleTimeout)
		err := m.Settle(ctx, s)
		cancel()
		if err == nil {
			return
		}
		getMetrics().storeErrors.WithLabelValues("settle").Inc()
		a.logStoreError("settle", err)
	}
	s.Replay = true
	a.shared.keep(spool.Record{Settlement: &s})
}

// usageCache remembers, per subject, the last period usage seen, so that
// quotas can still be enforced in process while the store is unreachable.
type usageCache struct {
	mu sync.RWMutex
	m  map[string]*usageEntry
}

type usageEntry struct {
	mu     sync.Mutex
	period string
	used   int64
	// meters are the other meters' usage in period, by name; nil until a
	// meter is seen.
	meters map[string]int64
	// rateTAT and rateInterval are the customer's rate state as the store
	// last reported it (see usageCache.observe); rateInterval is 0 until
	// then.
	rateTAT, rateInterval int64
}

// entry returns subject's entry, creating it.
func (u *usageCache) entry(subject string) *usageEntry {
	u.mu.RLock()
	e := u.m[subject]
	u.mu.RUnlock()
	if e != nil {
		return e
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.m == nil {
		u.m = make(map[string]*usageEntry)
	}
	if e = u.m[subject]; e == nil {
		e = new(usageEntry)
		u.m[subject] = e
	}
	return e
}

func (u *usageCache) get(subject, period string) int64 {
	e := u.entry(subject)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.period != period {
		return 0
	}
	return e.used
}

// add adjusts a subject's usage by delta and returns it.
func (u *usageCache) add(subject, period string, delta int64) int64 {
	e := u.entry(subject)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.setPeriod(period)
	e.used += delta
	return e.used
}

// setPeriod starts period's usage at zero if e holds another period's.
func (e *usageEntry) setPeriod(period string) {
	if e.period != period {
		e.period, e.used, e.meters = period, 0, nil
	}
}

// getMeters returns a subject's usage of each of ms in period.
func (u *usageCache) getMeters(subject, period string, ms []store.MeterReservation) []int64 {
	used := make([]int64, len(ms))
	e := u.entry(subject)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.period == period {
		for i, m := range ms {
			used[i] = e.meters[m.Meter]
		}
	}
	return used
}

// addMeter adjusts a subject's usage of meter by delta and returns it.
func (u *usageCache) addMeter(subject, period, meter string, delta int64) int64 {
	e := u.entry(subject)
	e.mu.Lock()
	defer e.mu.Unlock()
	e.setPeriod(period)
	if e.meters == nil {
		e.meters = make(map[string]int64)
	}
	e.meters[meter] += delta
	return e.meters[meter]
}

// seqs numbers this process's reservations per subject (see
// store.Reservation.Seq).
type seqs struct {
	mu sync.RWMutex
	m  map[string]*atomic.Int64
}

func (s *seqs) next(subject string) int64 {
	s.mu.RLock()
	c := s.m[subject]
	s.mu.RUnlock()
	if c == nil {
		s.mu.Lock()
		if s.m == nil {
			s.m = make(map[string]*atomic.Int64)
		}
		if c = s.m[subject]; c == nil {
			c = new(atomic.Int64)
			s.m[subject] = c
		}
		s.mu.Unlock()
	}
	return c.Add(1)
}

// periodCache is a calendar tier's current period and its id.
type periodCache struct {
	period metering.Period
	id     string
}

// period returns the billing period containing now for a customer with
// this anchor, and its id. Calendar periods are the same for every
// customer, so the current one is computed once.
func (t *tierRuntime) period(now, anchor time.Time) (metering.Period, string) {
	if t.periodRule.Anniversary {
		p := t.periodRule.Period(now, anchor)
		return p, p.ID()
	}
	if c := t.calendar.Load(); c != nil && c.period.Contains(now) {
		return c.period, c.id
	}
	p := t.periodRule.Period(now, anchor)
	t.calendar.Store(&periodCache{period: p, id: p.ID()})
	return p, p.ID()
}

// hourCache is the current UTC hour's ledger id.
type hourCache struct {
	hour int64 // Unix seconds / 3600
	id   string
}

var currentHour atomic.Pointer[hourCache]

// hourID is the ledger id of now's UTC hour, computed once per hour.
func hourID(now time.Time) string {
	h := now.Unix() / 3600
	if c := currentHour.Load(); c != nil && c.hour == h {
		return c.id
	}
	id := metering.TimeID(metering.HourStart(now))
	currentHour.Store(&hourCache{hour: h, id: id})
	return id
}
