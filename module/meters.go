package module

import (
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/apimonetize/caddy-api-monetize/limiter"

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
	// paths are the path patterns the meter applies to; nil: every path.
	paths caddyhttp.MatchPath
}

// tierMeter is a tier's view of one meter, compiled: the meter's quota in
// this tier (store.QuotaMeter without a block) and its header names.
type tierMeter struct {
	*meterRuntime
	// ignored counts the meter's header values that were ignored.
	ignored prometheus.Counter
	// units counts the meter's units counted in this tier (the final
	// amounts of admitted requests: meter_units_total).
	units prometheus.Counter
	// quota holds the meter's included units, over-quota mode, throttle,
	// thresholds and their policy names (quotaName "<tier>-<meter>-month"),
	// compiled as a tier's own (see compileQuota).
	quota *tierRuntime
}

// compileMeters compiles the app's meters; compileTiers then gives each
// tier its view of every meter, in the order the meters are declared.
func (a *App) compileMeters() error {
	a.meters = make([]*meterRuntime, len(a.Meters))
	for i, m := range a.Meters {
		a.meters[i] = &meterRuntime{
			name: m.Name, kind: m.Source.Kind, max: m.Source.Max,
			header: http.CanonicalHeaderKey(m.Source.Header), stripeEvent: m.stripeEvent(),
		}
		if len(m.Paths) > 0 {
			a.meters[i].paths = caddyhttp.MatchPath(append([]string(nil), m.Paths...))
			if err := a.meters[i].paths.Provision(caddy.Context{}); err != nil {
				return fmt.Errorf("meter %s: paths: %w", m.Name, err)
			}
		}
	}
	return nil
}

// appliesTo reports whether the meter applies to r: it lists no paths,
// or r's path matches one of them.
func (m *meterRuntime) appliesTo(r *http.Request) bool {
	if len(m.paths) == 0 {
		return true
	}
	ok, err := m.paths.MatchWithError(r)
	return ok && err == nil
}

// meterPos is the position in ms (a reservation's meters) of the tier's
// meter i, named name; -1 when the reservation omits it (the request is
// outside the meter's paths). ms lists the tier's meters that apply, in
// the tier's order, so without paths the position is i.
func meterPos(ms []store.MeterReservation, i int, name string) int {
	if i < len(ms) && ms[i].Meter == name {
		return i
	}
	for j := range ms {
		if ms[j].Meter == name {
			return j
		}
	}
	return -1
}

