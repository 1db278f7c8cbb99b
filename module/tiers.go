package module

import (
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/limiter"
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
	// rateName is the RateLimit policy name, e.g. "pro-min".
	rateName string
	// policyHeader is the RateLimit-Policy item for the rate, precomputed.
	policyHeader string
	onStoreError string
	metrics      tierMetrics
}

func (a *App) compileTiers() error {
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
			rt.policyHeader = fmt.Sprintf("%q;q=%d;w=%d", rt.rateName, p.Limit, windowSeconds(p.Period))
			if p.Burst > 0 && p.Burst != p.Limit {
				rt.policyHeader += ";am-burst=" + strconv.FormatInt(p.Burst, 10)
			}
		}
		rt.endpoints = caddyhttp.MatchPath(append([]string(nil), t.Endpoints...))
		rt.exclude = caddyhttp.MatchPath(append([]string(nil), t.Exclude...))
		if err := rt.endpoints.Provision(caddy.Context{}); err != nil {
			return err
		}
		if err := rt.exclude.Provision(caddy.Context{}); err != nil {
			return err
		}
		rt.metrics = newTierMetrics(t.Name)
		a.tierByName[t.Name] = rt
		a.tiers = append(a.tiers, rt)
	}
	return nil
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
