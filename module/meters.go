package module

import (
	"fmt"
	"net/http"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// meterRuntime is a declared meter compiled for the request path.
type meterRuntime struct {
	name string
	kind string
	// header is the canonical header of a header source.
	header string
	// max caps one request's amount; 0: no cap (bytes only).
	max         int64
	stripeEvent string
}

// tierMeter is a tier's view of one meter, compiled: the meter's quota in
// this tier (store.QuotaMeter without a block) and its header names.
type tierMeter struct {
	*meterRuntime
	// quota holds the meter's included units, over-quota mode, throttle,
	// thresholds and their policy names (quotaName "<tier>-<meter>-month"),
	// compiled as a tier's own (see compileQuota).
	quota *tierRuntime
}

// compileMeters compiles the app's meters; compileTiers then gives each
// tier its view of every meter, in the order the meters are declared.
func (a *App) compileMeters() {
	a.meters = make([]*meterRuntime, len(a.Meters))
	for i, m := range a.Meters {
		a.meters[i] = &meterRuntime{
			name: m.Name, kind: m.Source.Kind, max: m.Source.Max,
			header: http.CanonicalHeaderKey(m.Source.Header), stripeEvent: m.stripeEvent(),
		}
	}
}

// compileTierMeters gives t its view of every meter of meters: the
// tier's block for it, or only metering.
func (t *tierRuntime) compileTierMeters(meters []*meterRuntime) error {
	if len(meters) == 0 {
		return nil
	}
	t.meters = make([]tierMeter, len(meters))
	for i, m := range meters {
		tm := tierMeter{meterRuntime: m, quota: new(tierRuntime)}
		tm.quota.Tier = Tier{Name: t.Name + "-" + m.name}
		for _, b := range t.Tier.Meters {
			if b.Meter == m.name {
				tm.quota.Included, tm.quota.OverQuota, tm.quota.Tier.Thresholds = b.Included, b.OverQuota, b.Thresholds
			}
		}
		if err := tm.quota.compileQuota(t.thresholds); err != nil {
			return fmt.Errorf("meter %s: %w", m.name, err)
		}
		t.meters[i] = tm
	}
	return nil
}

// meterReservation is the store's view of the tier's meter with amount.
func (tm *tierMeter) reservation(amount int64) store.MeterReservation {
	q := tm.quota
	return store.MeterReservation{
		Meter: tm.name, Amount: amount, Included: q.included, Mode: q.quotaMode,
		Throttle: q.throttle, Thresholds: q.thresholds,
	}
}

// advance is the amount of meter m known before the upstream is called:
// the cost for a cost source, the Content-Length of a request_bytes
// source (capped), 0 otherwise.
func (m *meterRuntime) advance(r *http.Request, cost int64) int64 {
	switch m.kind {
	case sourceCost:
		return cost
	case sourceRequestBytes:
		if r.ContentLength >= 0 {
			return m.capped(r.ContentLength)
		}
	}
	return 0
}

// capped applies the meter's max, if any.
func (m *meterRuntime) capped(n int64) int64 {
	if m.max > 0 {
		return min(n, m.max)
	}
	return n
}

// quotaItem is the RateLimit-Policy name of the meter's quota, quoted.
func (tm *tierMeter) hasQuota() bool { return tm.quota.quotaMode != store.QuotaMeter }
