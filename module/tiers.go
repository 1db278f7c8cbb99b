package module

import (
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// What a tier does when the store cannot be reached.
const (
	storeErrorLocal = "local"
	storeErrorAllow = "allow"
	storeErrorDeny  = "deny"
)

// tierRuntime is a tier compiled for the request path.
type tierRuntime struct {
	Tier
	hasRate   bool
	policy    limiter.Policy
	endpoints caddyhttp.MatchPath
	exclude   caddyhttp.MatchPath
	// rateName is the RateLimit policy name, e.g. "pro-min"; the *Quoted
	// names are the header forms (RFC 9651 Strings).
	rateName       string
	rateQuoted     string
	quotaQuoted    string
	throttleQuoted string
	// policyHeader is the RateLimit-Policy item for the rate, precomputed.
	policyHeader string
	onStoreError string
	metrics      tierMetrics
	// features are the tier's features (never nil); placeholders provides
	// {http.api_monetize.features} (see compileFeatures).
	features     []string
	placeholders caddy.ReplacerFunc

	// periodRule computes the tier's billing periods; calendar caches the
	// current calendar period.
	periodRule metering.PeriodRule
	calendar   atomic.Pointer[periodCache]
	// quotaMode is a store.Quota mode: store.QuotaMeter when the tier has
	// no included units.
	quotaMode string
	included  int64
	// throttle replaces the rate once the quota is used up (throttle mode).
	throttle        limiter.Policy
	throttleName    string
	throttleHeader  string
	thresholds      []int
	quotaName       string
	overagePriceMic int64
	// meters is the tier's view of every declared meter, in declaration
	// order; nil without meters.
	meters []tierMeter
}

func (a *App) compileTiers() error {
	a.compileMeters()
	a.tierByName = make(map[string]*tierRuntime, len(a.Tiers))
	a.tiers = make([]*tierRuntime, 0, len(a.Tiers))
	if len(a.Tiers) == 0 {
		return fmt.Errorf("no tier defined: add at least one `tier <name> { … }` to the api_monetize global option")
	}
	for _, t := range a.Tiers {
		if t.Name == "" {
			return fmt.Errorf("a tier has no name")
		}
		if _, dup := a.tierByName[t.Name]; dup {
			return fmt.Errorf("tier %q is defined twice", t.Name)
		}
		if err := t.validate(); err != nil {
			return err
		}
		rt := &tierRuntime{Tier: t, onStoreError: t.OnStoreError}
		switch rt.onStoreError {
		case "":
			rt.onStoreError = storeErrorLocal
		case storeErrorLocal, storeErrorAllow, storeErrorDeny:
		default:
			return fmt.Errorf("tier %q: on_store_error must be local, allow or deny, got %q", t.Name, t.OnStoreError)
		}
		if t.Rate != nil {
			p := limiter.Policy{Limit: t.Rate.Limit, Period: time.Duration(t.Rate.Window), Burst: t.Rate.Burst}
			if !p.Valid() || p.Burst < 0 {
				return fmt.Errorf("tier %q: rate must be a positive number of units per positive window with a non-negative burst", t.Name)
			}
			rt.hasRate, rt.policy = true, p
			rt.rateName = t.Name + "-" + windowName(p.Period)
			rt.rateQuoted = strconv.Quote(rt.rateName)
			rt.policyHeader = policyItem(rt.rateName, p)
		}
		rt.endpoints = caddyhttp.MatchPath(append([]string(nil), t.Endpoints...))
		rt.exclude = caddyhttp.MatchPath(append([]string(nil), t.Exclude...))
		if err := rt.endpoints.Provision(caddy.Context{}); err != nil {
			return err
		}
		if err := rt.exclude.Provision(caddy.Context{}); err != nil {
			return err
		}
		for _, gap := range excludeGaps(t.Exclude) {
			if a.logger != nil { // nil outside Provision (the stripe command)
				a.logger.Warn(excludeGapAdvice(t.Name, gap))
			}
		}
		if err := rt.compileQuota(a.Thresholds); err != nil {
			return fmt.Errorf("tier %q: %w", t.Name, err)
		}
		if err := rt.compileTierMeters(a.meters); err != nil {
			return fmt.Errorf("tier %q: %w", t.Name, err)
		}
		rt.compileFeatures()
		rt.metrics = newTierMetrics(t.Name)
		a.tierByName[t.Name] = rt
		a.tiers = append(a.tiers, rt)
	}
	return nil
}

// compileQuota prepares the tier's period, included units, over-quota
// behaviour and thresholds (defaultThresholds unless the tier overrides
// them).
func (t *tierRuntime) compileQuota(defaultThresholds []int) error {
	if p := t.Period; p != nil {
		t.periodRule.Anniversary = p.Anniversary
		if p.Zone != "" {
			loc, err := time.LoadLocation(p.Zone)
			if err != nil {
				return fmt.Errorf("period zone: %v", err)
			}
			t.periodRule.Location = loc
		}
	}
	t.thresholds = defaultThresholds
	if t.Tier.Thresholds != nil {
		t.thresholds = t.Tier.Thresholds
	}
	if t.thresholds == nil {
		t.thresholds = metering.DefaultThresholds()
	}
	if t.Included == nil { // Tier.validate refused over_quota without it
		t.quotaMode = store.QuotaMeter
		return nil
	}
	if t.Included.Units < 0 {
		return fmt.Errorf("included must not be negative")
	}
	t.included = t.Included.Units
	t.quotaName = t.Name + "-month"
	t.quotaQuoted = strconv.Quote(t.quotaName)
	t.quotaMode = store.QuotaBlock
	if oq := t.OverQuota; oq != nil {
		switch oq.Mode {
		case store.QuotaBlock, store.QuotaBill:
		case store.QuotaThrottle:
			if oq.Throttle == nil {
				return fmt.Errorf("over_quota throttle needs a rate")
			}
			p := limiter.Policy{Limit: oq.Throttle.Limit, Period: time.Duration(oq.Throttle.Window), Burst: oq.Throttle.Burst}
			if !p.Valid() {
				return fmt.Errorf("over_quota throttle rate is not valid")
			}
			t.throttle = p
			t.throttleName = t.Name + "-throttle-" + windowName(p.Period)
			t.throttleQuoted = strconv.Quote(t.throttleName)
			t.throttleHeader = policyItem(t.throttleName, p)
		default:
			return fmt.Errorf("over_quota mode must be block, bill or throttle, got %q", oq.Mode)
		}
		if oq.PriceMicros < 0 {
			return fmt.Errorf("over_quota price must not be negative")
		}
		t.quotaMode, t.overagePriceMic = oq.Mode, oq.PriceMicros
	}
	return nil
}

// policyItem is a RateLimit-Policy item for a rate policy.
func policyItem(name string, p limiter.Policy) string {
	item := fmt.Sprintf("%q;q=%d;w=%d", name, p.Limit, windowSeconds(p.Period))
	if p.Burst > 0 && p.Burst != p.Limit {
		item += ";am-burst=" + strconv.FormatInt(p.Burst, 10)
	}
	return item
}

// allows reports whether the tier may call the request's path: it matches
// an endpoint pattern (or the tier lists none) and no exclude pattern.
func (t *tierRuntime) allows(r *http.Request) (bool, error) {
	if len(t.endpoints) > 0 {
		ok, err := t.endpoints.MatchWithError(r)
		if err != nil || !ok {
			return false, err
		}
	}
	if len(t.exclude) > 0 {
		excluded, err := t.exclude.MatchWithError(r)
		if err != nil {
			return false, err
		}
		return !excluded, nil
	}
	return true, nil
}

// windowName names a window for policy names: sec, min, hour, day, or a
// number of seconds.
func windowName(d time.Duration) string {
	switch d {
	case time.Second:
		return "sec"
	case time.Minute:
		return "min"
	case time.Hour:
		return "hour"
	case 24 * time.Hour:
		return "day"
	}
	return strconv.FormatInt(windowSeconds(d), 10) + "s"
}

// windowSeconds is the window in whole seconds, at least 1.
func windowSeconds(d time.Duration) int64 {
	return max(1, int64((d+time.Second-1)/time.Second))
}
