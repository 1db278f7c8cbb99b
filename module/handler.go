package module

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Handler enforces API keys, tier endpoint access, cost-weighted rate
// limits and monthly quotas in front of the next handler (usually
// reverse_proxy), and meters every billable response. It needs the
// api_monetize app (global option).
//
// It sets these placeholders for the handlers after it (e.g. header_up or
// log fields):
//
// Placeholder | Description
// ------------|-------------
// `{http.api_monetize.customer}` | the caller's customer id
// `{http.api_monetize.tier}` | the caller's tier
// `{http.api_monetize.key_id}` | the public id of the key used (never the key)
// `{http.api_monetize.features}` | the features of the caller's tier, comma-separated (empty when none)
type Handler struct {
	// Costs assign a cost in units to request paths; the first match wins.
	// A request matching none costs 1.
	Costs []Cost `json:"costs,omitempty"`
	// KeyFrom lists where to look for the API key, in order. Default: the
	// X-API-Key header, then "Authorization: Bearer".
	KeyFrom []KeySource `json:"key_from,omitempty"`
	// ForwardKey passes the API key on to the next handlers, and so to the
	// upstream, as the client sent it. By default the key is taken out of
	// the request once it is checked (its header, or its query
	// parameter), so that it cannot reach the upstream or its logs; the
	// upstream learns the caller from the placeholders.
	ForwardKey bool `json:"forward_key,omitempty"`
	// RequireFeatures refuse a request with 403 when its path matches a
	// rule's pattern and the caller's tier does not include the rule's
	// feature; every matching rule applies.
	RequireFeatures []FeatureRequirement `json:"require_features,omitempty"`

	app          *App
	costs        []compiledCost
	requirements []compiledRequirement
	logger       *zap.Logger
}

type compiledCost struct {
	match caddyhttp.MatchPath
	units int64
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_monetize",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision finds the api_monetize app and compiles the cost table.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	app, err := ctx.AppIfConfigured("api_monetize")
	if err != nil {
		return fmt.Errorf("the api_monetize handler needs the api_monetize global option (tiers, customers, keys): %w", err)
	}
	h.app = app.(*App)
	for _, c := range h.Costs {
		if c.Units < 0 {
			return fmt.Errorf("cost %s: units must be zero or positive, got %d", c.Path, c.Units)
		}
		m := caddyhttp.MatchPath{c.Path}
		if err := m.Provision(ctx); err != nil {
			return err
		}
		h.costs = append(h.costs, compiledCost{match: m, units: c.Units})
	}
	if err := h.compileRequirements(ctx); err != nil {
		return err
	}
	h.KeyFrom, err = checkKeySources(h.KeyFrom)
	return err
}

