package module

import (
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Feature flags: a tier lists the features it includes (Tier.Features).
// The api_monetize handler passes them on as {http.api_monetize.features},
// refuses the paths of its require_feature rules to tiers without the
// feature, and the api_monetize_feature matcher lets a Caddyfile route by
// them. All three use the tier of the caller the handler authenticated,
// never anything the client sends.

func init() {
	caddy.RegisterModule(new(MatchFeature))
}

// problemFeatureNotInTier is the problem type of a request refused by a
// require_feature rule.
const problemFeatureNotInTier = problemTypeBase + "feature-not-in-tier"

// checkFeature checks feature, to be added to tier's features have: a valid
// name not listed yet. The Caddyfile layer and Tier.validate share it.
func checkFeature(tier string, have []string, feature string) error {
	if err := checkName(feature); err != nil {
		return optionErr("features", fmt.Errorf("tier %s: feature '%s': %v", tier, feature, err))
	}
	if slices.Contains(have, feature) {
		return optionErr("features", fmt.Errorf("tier %s: feature '%s' is listed twice", tier, feature))
	}
	return nil
}

// checkFeatures checks a tier's whole feature list.
func (t *Tier) checkFeatures() error {
	for i, f := range t.Features {
		if err := checkFeature(t.Name, t.Features[:i], f); err != nil {
			return err
		}
	}
	return nil
}

// compileFeatures prepares the tier's features for the request path: the
// list (never nil, for JSON views) and the provider of the features
// placeholder, whose value is joined and boxed once here.
func (t *tierRuntime) compileFeatures() {
	t.features = append([]string{}, t.Features...)
	var joined any = strings.Join(t.features, ",")
	t.placeholders = func(key string) (any, bool) {
		if key == "http.api_monetize.features" {
			return joined, true
		}
		return nil, false
	}
}

// hasFeature reports whether the tier includes feature.
func (t *tierRuntime) hasFeature(feature string) bool {
	return slices.Contains(t.features, feature)
}

// tiersWith lists the names of the tiers that include feature, in
// configuration order.
func (a *App) tiersWith(feature string) []string {
	var names []string
	for _, t := range a.tiers {
		if t.hasFeature(feature) {
			names = append(names, t.Name)
		}
	}
	return names
}

// checkOffered fails unless some tier includes feature: a rule or matcher
// naming a feature no tier has is most likely a typo, which would refuse
// (or never match) every caller.
func (a *App) checkOffered(feature string) error {
	if err := checkName(feature); err != nil {
		return fmt.Errorf("feature '%s': %v", feature, err)
	}
	if len(a.tiersWith(feature)) > 0 {
		return nil
	}
	var offered []string
	for _, t := range a.tiers {
		for _, f := range t.features {
			if !slices.Contains(offered, f) {
				offered = append(offered, f)
			}
		}
	}
	list := "none"
	if len(offered) > 0 {
		list = strings.Join(offered, ", ")
	}
	return fmt.Errorf("no tier includes feature '%s'; add it to a tier with 'features %s' (features the tiers include: %s)", feature, feature, list)
}

// FeatureRequirement is a require_feature rule of the api_monetize
// handler: a request whose path matches Path is refused with 403 unless
// the caller's tier includes Feature.
type FeatureRequirement struct {
	// Path is a path pattern (Caddy path-matcher syntax).
	Path string `json:"path"`
	// Feature is the feature a tier must include; some tier must include it.
	Feature string `json:"feature"`
}

// compiledRequirement is a FeatureRequirement ready for the request path.
type compiledRequirement struct {
	match   caddyhttp.MatchPath
	feature string
	// tiers are the tiers that include feature, for the upgrade hint.
	tiers []string
}

// compileRequirements checks and compiles the handler's require_feature
// rules against the app's tiers.
func (h *Handler) compileRequirements(ctx caddy.Context) error {
	for _, req := range h.RequireFeatures {
		if err := checkPathPattern(req.Path); err != nil {
			return fmt.Errorf("require_feature: %v", err)
		}
		if err := h.app.checkOffered(req.Feature); err != nil {
			return fmt.Errorf("require_feature %s %s: %v", req.Path, req.Feature, err)
		}
		m := caddyhttp.MatchPath{req.Path}
		if err := m.Provision(ctx); err != nil {
			return err
		}
		h.requirements = append(h.requirements, compiledRequirement{match: m, feature: req.Feature, tiers: h.app.tiersWith(req.Feature)})
	}
	return nil
}

// missingFeature returns the first require_feature rule matching r whose
// feature tier does not include, or nil.
func (h *Handler) missingFeature(r *http.Request, tier *tierRuntime) (*compiledRequirement, error) {
	for i := range h.requirements {
		req := &h.requirements[i]
		ok, err := req.match.MatchWithError(r)
		if err != nil {
			return nil, err
		}
		if ok && !tier.hasFeature(req.feature) {
			return req, nil
		}
	}
	return nil, nil
}

// featureForbidden answers 403 for a request that needs a feature the
// caller's tier does not include, naming the tiers that include it.
func (h *Handler) featureForbidden(w http.ResponseWriter, r *http.Request, tier *tierRuntime, req *compiledRequirement) {
	tier.metrics.forbidden.Inc()
	writeProblem(w, r, problem{
		Type: problemFeatureNotInTier, Title: "Feature not included in your plan", Status: http.StatusForbidden,
		Detail: fmt.Sprintf("%s needs the feature %s, which the %s plan does not include; it is included in: %s.",
			r.URL.Path, req.feature, tier.Name, strings.Join(req.tiers, ", ")),
		Tier: tier.Name, Feature: req.feature, Upgrade: hint(req.tiers, h.app.UpgradeURL),
	}, 0)
}

// MatchFeature matches requests whose caller, as the api_monetize handler
// authenticated them, is on a tier that includes any of Features.
//
// The handler must have run for the request before the matcher is
// evaluated: put the matcher on a route after api_monetize (a handle
// block, or inside a route block after the api_monetize directive). A
// request the handler did not authenticate (it has not run yet, or runs
// in another app) never matches: the matcher reads only the identity the
// handler left in the request, never a header or parameter the client
// sent.
//
// Caddyfile: `api_monetize_feature <name>...`; several names (or lines in
// one matcher set) match when the tier includes any of them.
type MatchFeature struct {
	// Features are feature names; some tier must include each of them.
	Features []string `json:"features,omitempty"`

	app *App
}

// CaddyModule returns the Caddy module information.
func (*MatchFeature) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.matchers.api_monetize_feature",
		New: func() caddy.Module { return new(MatchFeature) },
	}
}

