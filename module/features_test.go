package module

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func TestParseFeatures(t *testing.T) {
	v, err := parseApp(caddyfile.NewTestDispenser(`api_monetize {
	tier free
	tier pro {
		features bulk_export
		features priority-routing beta.v2
	}
}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var app App
	if err := json.Unmarshal(v.(httpcaddyfile.App).Value, &app); err != nil {
		t.Fatal(err)
	}
	if app.Tiers[0].Features != nil {
		t.Errorf("free: features %q, want none", app.Tiers[0].Features)
	}
	if want := []string{"bulk_export", "priority-routing", "beta.v2"}; !slices.Equal(app.Tiers[1].Features, want) {
		t.Errorf("pro: features %q, want %q", app.Tiers[1].Features, want)
	}

	var h Handler
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("api_monetize {\n\trequire_feature /v1/export/* bulk_export\n\trequire_feature /v1/beta/* beta.v2\n}")); err != nil {
		t.Fatal(err)
	}
	if want := []FeatureRequirement{{"/v1/export/*", "bulk_export"}, {"/v1/beta/*", "beta.v2"}}; !slices.Equal(h.RequireFeatures, want) {
		t.Errorf("require_feature: %+v, want %+v", h.RequireFeatures, want)
	}

	var m MatchFeature
	if err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser("api_monetize_feature bulk_export beta.v2\napi_monetize_feature priority-routing")); err != nil {
		t.Fatal(err)
	}
	if want := []string{"bulk_export", "beta.v2", "priority-routing"}; !slices.Equal(m.Features, want) {
		t.Errorf("matcher: %q, want %q", m.Features, want)
	}
}

// TestFeaturesCaddyfileErrors checks that a malformed features,
// require_feature or api_monetize_feature line fails at adapt time on its
// line, saying what was expected.
func TestFeaturesCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		parse       func(d *caddyfile.Dispenser) error
		line        int
		want        string
	}{
		{"features without names", "api_monetize {\n\ttier pro {\n\t\tfeatures\n\t}\n}", parseAppTest, 3, "tier pro: features: expected at least one feature name"},
		{"feature name", "api_monetize {\n\ttier pro {\n\t\tfeatures bulk/export\n\t}\n}", parseAppTest, 3, "tier pro: feature 'bulk/export': may only contain ASCII letters"},
		{"feature too long", "api_monetize {\n\ttier pro {\n\t\tfeatures " + strings.Repeat("f", 65) + "\n\t}\n}", parseAppTest, 3, "must be 1 to 64 characters long"},
		{"feature twice on a line", "api_monetize {\n\ttier pro {\n\t\tfeatures a b a\n\t}\n}", parseAppTest, 3, "tier pro: feature 'a' is listed twice"},
		{"feature twice on two lines", "api_monetize {\n\ttier pro {\n\t\tfeatures a\n\t\tfeatures b\n\t\tfeatures a\n\t}\n}", parseAppTest, 5, "tier pro: feature 'a' is listed twice"},
		{"features block", "api_monetize {\n\ttier pro {\n\t\tfeatures a {\n\t\t}\n\t}\n}", parseAppTest, 3, "takes no block"},
		{"require_feature one argument", "api_monetize {\n\trequire_feature bulk_export\n}", parseHandlerTest, 2, "expected 'require_feature <path pattern> <feature>'"},
		{"require_feature three arguments", "api_monetize {\n\trequire_feature /a b c\n}", parseHandlerTest, 2, "expected 'require_feature <path pattern> <feature>'"},
		{"require_feature pattern", "api_monetize {\n\trequire_feature v1/export bulk\n}", parseHandlerTest, 2, "path pattern 'v1/export' must start with '/' or '*'"},
		{"require_feature name", "api_monetize {\n\trequire_feature /v1/* bulk,export\n}", parseHandlerTest, 2, "require_feature /v1/*: feature 'bulk,export': may only contain"},
		{"matcher without names", "api_monetize_feature", parseMatcherTest, 1, "expected at least one feature name"},
		{"matcher name", "api_monetize_feature ok\napi_monetize_feature b@d", parseMatcherTest, 2, "feature 'b@d': may only contain"},
		{"matcher block", "api_monetize_feature a {\n\tb\n}", parseMatcherTest, 1, "unexpected block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, tc.parse(caddyfile.NewTestDispenser(tc.input)), tc.line, tc.want, "")
		})
	}
}

func parseAppTest(d *caddyfile.Dispenser) error {
	_, err := parseApp(d, nil)
	return err
}

func parseHandlerTest(d *caddyfile.Dispenser) error { return new(Handler).UnmarshalCaddyfile(d) }

func parseMatcherTest(d *caddyfile.Dispenser) error { return new(MatchFeature).UnmarshalCaddyfile(d) }

// TestFeatureRulesValidated checks the rules that need the tiers, applied
// by Provision to a Caddyfile and to JSON alike: a require_feature rule or
// a matcher naming a feature no tier includes (a typo that would refuse,
// or never match, every caller) is refused, as are JSON values the
// Caddyfile layer would have refused.
func TestFeatureRulesValidated(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	const global = `{
	admin off
	api_monetize {
		tier free
		tier pro {
			features bulk_export
		}
	}
}
`
	validate := func(t *testing.T, cfgJSON []byte) error {
		t.Helper()
		var cfg caddy.Config
		if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
			t.Fatal(err)
		}
		return caddy.Validate(&cfg)
	}
	adapt := func(t *testing.T, site string) []byte {
		t.Helper()
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(global+site), nil)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, tc := range []struct{ name, site, want string }{
		{"valid", ":8080 {\n\tapi_monetize {\n\t\trequire_feature /v1/export/* bulk_export\n\t}\n\t@bulk api_monetize_feature bulk_export\n\trespond @bulk 200\n}", ""},
		{"require_feature unknown feature", ":8080 {\n\tapi_monetize {\n\t\trequire_feature /v1/export/* bulk-export\n\t}\n}",
			"require_feature /v1/export/* bulk-export: no tier includes feature 'bulk-export'; add it to a tier with 'features bulk-export' (features the tiers include: bulk_export)"},
		{"matcher unknown feature", ":8080 {\n\tapi_monetize\n\t@bulk api_monetize_feature bulk_export priority\n\trespond @bulk 200\n}",
			"api_monetize_feature: no tier includes feature 'priority'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := validate(t, adapt(t, tc.site))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}

	// JSON the Caddyfile layer cannot produce.
	valid := adapt(t, ":8080 {\n\tapi_monetize {\n\t\trequire_feature /v1/export/* bulk_export\n\t}\n\t@bulk api_monetize_feature bulk_export\n\trespond @bulk 200\n}")
	for _, tc := range []struct{ name, from, to, want string }{
		{"require_feature pattern", `"path":"/v1/export/*"`, `"path":"v1/export"`, "require_feature: path pattern 'v1/export' must start with '/' or '*'"},
		{"require_feature name", `"feature":"bulk_export"`, `"feature":"bulk export"`, "feature 'bulk export': may only contain"},
		{"matcher without features", `"api_monetize_feature":{"features":["bulk_export"]}`, `"api_monetize_feature":{}`, "api_monetize_feature: expected at least one feature name"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !strings.Contains(string(valid), tc.from) {
				t.Fatalf("adapted config has no %s: %s", tc.from, valid)
			}
			err := validate(t, []byte(strings.Replace(string(valid), tc.from, tc.to, 1)))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// featureUpstream answers with what the gateway told it: the route taken
// and the features header.
func featureUpstream(t *testing.T) *httptest.Server {
	t.Helper()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "route=%s features=%q path=%s", r.Header.Get("X-Route"), r.Header.Values("X-Features"), r.URL.Path)
	}))
	t.Cleanup(up.Close)
	return up
}

// featureConfig: free includes no feature, pro bulk_export, enterprise
// bulk_export and priority_routing. Requests under /v1/ go through
// api_monetize (require_feature on /v1/export/*), then to the priority
// upstream route when the caller's tier has priority_routing; /early/
// evaluates the matcher before api_monetize has run, with the identity
// variable set by the vars directive.
func featureConfig(storeLine, upstream string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		%s
		key_secret test-secret-0123456789
		store_timeout 2s
		upgrade_url https://example.com/pricing
		tier free {
			included 1000/month
		}
		tier pro {
			included 1000/month
			features bulk_export
		}
		tier enterprise {
			included 1000/month
			features bulk_export
			features priority_routing
		}
		customer hobbyist tier free
		customer acme tier pro
		customer bigco tier enterprise
		key %s hobbyist
		key %s acme
		key %s bigco
	}
}

:%d {
	@priority api_monetize_feature priority_routing
	route /early/* {
		# A configuration cannot forge the identity either.
		vars api_monetize.identity bigco
		respond @priority "early: matched" 200
		api_monetize
		respond "early: not matched" 200
	}
	handle /v1/usage {
		api_monetize_usage
	}
	route /v1/* {
		api_monetize {
			require_feature /v1/export/* bulk_export
		}
		reverse_proxy @priority %s {
			header_up X-Route priority
			header_up X-Features {http.api_monetize.features}
		}
		reverse_proxy %s {
			header_up X-Route standard
			header_up X-Features {http.api_monetize.features}
		}
	}
}
`, testAdminPort, testHTTPPort, storeLine, freeKey, proKey, entKey, testHTTPPort, upstream, upstream)
}

func TestFeatures(t *testing.T) {
	forEachStore(t, func(t *testing.T, cfg testConfig) {
		up := featureUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(featureConfig(cfg.storeLine, up.URL), "caddyfile")

		t.Run("PlaceholderReachesUpstream", func(t *testing.T) {
			for _, c := range []struct{ key, want string }{
				{freeKey, `route=standard features=[""]`},
				{proKey, `route=standard features=["bulk_export"]`},
				{entKey, `route=priority features=["bulk_export,priority_routing"]`},
			} {
				// A client cannot add features, nor pick the route, with
				// headers of its own.
				h := http.Header{"X-Api-Key": {c.key}, "X-Features": {"priority_routing"}, "X-Route": {"priority"}}
				r := do(t, http.MethodGet, testBase+"/v1/items", h, "")
				if r.status != http.StatusOK || !strings.HasPrefix(r.body, c.want+" ") {
					t.Errorf("%s: %d %q, want %q", c.key[:4], r.status, r.body, c.want)
				}
			}
		})

		t.Run("MatcherBeforeHandlerNeverMatches", func(t *testing.T) {
			for _, key := range []string{entKey, ""} {
				r := call(t, "/early/x", key)
				want := http.StatusOK
				if key == "" {
					want = http.StatusUnauthorized
				}
				if r.status != want || strings.Contains(r.body, "early: matched") {
					t.Errorf("key %q: %d %q; the matcher must not match before api_monetize authenticated the caller", key, r.status, r.body)
				}
			}
			if r := call(t, "/early/x", entKey); r.body != "early: not matched" {
				t.Errorf("enterprise on /early/x: %q", r.body)
			}
		})

		t.Run("RequireFeature", func(t *testing.T) {
			before := usageOf(t, "hobbyist")
			r := call(t, "/v1/export/all", freeKey)
			if r.status != http.StatusForbidden {
				t.Fatalf("free on /v1/export/all: %d %s", r.status, r.body)
			}
			p := r.problem(t)
			if p["type"] != problemFeatureNotInTier || p["feature"] != "bulk_export" || p["tier"] != "free" {
				t.Errorf("problem: %s", r.body)
			}
			if d, _ := p["detail"].(string); !strings.Contains(d, "needs the feature bulk_export, which the free plan does not include; it is included in: pro, enterprise.") {
				t.Errorf("detail %q does not name the tiers that include the feature", d)
			}
			up, _ := p["upgrade"].(map[string]any)
			if up == nil || fmt.Sprint(up["tiers"]) != "[pro enterprise]" || up["url"] != "https://example.com/pricing" {
				t.Errorf("upgrade hint: %v", p["upgrade"])
			}
			// The refused request is neither billed nor forwarded.
			if u := usageOf(t, "hobbyist"); u.Billed != before.Billed || u.Requests != before.Requests {
				t.Errorf("a refused request was counted: %+v -> %+v", before.PeriodUsage, u.PeriodUsage)
			}
			// Path matching is Caddy's: case and doubled slashes do not
			// bypass the rule.
			for _, path := range []string{"/v1/EXPORT/all", "/v1//export/all"} {
				if r := call(t, path, freeKey); r.status != http.StatusForbidden {
					t.Errorf("free on %s: %d", path, r.status)
				}
			}
			for _, key := range []string{proKey, entKey} {
				if r := call(t, "/v1/export/all", key); r.status != http.StatusOK || !strings.Contains(r.body, "path=/v1/export/all") {
					t.Errorf("%s on /v1/export/all: %d %q", key[:4], r.status, r.body)
				}
			}
			if r := call(t, "/v1/items", freeKey); r.status != http.StatusOK {
				t.Errorf("free on a path without require_feature: %d", r.status)
			}
		})

		t.Run("UsageAndAdminShowFeatures", func(t *testing.T) {
			r := call(t, "/v1/usage", entKey)
			var v usageView
			if err := json.Unmarshal([]byte(r.body), &v); r.status != http.StatusOK || err != nil {
				t.Fatalf("usage: %d %s", r.status, r.body)
			}
			if !slices.Equal(v.Features, []string{"bulk_export", "priority_routing"}) {
				t.Errorf("usage API features: %q", v.Features)
			}
			if r := call(t, "/v1/usage", freeKey); !strings.Contains(r.body, `"features":[]`) {
				t.Errorf("usage API of a tier without features: %s", r.body)
			}
			if v := usageOf(t, "acme"); !slices.Equal(v.Features, []string{"bulk_export"}) {
				t.Errorf("admin usage features: %q", v.Features)
			}
			r = admin(t, http.MethodGet, "/api_monetize/tiers", "")
			var tiers []Tier
			if err := json.Unmarshal([]byte(r.body), &tiers); err != nil || len(tiers) != 3 {
				t.Fatalf("tiers: %d %s", r.status, r.body)
			}
			for i, want := range [][]string{nil, {"bulk_export"}, {"bulk_export", "priority_routing"}} {
				if !slices.Equal(tiers[i].Features, want) {
					t.Errorf("admin tiers: %s features %q, want %q", tiers[i].Name, tiers[i].Features, want)
				}
			}
		})

		// A reload that takes a feature out of a tier applies at once to
		// callers whose key lookup is cached: the features come from the
		// running configuration, not from the cached lookup.
		t.Run("ReloadRemovesFeature", func(t *testing.T) {
			if r := call(t, "/v1/export/all", proKey); r.status != http.StatusOK {
				t.Fatalf("pro before the reload: %d", r.status)
			}
			cfg := featureConfig(cfg.storeLine, up.URL)
			without := strings.Replace(cfg, "tier pro {\n\t\t\tincluded 1000/month\n\t\t\tfeatures bulk_export\n", "tier pro {\n\t\t\tincluded 1000/month\n", 1)
			if without == cfg {
				t.Fatal("the pro tier's features line was not found")
			}
			tester.InitServer(without, "caddyfile")
			if r := call(t, "/v1/export/all", proKey); r.status != http.StatusForbidden || !strings.Contains(r.body, "included in: enterprise.") {
				t.Errorf("pro after the reload: %d %s", r.status, r.body)
			}
			if r := call(t, "/v1/items", proKey); !strings.HasPrefix(r.body, `route=standard features=[""] `) {
				t.Errorf("pro's features after the reload: %q", r.body)
			}
		})
	})
}

// BenchmarkHandlerEmbeddedFeatures is BenchmarkHandlerEmbedded with the
// feature flags in use: the tier has features, the handler one
// require_feature rule the request matches, and a matcher has asked for
// the caller's identity in the request.
func BenchmarkHandlerEmbeddedFeatures(b *testing.B) {
	h, stop := benchHandler(b, func(app *App) {
		app.StorePath = filepath.Join(b.TempDir(), "store.db")
		app.Tiers[0].Features = []string{"bulk_export", "priority_routing"}
	})
	defer stop()
	h.RequireFeatures = []FeatureRequirement{{Path: "/v1/*", Feature: "priority_routing"}}
	if err := h.compileRequirements(caddy.Context{}); err != nil {
		b.Fatal(err)
	}
	h.app.identityWanted.Store(true)
	benchServe(b, h)
}

// FuzzFeatureLines parses arbitrary text as a tier's features lines, a
// handler's require_feature lines and an api_monetize_feature matcher: no
// input panics, and whatever is accepted holds only names the rules
// accept (so the placeholder's commas always separate whole names).
func FuzzFeatureLines(f *testing.F) {
	for _, s := range []string{"bulk_export", "a b c", "a a", "x,y", "\"a b\"", "{\n}", "a {\n\tb\n}", "", "/v1/* bulk", "v1 bulk", "/a b c"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		check := func(where string, names []string) {
			for _, n := range names {
				if checkName(n) != nil {
					t.Fatalf("%s accepted the name %q from %q", where, n, s)
				}
			}
		}
		// dispenser, not caddyfile.NewTestDispenser, which exits the
		// process on input the lexer refuses (a heredoc's "<<").
		d, ok := dispenser("api_monetize {\n\ttier pro {\n\t\tfeatures " + s + "\n\t}\n}")
		if !ok {
			return
		}
		if v, err := parseApp(d, nil); err == nil {
			var app App
			if err := json.Unmarshal(v.(httpcaddyfile.App).Value, &app); err != nil {
				t.Fatal(err)
			}
			for _, tier := range app.Tiers {
				check("features", tier.Features)
				if err := tier.checkFeatures(); err != nil {
					t.Fatalf("the Caddyfile accepted features %q that Provision refuses: %v", tier.Features, err)
				}
			}
		}
		var h Handler
		if d, ok := dispenser("api_monetize {\n\trequire_feature " + s + "\n}"); ok && h.UnmarshalCaddyfile(d) == nil {
			for _, req := range h.RequireFeatures {
				check("require_feature", []string{req.Feature})
				if checkPathPattern(req.Path) != nil {
					t.Fatalf("require_feature accepted the pattern %q from %q", req.Path, s)
				}
			}
		}
		var m MatchFeature
		if m.UnmarshalCaddyfile(caddyfile.NewTestDispenser("api_monetize_feature "+s)) == nil {
			check("api_monetize_feature", m.Features)
		}
	})
}