// ServeHTTP authenticates the caller, checks the tier's endpoints, reserves
// the request's cost against the rate limit and the quota, calls next, and
// settles the cost once the response is known.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	app := h.app
	now := clockNow()
	ctx, cancel := app.storeContext(r, now)
	defer cancel()
	c, st, ok := app.authenticate(ctx, w, r, now, h.KeyFrom, h.logger)
	if !ok {
		return nil
	}
	if !h.ForwardKey {
		removeKeys(r, h.KeyFrom)
	}
	if app.identityWanted.Load() {
		setIdentity(r, app, c)
	}
	tier := c.tier
	if repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); repl != nil {
		repl.Map(c.placeholders)
		repl.Map(tier.placeholders)
	}
	allowed, err := tier.allows(r)
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	if !allowed {
		h.forbidden(w, r, tier)
		return nil
	}
	if len(h.requirements) > 0 {
		req, err := h.missingFeature(r, tier)
		if err != nil {
			return caddyhttp.Error(http.StatusInternalServerError, err)
		}
		if req != nil {
			h.featureForbidden(w, r, tier, req)
			return nil
		}
	}

	cost := h.cost(r)
	res, period := app.reservation(c, cost, r, now)
	out, degraded, err := app.reserve(ctx, st, res, tier)
	cancel()
	if err != nil {
		storeUnavailable(w, r, h.logger, tier, "", err)
		return nil
	}
	if !(degraded && tier.onStoreError == storeErrorAllow) {
		throttle := tier
		if out.Throttled && len(res.Meters) > 0 {
			_, idx := appliedThrottle(res, out)
			throttle = tier.throttleOf(res, idx)
		}
		setMeterHeaders(w.Header(), app.headers, tier, throttle, res.Meters, out, period, now)
	}
	if !out.Allowed {
		h.denied(w, r, tier, res, out, cost, period, now)
		return nil
	}
	switch {
	case degraded:
		tier.metrics.degraded.Inc()
	default:
		tier.metrics.allowed.Inc()
	}
	if cost == 0 && len(tier.meters) == 0 {
		return next.ServeHTTP(w, r)
	}
	// A duplicate (an Idempotency-Key repeat) is counted nothing, but goes
	// through the metered writer too, so the upstream's usage headers are
	// removed from its response as from any other.
	mw := &meteredWriter{
		ResponseWriterWrapper: caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		costHeader:            app.costHeader,
		maxCost:               app.maxUsageCost,
	}
	if len(tier.meters) > 0 { // also outside every meter's paths: their headers are removed
		mw.tally = newMeterTally(tier, r, res.Meters)
	}
	err = next.ServeHTTP(mw, r)
	mw.readCostTrailer()
	if mw.tally != nil {
		mw.tally.readTrailers(mw.Header())
		if mw.tally.ignored != "" {
			logIgnored(h.logger, tier.Name, mw.tally.ignored)
		}
	}
	if out.Duplicate {
		return err
	}
	tier.metrics.units.Add(float64(cost))
	app.settle(st, res, out, degraded, mw, err)
	return err
}

// cost is the request's cost: the first matching cost rule, or 1.
func (h *Handler) cost(r *http.Request) int64 {
	for _, c := range h.costs {
		if ok, _ := c.match.MatchWithError(r); ok {
			return c.units
		}
	}
	return 1
}

// forbidden answers 403 for a path outside the caller's tier, naming the
// tiers that include it.
func (h *Handler) forbidden(w http.ResponseWriter, r *http.Request, tier *tierRuntime) {
	tier.metrics.forbidden.Inc()
	var including []string
	for _, t := range h.app.tiers {
		if ok, _ := t.allows(r); ok {
			including = append(including, t.Name)
		}
	}
	p := problem{
		Type: problemEndpointNotInTier, Title: "Endpoint not included in your plan", Status: http.StatusForbidden,
		Tier: tier.Name,
	}
	if len(including) == 0 {
		p.Detail = fmt.Sprintf("%s is not available on any plan.", r.URL.Path)
	} else {
		p.Detail = fmt.Sprintf("%s is not included in the %s plan; it is included in: %s.", r.URL.Path, tier.Name, strings.Join(including, ", "))
		p.Upgrade = &upgradeHint{Tiers: including, URL: h.app.UpgradeURL}
	}
	writeProblem(w, r, p, 0)
}