// Provision finds the api_monetize app, checks that some tier includes
// each feature, and asks the api_monetize handler to leave the caller it
// authenticates in the request.
func (m *MatchFeature) Provision(ctx caddy.Context) error {
	app, err := ctx.AppIfConfigured("api_monetize")
	if err != nil {
		return fmt.Errorf("the api_monetize_feature matcher needs the api_monetize global option (tiers, customers, keys): %w", err)
	}
	m.app = app.(*App)
	if len(m.Features) == 0 {
		return fmt.Errorf("api_monetize_feature: expected at least one feature name")
	}
	for _, f := range m.Features {
		if err := m.app.checkOffered(f); err != nil {
			return fmt.Errorf("api_monetize_feature: %v", err)
		}
	}
	m.app.identityWanted.Store(true)
	return nil
}

// Match reports whether r's authenticated caller's tier includes any of
// the features.
func (m *MatchFeature) Match(r *http.Request) bool {
	ok, _ := m.MatchWithError(r)
	return ok
}

// MatchWithError reports whether r's authenticated caller's tier includes
// any of the features; false for a request the api_monetize handler has
// not authenticated.
func (m *MatchFeature) MatchWithError(r *http.Request) (bool, error) {
	c := identity(r, m.app)
	if c == nil {
		return false, nil
	}
	for _, f := range m.Features {
		if c.tier.hasFeature(f) {
			return true, nil
		}
	}
	return false, nil
}

// UnmarshalCaddyfile sets up the matcher:
//
//	api_monetize_feature <name>...
func (m *MatchFeature) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for d.Next() {
		name := d.Token()
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.Err("api_monetize_feature: expected at least one feature name, as in 'api_monetize_feature bulk_export'")
		}
		for _, f := range args {
			if err := checkName(f); err != nil {
				return d.Errf("api_monetize_feature: feature '%s': %v", f, err)
			}
		}
		if d.NextBlock(0) {
			return errAt(name, "api_monetize_feature: unexpected block; the feature names go on the matcher's line")
		}
		m.Features = append(m.Features, args...)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner                 = (*MatchFeature)(nil)
	_ caddyhttp.RequestMatcherWithError = (*MatchFeature)(nil)
	_ caddyhttp.RequestMatcher          = (*MatchFeature)(nil)
	_ caddyfile.Unmarshaler             = (*MatchFeature)(nil)
)

// parseRequireFeature parses the arguments of the handler's
// `require_feature <path pattern> <feature>`; whether a tier includes the
// feature is checked by Provision, which knows the tiers.
func parseRequireFeature(d *caddyfile.Dispenser) (FeatureRequirement, error) {
	args, err := lineArgs(d)
	if err != nil {
		return FeatureRequirement{}, err
	}
	if len(args) != 2 {
		return FeatureRequirement{}, d.Errf("require_feature: expected 'require_feature <path pattern> <feature>', as in 'require_feature /v1/export/* bulk_export'")
	}
	if err := checkPathPattern(args[0]); err != nil {
		return FeatureRequirement{}, d.Errf("require_feature: %v", err)
	}
	if err := checkName(args[1]); err != nil {
		return FeatureRequirement{}, d.Errf("require_feature %s: feature '%s': %v", args[0], args[1], err)
	}
	return FeatureRequirement{Path: args[0], Feature: args[1]}, nil
}
