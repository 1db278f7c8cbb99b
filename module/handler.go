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

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Handler enforces API keys, tier endpoint access and cost-weighted rate
// limits in front of the next handler (usually reverse_proxy). It needs the
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
type Handler struct {
	// Costs assign a cost in units to request paths; the first match wins.
	// A request matching none costs 1.
	Costs []Cost `json:"costs,omitempty"`
	// KeyFrom lists where to look for the API key, in order. Default: the
	// X-API-Key header, then "Authorization: Bearer".
	KeyFrom []KeySource `json:"key_from,omitempty"`

	app    *App
	costs  []compiledCost
	logger *zap.Logger
}

type compiledCost struct {
	match caddyhttp.MatchPath
	units int64
}

var defaultKeySources = []KeySource{{Header: "X-API-Key"}, {Bearer: true}}

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
	if len(h.KeyFrom) == 0 {
		h.KeyFrom = defaultKeySources
	}
	for _, s := range h.KeyFrom {
		n := 0
		for _, set := range []bool{s.Header != "", s.Query != "", s.Bearer} {
			if set {
				n++
			}
		}
		if n != 1 {
			return fmt.Errorf("key_from: each source sets exactly one of header, query or bearer")
		}
	}
	return nil
}

// ServeHTTP authenticates the caller, checks the tier's endpoints, applies
// the rate limit and, when admitted, calls next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	m := getMetrics()
	key := h.extractKey(r)
	if key == "" {
		m.requests.WithLabelValues("none", decisionUnauthorized).Inc()
		w.Header().Set("WWW-Authenticate", authenticateMissingHeader)
		writeProblem(w, r, problem{
			Type: problemMissingKey, Title: "API key required", Status: http.StatusUnauthorized,
			Detail: "Send your API key in the " + h.keyHint() + ".",
		}, 0)
		return nil
	}
	if apikey.Check(key) != nil {
		h.invalidKey(w, r)
		return nil
	}

	app := h.app
	app.waitReady(time.Second)
	ctx := r.Context()
	st, err := app.store()
	if err != nil {
		h.storeUnavailable(w, r, nil, "open", err)
		return nil
	}
	secret, err := app.secret(ctx)
	if err != nil {
		h.storeUnavailable(w, r, nil, "secret", err)
		return nil
	}
	now := time.Now()
	entry, err := app.shared.registry.lookup(ctx, st, apikey.Hash(secret, key), now)
	if err != nil {
		h.storeUnavailable(w, r, nil, "lookup", err)
		return nil
	}
	if !entry.found {
		h.invalidKey(w, r)
		return nil
	}
	customer := entry.customer
	tier := app.tierByName[customer.Tier]
	if tier == nil {
		if c := h.logger.Check(zapcore.WarnLevel, "customer is on a tier that is not configured"); c != nil {
			c.Write(zap.String("customer", customer.ID), zap.String("tier", customer.Tier))
		}
		m.requests.WithLabelValues("none", decisionForbidden).Inc()
		writeProblem(w, r, problem{
			Type: problemTierNotConfigured, Title: "Plan not available", Status: http.StatusForbidden,
			Detail: fmt.Sprintf("Your plan %q is not offered by this API any more; contact the API provider.", customer.Tier),
			Tier:   customer.Tier,
		}, 0)
		return nil
	}

	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl != nil {
		repl.Set("http.api_monetize.customer", customer.ID)
		repl.Set("http.api_monetize.tier", tier.Name)
		repl.Set("http.api_monetize.key_id", entry.key.ID)
	}

	ok, err := tier.allows(r)
	if err != nil {
		return caddyhttp.Error(http.StatusInternalServerError, err)
	}
	if !ok {
		h.forbidden(w, r, tier)
		return nil
	}
	if !tier.hasRate {
		tier.metrics.allowed.Inc()
		return next.ServeHTTP(w, r)
	}

	cost := h.cost(r)
	d, err := st.Admit(ctx, store.Admission{Subject: customer.ID, Rate: tier.policy, Cost: cost})
	if err != nil {
		m.storeErrors.WithLabelValues("admit").Inc()
		h.logStoreError("admit", err)
		switch tier.onStoreError {
		case storeErrorAllow:
			tier.metrics.degraded.Inc()
			return next.ServeHTTP(w, r)
		case storeErrorDeny:
			h.storeUnavailable(w, r, tier, "", nil)
			return nil
		}
		d = app.shared.local.Admit(customer.ID, tier.policy, cost, now.UnixMicro())
		if d.Allowed {
			tier.metrics.degraded.Inc()
		}
	} else if d.Allowed {
		tier.metrics.allowed.Inc()
	}
	setRateHeaders(w.Header(), tier, d, now)
	if !d.Allowed {
		h.rateLimited(w, r, tier, d, cost)
		return nil
	}
	tier.metrics.units.Add(float64(cost))
	return next.ServeHTTP(w, r)
}