// denied answers a reservation that was not admitted: 429 for a used-up
// quota (until the period ends) or a rate limit, 403 when the cost can
// never fit the burst.
func (h *Handler) denied(w http.ResponseWriter, r *http.Request, tier *tierRuntime, res store.Reservation, out store.Reserved, cost int64, period metering.Period, now time.Time) {
	tier.metrics.rateLimited.Inc()
	if out.QuotaExceeded && out.QuotaExceededMeter != "" {
		h.meterExhausted(w, r, tier, res, out, period, now)
		return
	}
	if out.QuotaExceeded {
		left := time.Duration(period.SecondsLeft(now)) * time.Second
		writeProblem(w, r, problem{
			Type: problemQuotaExceeded, Title: "Monthly quota exceeded", Status: http.StatusTooManyRequests,
			Detail: fmt.Sprintf("The %s plan includes %d units per period and %d are used; this request costs %d. The quota renews at %s.",
				tier.Name, tier.included, out.Used, cost, period.End.UTC().Format(time.RFC3339)),
			Tier: tier.Name, ViolatedPolicies: []string{tier.quotaName}, Upgrade: h.largerTiers(tier),
		}, left)
		return
	}
	name, policy := tier.rateName, tier.policy
	if out.Throttled {
		_, idx := appliedThrottle(res, out)
		th := tier.throttleOf(res, idx)
		name, policy = th.throttleName, th.throttle
	}
	upgrade := h.fasterTiers(tier, cost)
	if out.Rate.CostExceedsBurst {
		writeProblem(w, r, problem{
			Type: problemCostExceedsBurst, Title: "Request too expensive for your plan", Status: http.StatusForbidden,
			Detail: fmt.Sprintf("This request costs %d units, more than the %s plan's burst of %d.", cost, tier.Name, policy.BurstUnits()),
			Tier:   tier.Name, ViolatedPolicies: []string{name}, Upgrade: upgrade,
		}, 0)
		return
	}
	detail := fmt.Sprintf("The %s plan allows %d units per %s; this request costs %d. Retry after %d seconds.",
		tier.Name, policy.Limit, windowName(policy.Period), cost, ceilSeconds(out.Rate.RetryAfter))
	if out.Throttled {
		detail = fmt.Sprintf("The monthly quota of the %s plan is used up, so calls are throttled to %d units per %s; this request costs %d. Retry after %d seconds.",
			tier.Name, policy.Limit, windowName(policy.Period), cost, ceilSeconds(out.Rate.RetryAfter))
	}
	writeProblem(w, r, problem{
		Type: problemQuotaExceeded, Title: "Rate limit exceeded", Status: http.StatusTooManyRequests,
		Detail: detail, Tier: tier.Name, ViolatedPolicies: []string{name}, Upgrade: upgrade,
	}, out.Rate.RetryAfter)
}

// meterExhausted answers 429 for a meter whose block quota is used up,
// naming the meter's policy ("<tier>-<meter>-month") and the tiers with
// more of that meter.
func (h *Handler) meterExhausted(w http.ResponseWriter, r *http.Request, tier *tierRuntime, res store.Reservation, out store.Reserved, period metering.Period, now time.Time) {
	idx := -1
	for i, tm := range tier.meters {
		if tm.name == out.QuotaExceededMeter {
			idx = i
		}
	}
	if idx < 0 { // a meter this configuration no longer has
		writeProblem(w, r, problem{
			Type: problemQuotaExceeded, Title: "Monthly quota exceeded", Status: http.StatusTooManyRequests,
			Detail: fmt.Sprintf("The %s meter's monthly quota is used up.", out.QuotaExceededMeter), Tier: tier.Name,
		}, time.Duration(period.SecondsLeft(now))*time.Second)
		return
	}
	tm := tier.meters[idx]
	var used int64
	if j := meterPos(res.Meters, idx, tm.name); j >= 0 && j < len(out.Meters) {
		used = out.Meters[j].Used
	}
	var larger []string
	for _, o := range h.app.tiers {
		if o == tier || idx >= len(o.meters) {
			continue
		}
		if q := o.meters[idx].quota; q.included > tm.quota.included || q.quotaMode != store.QuotaBlock {
			larger = append(larger, o.Name)
		}
	}
	writeProblem(w, r, problem{
		Type: problemQuotaExceeded, Title: "Monthly quota exceeded", Status: http.StatusTooManyRequests,
		Detail: fmt.Sprintf("The %s plan includes %d %s per period and %d are used. The quota renews at %s.",
			tier.Name, tm.quota.included, tm.name, used, period.End.UTC().Format(time.RFC3339)),
		Tier: tier.Name, ViolatedPolicies: []string{tm.quota.quotaName}, Upgrade: hint(larger, h.app.UpgradeURL),
	}, time.Duration(period.SecondsLeft(now))*time.Second)
}