// compileTierMeters gives t its view of every meter of meters: the
// tier's block for it, or only metering.
func (t *tierRuntime) compileTierMeters(meters []*meterRuntime) error {
	if len(meters) == 0 {
		return nil
	}
	t.meters = make([]tierMeter, len(meters))
	for i, m := range meters {
		tm := tierMeter{meterRuntime: m, quota: new(tierRuntime), units: getMetrics().meterUnits.WithLabelValues(t.Name, m.name)}
		if m.kind == sourceHeader {
			tm.ignored = getMetrics().ignoredUsage.WithLabelValues(t.Name, m.name)
		}
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

// reservation is the store's view of the tier's meter, reserving amount.
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

// capped applies the meter's max, if any, and the stores' bound (a
// client's Content-Length of 2^62 counts as store.MaxMeterAmount).
func (m *meterRuntime) capped(n int64) int64 {
	if m.max > 0 {
		n = min(n, m.max)
	}
	return min(n, store.MaxMeterAmount)
}

// hasQuota reports whether the tier gives the meter included units (else it only meters it).
func (tm *tierMeter) hasQuota() bool { return tm.quota.quotaMode != store.QuotaMeter }

// appliedThrottle is the throttle policy the store applied to res when
// out.Throttled, and the index in res.Meters of the meter it belongs to
// (-1: the default meter's). As store.Reservation.AdmitMeters decides it:
// the default meter's throttle if it is used up, replaced by a used-up
// meter's only when that one is slower.
func appliedThrottle(res store.Reservation, out store.Reserved) (limiter.Policy, int) {
	if len(res.Meters) == 0 {
		return res.Quota.Throttle, -1
	}
	p, idx, found := limiter.Policy{}, -1, false
	if res.Quota.Mode == store.QuotaThrottle {
		before := out.Used
		if out.Allowed && !out.Duplicate {
			before -= res.Cost
		}
		if before >= res.Quota.Included {
			p, found = res.Quota.Throttle, true
		}
	}
	for i, m := range res.Meters {
		if i < len(out.Meters) && out.Meters[i].Throttled && (!found || store.SlowerPolicy(m.Throttle, p)) {
			p, idx, found = m.Throttle, i, true
		}
	}
	if !found { // the store said throttled: trust it, with the default's
		return res.Quota.Throttle, -1
	}
	return p, idx
}

// throttleOf is the tier (or the tier's view of the meter res.Meters[idx],
// idx ≥ 0) whose throttle names and policy apply.
func (t *tierRuntime) throttleOf(res store.Reservation, idx int) *tierRuntime {
	if idx >= 0 && idx < len(res.Meters) {
		for i := range t.meters {
			if t.meters[i].name == res.Meters[idx].Meter {
				return t.meters[i].quota
			}
		}
	}
	return t
}

// meterTally counts a request's other meters while its response is
// written: the values its meter headers report and the response bytes.
type meterTally struct {
	tier *tierRuntime
	// reported[i] is the value meter i's header reported, when has[i].
	reported []int64
	has      []bool
	// pos[i] is the position of the tier's meter i in the reservation's
	// meters, -1 when the request is outside the meter's paths; nil when
	// every meter applies (the position of meter i is i).
	pos []int
	// respBytes are the response body's bytes written.
	respBytes int64
	// body counts the request body when a request_bytes meter has no
	// Content-Length to go by; nil otherwise.
	body *countingBody
	// ignored is the meter whose header value was ignored last, if any.
	ignored string
}

// newMeterTally prepares the counting of t's meters reserved in ms for r,
// wrapping r's body in a counter when a request_bytes meter needs one.
func newMeterTally(t *tierRuntime, r *http.Request, ms []store.MeterReservation) *meterTally {
	mt := &meterTally{tier: t, reported: make([]int64, len(t.meters)), has: make([]bool, len(t.meters))}
	if len(ms) != len(t.meters) {
		mt.pos = make([]int, len(t.meters))
		for i := range t.meters {
			mt.pos[i] = meterPos(ms, i, t.meters[i].name)
		}
	}
	if r.ContentLength < 0 && r.Body != nil && r.Body != http.NoBody {
		for i, tm := range t.meters {
			if tm.kind == sourceRequestBytes && mt.at(i) >= 0 {
				mt.body = &countingBody{ReadCloser: r.Body}
				r.Body = mt.body
				break
			}
		}
	}
	return mt
}

// at is the position of the tier's meter i in the reservation's meters,
// -1 when the request is outside the meter's paths.
func (mt *meterTally) at(i int) int {
	if mt.pos == nil {
		return i
	}
	return mt.pos[i]
}

// readHeaders reads the meter headers of a response and removes them, so
// the client never sees them. A value that is not a whole number ≥ 0 is
// ignored (the meter keeps its reserved amount); one above the meter's
// max counts as max.
func (mt *meterTally) readHeaders(h http.Header) {
	for i, tm := range mt.tier.meters {
		if tm.kind != sourceHeader {
			continue
		}
		vs, ok := h[tm.header]
		if !ok {
			continue
		}
		if len(vs) > 0 && mt.at(i) >= 0 {
			mt.reported[i], mt.has[i] = parseUsageCost(vs[0], tm.max)
			if !mt.has[i] {
				tm.ignored.Inc()
				mt.ignored = tm.name
			}
		}
		delete(h, tm.header)
	}
	unannounce(h, mt.isMeterHeader)
}

// readTrailers reads the meter values an upstream sent as trailers,
// after the body (a streamed response knows its tokens only then), and
// removes them, so the client never sees them; the handler calls it once
// the next handler returned, before net/http writes the trailers. A value
// sent in the header wins.
func (mt *meterTally) readTrailers(h http.Header) {
	for i, tm := range mt.tier.meters {
		if tm.kind != sourceHeader {
			continue
		}
		for _, k := range [2]string{tm.header, http.TrailerPrefix + tm.header} {
			vs, ok := h[k]
			if !ok {
				continue
			}
			if len(vs) > 0 && !mt.has[i] && mt.at(i) >= 0 {
				mt.reported[i], mt.has[i] = parseUsageCost(vs[0], tm.max)
				if !mt.has[i] {
					tm.ignored.Inc()
					mt.ignored = tm.name
				}
			}
			delete(h, k)
		}
	}
}

// isMeterHeader reports whether name (canonical) is a meter's header.
func (mt *meterTally) isMeterHeader(name string) bool {
	for _, tm := range mt.tier.meters {
		if tm.kind == sourceHeader && tm.header == name {
			return true
		}
	}
	return false
}

// settlements are the meters of res whose final amount differs from the
// reserved one: 0 for a response that is not billable, the default
// meter's actual amount for a cost source, the header's value, the bytes
// counted. It adds each meter's final amount to its units metric.
func (mt *meterTally) settlements(res store.Reservation, out store.Reserved, billable bool, actual int64) []store.MeterSettlement {
	var ms []store.MeterSettlement
	for i, tm := range mt.tier.meters {
		j := mt.at(i)
		if j < 0 || j >= len(res.Meters) {
			continue // outside the meter's paths: not reserved, not counted
		}
		mr := res.Meters[j]
		final := mr.Amount
		switch {
		case !billable:
			final = 0
		case tm.kind == sourceCost:
			final = actual
		case tm.kind == sourceHeader:
			if mt.has[i] {
				final = mt.reported[i]
			}
		case tm.kind == sourceResponseBytes:
			final = tm.capped(mt.respBytes)
		case tm.kind == sourceRequestBytes && mt.body != nil:
			final = tm.capped(mt.body.n.Load())
		}
		if final > 0 {
			tm.units.Add(float64(final))
		}
		if final == mr.Amount {
			continue
		}
		var overage int64
		if j < len(out.Meters) {
			overage = out.Meters[j].Overage
		}
		ms = append(ms, store.MeterSettlement{Meter: mr.Meter, Reserved: mr.Amount, Overage: overage, Actual: final, Quota: mr})
	}
	return ms
}

// usageIgnoredLogged is when an ignored meter value was last logged (Unix
// ns): at most one line per second per process; the metric counts them
// all.
var usageIgnoredLogged atomic.Int64

// logIgnored logs, at most once a second, that an upstream's value for
// meter was ignored.
func logIgnored(logger *zap.Logger, tier, meter string) {
	now, last := time.Now().UnixNano(), usageIgnoredLogged.Load()
	if now-last < int64(time.Second) || !usageIgnoredLogged.CompareAndSwap(last, now) {
		return
	}
	if c := logger.Check(zapcore.WarnLevel, "api_monetize ignored a meter value that is not a whole number ≥ 0 (logged at most once per second)"); c != nil {
		c.Write(zap.String("tier", tier), zap.String("meter", meter))
	}
}

// countingBody counts the bytes read from a request body.
type countingBody struct {
	io.ReadCloser
	n atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.n.Add(int64(n))
	return n, err
}