// extractKey returns the API key from the first configured source that has
// one.
func (h *Handler) extractKey(r *http.Request) string {
	for _, s := range h.KeyFrom {
		var v string
		switch {
		case s.Header != "":
			v = r.Header.Get(s.Header)
		case s.Query != "":
			v = r.URL.Query().Get(s.Query)
		case s.Bearer:
			auth := r.Header.Get("Authorization")
			if len(auth) > 7 && strings.EqualFold(auth[:7], "bearer ") {
				v = auth[7:]
			}
		}
		if v = strings.TrimSpace(v); v != "" {
			return v
		}
	}
	return ""
}

// keyHint describes the configured key sources for error messages.
func (h *Handler) keyHint() string {
	parts := make([]string, 0, len(h.KeyFrom))
	for _, s := range h.KeyFrom {
		switch {
		case s.Header != "":
			parts = append(parts, s.Header+" header")
		case s.Query != "":
			parts = append(parts, "'"+s.Query+"' query parameter")
		case s.Bearer:
			parts = append(parts, "Authorization header as 'Bearer <key>'")
		}
	}
	return strings.Join(parts, " or the ")
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

func (h *Handler) invalidKey(w http.ResponseWriter, r *http.Request) {
	getMetrics().requests.WithLabelValues("none", decisionUnauthorized).Inc()
	w.Header().Set("WWW-Authenticate", authenticateInvalidHeader)
	writeProblem(w, r, problem{
		Type: problemInvalidKey, Title: "Invalid API key", Status: http.StatusUnauthorized,
		Detail: "The API key is malformed, unknown or revoked.",
	}, 0)
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

// rateLimited answers 429 with Retry-After, or 403 when the request's cost
// can never fit the tier's burst.
func (h *Handler) rateLimited(w http.ResponseWriter, r *http.Request, tier *tierRuntime, d limiter.Decision, cost int64) {
	tier.metrics.rateLimited.Inc()
	upgrade := h.fasterTiers(tier, cost)
	if d.CostExceedsBurst {
		writeProblem(w, r, problem{
			Type: problemCostExceedsBurst, Title: "Request too expensive for your plan", Status: http.StatusForbidden,
			Detail: fmt.Sprintf("This request costs %d units, more than the %s plan's burst of %d.", cost, tier.Name, tier.policy.BurstUnits()),
			Tier:   tier.Name, ViolatedPolicies: []string{tier.rateName}, Upgrade: upgrade,
		}, 0)
		return
	}
	writeProblem(w, r, problem{
		Type: problemQuotaExceeded, Title: "Rate limit exceeded", Status: http.StatusTooManyRequests,
		Detail: fmt.Sprintf("The %s plan allows %d units per %s; this request costs %d. Retry after %d seconds.",
			tier.Name, tier.policy.Limit, windowName(tier.policy.Period), cost, ceilSeconds(d.RetryAfter)),
		Tier: tier.Name, ViolatedPolicies: []string{tier.rateName}, Upgrade: upgrade,
	}, d.RetryAfter)
}

// fasterTiers lists the tiers with a higher rate than t (per second) whose
// burst fits cost, for the upgrade hint.
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
	if len(names) == 0 {
		return nil
	}
	return &upgradeHint{Tiers: names, URL: h.app.UpgradeURL}
}

// storeUnavailable answers 503 when the store is needed and unreachable.
func (h *Handler) storeUnavailable(w http.ResponseWriter, r *http.Request, tier *tierRuntime, op string, err error) {
	if op != "" {
		getMetrics().storeErrors.WithLabelValues(op).Inc()
		h.logStoreError(op, err)
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

// storeErrorLogged is when a store error was last logged (Unix ns): during
// an outage every request fails, so errors are logged at most once per
// second per process; the metric counts them all.
var storeErrorLogged atomic.Int64

func (h *Handler) logStoreError(op string, err error) {
	now, last := time.Now().UnixNano(), storeErrorLogged.Load()
	if now-last < int64(time.Second) || !storeErrorLogged.CompareAndSwap(last, now) {
		return
	}
	if c := h.logger.Check(zapcore.ErrorLevel, "api_monetize store call failed (logged at most once per second)"); c != nil {
		c.Write(zap.String("operation", op), zap.Bool("unavailable", errors.Is(err, store.ErrUnavailable)), zap.Error(err))
	}
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