// fasterTiers lists the tiers with a higher rate than t whose burst fits
// cost, for the upgrade hint.
func (h *Handler) fasterTiers(t *tierRuntime, cost int64) *upgradeHint {
	var names []string
	for _, o := range h.app.tiers {
		if o == t {
			continue
		}
		if !o.hasRate || (o.policy.Interval() < t.policy.Interval() && o.policy.BurstUnits() >= cost) {
			names = append(names, o.Name)
		}
	}
	return hint(names, h.app.UpgradeURL)
}

// largerTiers lists the tiers that include more units than t, or are not
// blocked beyond their quota.
func (h *Handler) largerTiers(t *tierRuntime) *upgradeHint {
	var names []string
	for _, o := range h.app.tiers {
		if o != t && (o.included > t.included || o.quotaMode != store.QuotaBlock) {
			names = append(names, o.Name)
		}
	}
	return hint(names, h.app.UpgradeURL)
}

func hint(tiers []string, url string) *upgradeHint {
	if len(tiers) == 0 {
		return nil
	}
	return &upgradeHint{Tiers: tiers, URL: url}
}

// errStoreDenied is returned when a tier denies requests while the store
// is unreachable (on_store_error deny).
var errStoreDenied = errors.New("store unavailable and on_store_error is deny")

// storeUnavailable answers 503 when the store is needed and unreachable,
// or (err wrapping store.ErrBusy) when this process is too saturated to
// ask it in time (see shed).
func storeUnavailable(w http.ResponseWriter, r *http.Request, logger *zap.Logger, tier *tierRuntime, op string, err error) {
	if errors.Is(err, store.ErrBusy) {
		shed(w, r, tier)
		return
	}
	if op != "" {
		getMetrics().storeErrors.WithLabelValues(op).Inc()
		logStoreError(logger, op, err)
	}
	if tier != nil {
		tier.metrics.unavailable.Inc()
	} else {
		getMetrics().requests.WithLabelValues("none", decisionUnavailable).Inc()
	}
	writeProblem(w, r, problem{
		Type: problemReducedCapacity, Title: "Temporarily unavailable", Status: http.StatusServiceUnavailable,
		Detail: "The API's usage store is unreachable; retry shortly.",
	}, time.Second)
}

// shed answers 503 with Retry-After for a request whose store call could
// not even be sent by the request's deadline: this process's own queue of
// calls or its connection pool was saturated by a burst. The store was not
// asked, so nothing is decided without it (no on_store_error), and the
// circuit breaker does not count it as a store failure.
func shed(w http.ResponseWriter, r *http.Request, tier *tierRuntime) {
	if tier != nil {
		tier.metrics.overloaded.Inc()
	} else {
		getMetrics().requests.WithLabelValues("none", decisionOverloaded).Inc()
	}
	writeProblem(w, r, problem{
		Type: problemReducedCapacity, Title: "Temporarily overloaded", Status: http.StatusServiceUnavailable,
		Detail: "The API gateway is saturated; retry shortly.",
	}, time.Second)
}

// storeErrorLogged is when a store error was last logged (Unix ns): during
// an outage every request fails, so errors are logged at most once per
// second per process; the metric counts them all.
var storeErrorLogged atomic.Int64

func logStoreError(logger *zap.Logger, op string, err error) {
	now, last := time.Now().UnixNano(), storeErrorLogged.Load()
	if now-last < int64(time.Second) || !storeErrorLogged.CompareAndSwap(last, now) {
		return
	}
	if c := logger.Check(zapcore.ErrorLevel, "api_monetize store call failed (logged at most once per second)"); c != nil {
		c.Write(zap.String("operation", op), zap.Bool("unavailable", errors.Is(err, store.ErrUnavailable)), zap.Error(err))
	}
}

// logStoreError logs a failed store call with the app's logger.
func (a *App) logStoreError(op string, err error) { logStoreError(a.logger, op, err) }

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
