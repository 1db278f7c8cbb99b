package module

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestJSONParity checks that each rule the Caddyfile enforces about what a
// configuration means refuses the same configuration written as JSON
// (Caddy's native format, what the admin /load endpoint takes): the rules
// live next to the config structs and Provision applies them. Each case
// writes the broken option once as a Caddyfile line (refused at adapt
// time, on that line) and once as a change to a valid app's JSON (refused
// by caddy.Validate, which provisions the app).
func TestJSONParity(t *testing.T) {
	for _, tc := range []struct {
		name string
		// global is the body of the api_monetize option; line is the line
		// the Caddyfile error must name.
		global string
		line   int
		// edit breaks the valid JSON app the same way.
		edit func(a *App)
		// want is in both errors; wantJSON, when set, replaces it for JSON.
		want, wantJSON string
	}{
		{
			name:   "throttle not slower than the rate",
			global: "tier pro {\n\t\tincluded 10/month\n\t\trate 5/min\n\t\tover_quota throttle 10/min\n\t}",
			line:   5,
			edit: func(a *App) {
				a.Tiers[0].Included = &Included{Units: 10, Interval: "month"}
				a.Tiers[0].Rate = &Rate{Limit: 5, Window: caddy.Duration(time.Minute)}
				a.Tiers[0].OverQuota = &OverQuota{Mode: "throttle", Throttle: &Rate{Limit: 10, Window: caddy.Duration(time.Minute)}}
			},
			want: "tier pro: over_quota throttle 10/min is not slower than the tier's rate 5/min",
		},
		{
			name:     "customer id with a separator",
			global:   "tier pro\n\tcustomer acme|tokens tier pro",
			line:     3,
			edit:     func(a *App) { a.Customers[0].ID = "acme|tokens" },
			want:     "customer 'acme|tokens': may only contain ASCII letters",
			wantJSON: `customer "acme|tokens": may only contain ASCII letters`,
		},
		{
			name:   "over_quota without included",
			global: "tier pro {\n\t\tover_quota block\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].OverQuota = &OverQuota{Mode: "block"} },
			want:   "tier pro: over_quota needs included",
		},
		{
			name:   "thresholds without included",
			global: "tier pro {\n\t\tthresholds 50\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].Thresholds = []int{50} },
			want:   "tier pro: thresholds needs included",
		},
		{
			name:   "tier thresholds out of order",
			global: "tier pro {\n\t\tincluded 10/month\n\t\tthresholds 90 50\n\t}",
			line:   4,
			edit: func(a *App) {
				a.Tiers[0].Included = &Included{Units: 10, Interval: "month"}
				a.Tiers[0].Thresholds = []int{90, 50}
			},
			want: "write the percentages in ascending order",
		},
		{
			name:   "app thresholds repeated",
			global: "thresholds 50 50\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.Thresholds = []int{50, 50} },
			want:   "listed twice",
		},
		{
			name:   "store_path with redis",
			global: "redis redis://127.0.0.1:6379\n\tstore_path /tmp/x.db\n\ttier pro",
			line:   3,
			edit:   func(a *App) { a.Redis, a.StorePath = "redis://127.0.0.1:6379", "/tmp/x.db" },
			want:   "store_path sets the embedded store's file, but redis is set",
		},
		{
			name:   "redis_prefix without redis",
			global: "redis_prefix am:\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.RedisPrefix = "am:" },
			want:   "redis_prefix applies only to a Redis store",
		},
		{
			name:   "redis URL",
			global: "redis ftp://127.0.0.1\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.Redis = "ftp://127.0.0.1" },
			want:   "redis: expected a URL such as redis://",
		},
		{
			name:   "redis and redis_cluster",
			global: "redis redis://127.0.0.1:6379\n\tredis_cluster redis://127.0.0.1:7000\n\ttier pro",
			line:   3,
			edit:   func(a *App) { a.Redis, a.RedisCluster = "redis://127.0.0.1:6379", "redis://127.0.0.1:7000" },
			want:   "redis_cluster and redis both set the Redis store",
		},
		{
			name:   "store_path with redis_cluster",
			global: "redis_cluster redis://127.0.0.1:7000\n\tstore_path /tmp/x.db\n\ttier pro",
			line:   3,
			edit:   func(a *App) { a.RedisCluster, a.StorePath = "redis://127.0.0.1:7000", "/tmp/x.db" },
			want:   "store_path sets the embedded store's file, but redis_cluster is set",
		},
		{
			name:   "redis_cluster URL",
			global: "redis_cluster redis://127.0.0.1:7000?addr=h2:7001&bogus=1\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.RedisCluster = "redis://127.0.0.1:7000?addr=h2:7001&bogus=1" },
			want:   "redis_cluster: expected a URL such as redis://",
		},
		{
			name:   "redis_wait_replicas without redis",
			global: "redis_wait_replicas 1\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.RedisWaitReplicas = 1 },
			want:   "redis_wait_replicas applies only to a Redis store",
		},
		{
			name:   "redis_cluster prefix with a brace",
			global: "redis_cluster redis://127.0.0.1:7000\n\tredis_prefix am{x}:\n\ttier pro",
			line:   3,
			edit:   func(a *App) { a.RedisCluster, a.RedisPrefix = "redis://127.0.0.1:7000", "am{x}:" },
			want:   "must not contain '{' or '}'",
		},
		{
			name:   "tier name",
			global: "tier pro/plus",
			line:   2,
			edit:   func(a *App) { a.Tiers[0].Name = "pro/plus"; a.Customers[0].Tier = "pro/plus" },
			want:   "tier 'pro/plus': may only contain ASCII letters",
		},
		{
			name:   "endpoint pattern",
			global: "tier pro {\n\t\tendpoints v1/*\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].Endpoints = []string{"v1/*"} },
			want:   "endpoints: path pattern 'v1/*' must start with '/' or '*'",
		},
		{
			name:   "exclude pattern",
			global: "tier pro {\n\t\texclude admin\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].Exclude = []string{"admin"} },
			want:   "exclude: path pattern 'admin' must start with '/' or '*'",
		},
		{
			name:   "sla above 100%",
			global: "tier pro {\n\t\tsla 150%\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].SLA = "150%" },
			want:   "sla '150%': must be more than 0% and at most 100%",
		},
		{
			name:     "price interval",
			global:   "tier pro {\n\t\tprice 49/week\n\t}",
			line:     3,
			edit:     func(a *App) { a.Tiers[0].Price = &Price{AmountMicros: 49_000_000, Interval: "week"} },
			want:     "the interval must be month or year, as in 49.00/month, got 'week'",
			wantJSON: "tier pro: price: the interval must be month or year",
		},
		{
			name:     "included per year",
			global:   "tier pro {\n\t\tincluded 10/year\n\t}",
			line:     3,
			edit:     func(a *App) { a.Tiers[0].Included = &Included{Units: 10, Interval: "year"} },
			want:     "included units are counted per month; write 10/month",
			wantJSON: "tier pro: included units are counted per month; write 10/month",
		},
		{
			name:   "upgrade_url relative",
			global: "upgrade_url /pricing\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.UpgradeURL = "/pricing" },
			want:   "upgrade_url '/pricing': expected an absolute URL",
		},
		{
			name:   "usage_cost_header with an underscore",
			global: "usage_cost_header X_Cost\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.UsageCostHeader = "X_Cost" },
			want:   "usage_cost_header X_Cost: header names with '_' or '.' are refused",
		},
		{
			name:   "bill_on covered twice",
			global: "bill_on 2xx 200\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.BillOn = []string{"2xx", "200"} },
			want:   "bill_on: 200 is already billable as part of 2xx",
		},
		{
			name:     "rate of zero",
			global:   "tier pro {\n\t\trate 0/min\n\t}",
			line:     3,
			edit:     func(a *App) { a.Tiers[0].Rate = &Rate{Limit: 0, Window: caddy.Duration(time.Minute)} },
			want:     "the limit must be a whole number of at least 1 unit per window",
			wantJSON: `tier "pro": rate must be a positive number of units per positive window`,
		},
		{
			name:   "feature name",
			global: "tier pro {\n\t\tfeatures bulk_export bulk,export\n\t}",
			line:   3,
			edit:   func(a *App) { a.Tiers[0].Features = []string{"bulk_export", "bulk,export"} },
			want:   "tier pro: feature 'bulk,export': may only contain ASCII letters",
		},
		{
			name:   "feature listed twice",
			global: "tier pro {\n\t\tfeatures bulk_export\n\t\tfeatures priority bulk_export\n\t}",
			line:   4,
			edit:   func(a *App) { a.Tiers[0].Features = []string{"bulk_export", "priority", "bulk_export"} },
			want:   "tier pro: feature 'bulk_export' is listed twice",
		},
		{
			name:   "meter named cost",
			global: "meter cost {\n\t\tsource request_bytes\n\t}\n\ttier pro",
			line:   2,
			edit:   func(a *App) { a.Meters = []MeterConfig{{Name: "cost", Source: MeterSource{Kind: "request_bytes"}}} },
			want:   "meter 'cost': the name is the default meter's",
		},
		{
			name:   "meter path pattern",
			global: "meter m {\n\t\tsource cost\n\t\tpaths /v1/*\n\t\tpaths /v2/* v2/x\n\t}\n\ttier pro",
			line:   5,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "m", Source: MeterSource{Kind: "cost"}, Paths: []string{"/v1/*", "/v2/*", "v2/x"}}}
			},
			want: "meter m: paths: path pattern 'v2/x' must start with '/' or '*'",
		},
		{
			name:   "meter declared twice",
			global: "meter m {\n\t\tsource cost\n\t\tstripe a\n\t}\n\tmeter m {\n\t\tsource cost\n\t\tstripe b\n\t}\n\ttier pro",
			line:   6,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "m", Source: MeterSource{Kind: "cost"}, StripeEvent: "a"}, {Name: "m", Source: MeterSource{Kind: "cost"}, StripeEvent: "b"}}
			},
			want: "meter 'm' is declared twice",
		},
		{
			name:   "header meter without max",
			global: "meter tokens {\n\t\tsource header X-Tokens\n\t}\n\ttier pro",
			line:   3,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "header", Header: "X-Tokens"}}}
			},
			want: "meter tokens: source header X-Tokens needs 'max <units>'",
		},
		{
			name:   "meter header is usage_cost_header",
			global: "usage_cost_header X-Cost\n\tmeter tokens {\n\t\tsource header x-cost max 5\n\t}\n\ttier pro",
			line:   4,
			edit: func(a *App) {
				a.UsageCostHeader = "X-Cost"
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "header", Header: "x-cost", Max: 5}}}
			},
			want: "meter tokens: header x-cost is already read by usage_cost_header",
		},
		{
			name:   "meter Stripe event is the default meter's",
			global: "meter tokens {\n\t\tsource cost\n\t\tstripe api_calls\n\t}\n\ttier pro",
			line:   4,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "cost"}, StripeEvent: "api_calls"}}
			},
			want: "meter tokens: Stripe event name 'api_calls' is already the default meter's",
		},
		{
			name:   "tier meter not declared",
			global: "tier pro {\n\t\tmeter tokens {\n\t\t\tincluded 5/month\n\t\t}\n\t}",
			line:   3,
			edit: func(a *App) {
				a.Tiers[0].Meters = []TierMeter{{Meter: "tokens", Included: &Included{Units: 5, Interval: "month"}}}
			},
			want: "tier pro: meter 'tokens' is not declared",
		},
		{
			name:   "tier meter over_quota without included",
			global: "meter tokens {\n\t\tsource cost\n\t}\n\ttier pro {\n\t\tmeter tokens {\n\t\t\tover_quota block\n\t\t}\n\t}",
			line:   7,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "cost"}}}
				a.Tiers[0].Meters = []TierMeter{{Meter: "tokens", OverQuota: &OverQuota{Mode: "block"}}}
			},
			want: "tier pro meter tokens: over_quota needs included",
		},
		{
			name:   "tier meter thresholds without included",
			global: "meter tokens {\n\t\tsource cost\n\t}\n\ttier pro {\n\t\tmeter tokens {\n\t\t\tthresholds 50\n\t\t}\n\t}",
			line:   7,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "cost"}}}
				a.Tiers[0].Meters = []TierMeter{{Meter: "tokens", Thresholds: []int{50}}}
			},
			want: "tier pro meter tokens: thresholds needs included",
		},
		{
			name:   "tier meter throttle not slower than the rate",
			global: "meter tokens {\n\t\tsource cost\n\t}\n\ttier pro {\n\t\trate 5/min\n\t\tmeter tokens {\n\t\t\tincluded 10/month\n\t\t\tover_quota throttle 10/min\n\t\t}\n\t}",
			line:   9,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "cost"}}}
				a.Tiers[0].Rate = &Rate{Limit: 5, Window: caddy.Duration(time.Minute)}
				a.Tiers[0].Meters = []TierMeter{{Meter: "tokens", Included: &Included{Units: 10, Interval: "month"},
					OverQuota: &OverQuota{Mode: "throttle", Throttle: &Rate{Limit: 10, Window: caddy.Duration(time.Minute)}}}}
			},
			want: "tier pro meter tokens: over_quota throttle 10/min is not slower than the tier's rate 5/min",
		},
		{
			name:   "tier meter twice",
			global: "meter tokens {\n\t\tsource cost\n\t}\n\ttier pro {\n\t\tmeter tokens {\n\t\t}\n\t\tmeter tokens {\n\t\t}\n\t}",
			line:   8,
			edit: func(a *App) {
				a.Meters = []MeterConfig{{Name: "tokens", Source: MeterSource{Kind: "cost"}}}
				a.Tiers[0].Meters = []TierMeter{{Meter: "tokens"}, {Meter: "tokens"}}
			},
			want: "meter 'tokens' has two blocks",
		},
		{
			name:     "customer of an unknown tier",
			global:   "tier pro\n\tcustomer acme tier gold",
			line:     3,
			edit:     func(a *App) { a.Customers[0].Tier = "gold" },
			want:     "unknown tier 'gold'",
			wantJSON: `customer "acme": unknown tier "gold"`,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("XDG_DATA_HOME", t.TempDir())
			// The Caddyfile: refused at adapt time, on the option's line.
			_, err := parseApp(caddyfile.NewTestDispenser("api_monetize {\n\t"+tc.global+"\n}"), nil)
			checkErr(t, err, tc.line, tc.want, "")

			// The same rule broken in JSON: refused by Provision.
			a := validJSONApp()
			tc.edit(a)
			raw, err := json.Marshal(a)
			if err != nil {
				t.Fatal(err)
			}
			err = caddy.Validate(&caddy.Config{
				Admin:   &caddy.AdminConfig{Disabled: true},
				AppsRaw: caddy.ModuleMap{"api_monetize": raw},
			})
			want := tc.want
			if tc.wantJSON != "" {
				want = tc.wantJSON
			}
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("JSON %s: got %v, want an error containing %q", raw, err, want)
			}
		})
	}
}

// validJSONApp is a valid app, as JSON config would hold it, for
// TestJSONParity to break one rule at a time. It passes caddy.Validate
// (checked by TestJSONParityBase).
func validJSONApp() *App {
	return &App{
		StorePath: "", // the default path under Caddy's data directory
		Tiers:     []Tier{{Name: "pro"}},
		Customers: []CustomerConfig{{ID: "acme", Tier: "pro"}},
	}
}

// TestJSONParityBase checks that validJSONApp is valid, so each case of
// TestJSONParity is refused for the rule it breaks and nothing else.
func TestJSONParityBase(t *testing.T) {
	raw, err := json.Marshal(validJSONApp())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	if err := caddy.Validate(&caddy.Config{
		Admin:   &caddy.AdminConfig{Disabled: true},
		AppsRaw: caddy.ModuleMap{"api_monetize": raw},
	}); err != nil {
		t.Fatalf("the valid app %s is refused: %v", raw, err)
	}
}
