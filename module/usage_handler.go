package module

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

func init() {
	caddy.RegisterModule(new(UsageHandler))
}

// UsageHandler answers an API caller with their own usage for the current
// period (or ?period=YYYY-MM), authenticated with their API key like the
// api_monetize handler. Mount it on a path of your API, e.g.
// `handle /v1/usage { api_monetize_usage }`. It is not counted.
type UsageHandler struct {
	// KeyFrom lists where to look for the API key, in order. Default: the
	// X-API-Key header, then "Authorization: Bearer".
	KeyFrom []KeySource `json:"key_from,omitempty"`

	app    *App
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*UsageHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_monetize_usage",
		New: func() caddy.Module { return new(UsageHandler) },
	}
}

// Provision finds the api_monetize app.
func (u *UsageHandler) Provision(ctx caddy.Context) error {
	u.logger = ctx.Logger()
	app, err := ctx.AppIfConfigured("api_monetize")
	if err != nil {
		return fmt.Errorf("api_monetize_usage needs the api_monetize global option: %w", err)
	}
	u.app = app.(*App)
	u.app.identityWanted.Store(true)
	u.KeyFrom, err = checkKeySources(u.KeyFrom)
	return err
}

// ServeHTTP writes the caller's usage as JSON. A request that the
// api_monetize handler already authenticated (it runs first, as in
// `route /v1/usage { api_monetize; api_monetize_usage }`, and has taken
// the key out of the request) is answered for that caller; any other
// request is authenticated here with its key.
func (u *UsageHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	now := clockNow()
	ctx, cancel := u.app.storeContext(r, now)
	defer cancel()
	c, st, ok := u.identified(ctx, r, w, now)
	if !ok {
		return nil
	}
	view, status, msg := u.app.usageView(ctx, st, c.customer, r.URL.Query().Get("period"))
	if status != http.StatusOK {
		writeProblem(w, r, problem{Type: problemTypeBase + "usage", Title: http.StatusText(status), Status: status, Detail: msg}, 0)
		return nil
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, view)
	return nil
}

// identified is the request's caller: the one the api_monetize handler of
// the same app authenticated, or else the one its key names. When it
// returns false it has written the error response.
func (u *UsageHandler) identified(ctx context.Context, r *http.Request, w http.ResponseWriter, now time.Time) (caller, store.Store, bool) {
	if c := identity(r, u.app); c != nil {
		st, err := u.app.store()
		if err != nil {
			storeUnavailable(w, r, u.logger, nil, "open", err)
			return caller{}, nil, false
		}
		return *c, st, true
	}
	return u.app.authenticate(ctx, w, r, now, u.KeyFrom, u.logger)
}

// usageView is a customer's usage for one period, as the usage endpoints
// show it.
type usageView struct {
	Customer string `json:"customer"`
	Tier     string `json:"tier"`
	// Features are the features of the tier (see Tier.Features).
	Features []string `json:"features"`
	Period   struct {
		ID    string    `json:"id"`
		Start time.Time `json:"start"`
		End   time.Time `json:"end"`
	} `json:"period"`
	// Included is the tier's included units; absent for a tier without a
	// quota.
	Included  *int64 `json:"included_units,omitempty"`
	Remaining *int64 `json:"remaining_units,omitempty"`
	OverQuota string `json:"over_quota,omitempty"`
	// OverageCharge is the overage units at the tier's overage price, as an
	// exact decimal in Currency.
	OverageCharge string `json:"overage_charge,omitempty"`
	Currency      string `json:"currency,omitempty"`
	store.PeriodUsage
	// Meters are the other meters (see docs/meters.md): the tier's, in
	// configuration order, then any other the period has usage of. The
	// fields above are the default meter's.
	Meters []meterView `json:"meters,omitempty"`
}

// meterView is one meter's usage for a period, with the tier's quota of
// it, as usageView is the default meter's.
type meterView struct {
	Meter         string `json:"meter"`
	Included      *int64 `json:"included_units,omitempty"`
	Remaining     *int64 `json:"remaining_units,omitempty"`
	OverQuota     string `json:"over_quota,omitempty"`
	OverageCharge string `json:"overage_charge,omitempty"`
	Currency      string `json:"currency,omitempty"`
	store.MeterUsage
}

// meterViews lists the meters of u with t's quota of each.
func (a *App) meterViews(t *tierRuntime, u store.PeriodUsage) []meterView {
	var views []meterView
	for _, tm := range t.meters {
		v := meterView{Meter: tm.name, MeterUsage: u.Meter(tm.name)}
		if q := tm.quota; q.quotaMode != store.QuotaMeter {
			included, remaining := q.included, max(0, q.included-v.Billed)
			v.Included, v.Remaining, v.OverQuota = &included, &remaining, q.quotaMode
			if q.overagePriceMic > 0 {
				if charge, err := metering.OverageCharge(v.Overage, q.overagePriceMic); err == nil {
					v.OverageCharge, v.Currency = metering.FormatMicros(charge), a.currency()
				}
			}
		}
		views = append(views, v)
	}
	for _, m := range u.Meters {
		if !slices.ContainsFunc(t.meters, func(tm tierMeter) bool { return tm.name == m.Meter }) {
			views = append(views, meterView{Meter: m.Meter, MeterUsage: m})
		}
	}
	return views
}

// usageView builds a customer's usage for the period starting in month
// ("YYYY-MM"; empty: the current period). On failure it returns an HTTP
// status and a message.
func (a *App) usageView(ctx context.Context, st store.Store, c store.Customer, month string) (usageView, int, string) {
	var v usageView
	t := a.tierByName[c.Tier]
	if t == nil {
		return v, http.StatusConflict, fmt.Sprintf("customer %q is on tier %q, which is not configured", c.ID, c.Tier)
	}
	period := t.periodRule.Period(clockNow(), c.BillingAnchor())
	if month != "" {
		y, m, err := metering.ParseMonth(month)
		if err != nil {
			return v, http.StatusBadRequest, "period: expected YYYY-MM"
		}
		p, ok := t.periodRule.StartingIn(y, m, c.BillingAnchor())
		if !ok {
			return v, http.StatusNotFound, "no billing period of this customer starts in " + month
		}
		period = p
	}
	u, err := st.Usage(ctx, c.ID, period.ID())
	if err != nil {
		return v, http.StatusServiceUnavailable, "reading usage: " + err.Error()
	}
	v.Customer, v.Tier, v.Features, v.PeriodUsage = c.ID, t.Name, t.features, u
	v.Period.ID, v.Period.Start, v.Period.End = period.ID(), period.Start, period.End
	if t.quotaMode != store.QuotaMeter {
		included, remaining := t.included, max(0, t.included-u.Billed)
		v.Included, v.Remaining, v.OverQuota = &included, &remaining, t.quotaMode
		if t.overagePriceMic > 0 {
			if charge, err := metering.OverageCharge(u.Overage, t.overagePriceMic); err == nil {
				v.OverageCharge, v.Currency = metering.FormatMicros(charge), a.currency()
			}
		}
	}
	v.Meters = a.meterViews(t, u)
	return v, http.StatusOK, ""
}

// currency is the configured currency, default usd.
func (a *App) currency() string {
	if a.Currency == "" {
		return "usd"
	}
	return a.Currency
}

// Interface guards
var (
	_ caddy.Provisioner           = (*UsageHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*UsageHandler)(nil)
)
