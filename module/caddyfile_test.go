package module

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
)

// acceptanceGlobal is the global block of the acceptance configuration.
const acceptanceGlobal = `api_monetize {
	redis redis://127.0.0.1:6379/0    # omit this line to use the embedded store
	key_secret {env.API_MONETIZE_KEY_SECRET}

	tier free {
		price 0
		included 1000/month
		rate 10/min
		endpoints /v1/basic/*
		support community
	}
	tier pro {
		price 49.00/month
		included 50000/month
		rate 100/min
		endpoints /v1/*
		exclude /v1/admin/*
		support email
	}
	tier enterprise {
		price custom
		included 1000000/month
		rate 1000/min burst 200
		endpoints /v1/* /v1/admin/*
		support dedicated
		sla 99.9%
	}

	customer hobbyist tier free
	customer acme tier pro
	key {env.DEMO_FREE_KEY} hobbyist
	key {env.DEMO_PRO_KEY} acme
}`

func TestParseAppAcceptance(t *testing.T) {
	v, err := parseApp(caddyfile.NewTestDispenser(acceptanceGlobal), nil)
	if err != nil {
		t.Fatal(err)
	}
	app, ok := v.(httpcaddyfile.App)
	if !ok || app.Name != "api_monetize" {
		t.Fatalf("got %#v, want an httpcaddyfile.App named api_monetize", v)
	}
	want := &App{
		Redis:     "redis://127.0.0.1:6379/0",
		KeySecret: "{env.API_MONETIZE_KEY_SECRET}",
		Tiers: []Tier{
			{
				Name:      "free",
				Included:  &Included{Units: 1000, Interval: "month"},
				Rate:      &Rate{Limit: 10, Window: caddy.Duration(time.Minute)},
				Endpoints: []string{"/v1/basic/*"},
				Support:   "community",
			},
			{
				Name:      "pro",
				Price:     &Price{AmountMicros: 49_000_000, Interval: "month"},
				Included:  &Included{Units: 50000, Interval: "month"},
				Rate:      &Rate{Limit: 100, Window: caddy.Duration(time.Minute)},
				Endpoints: []string{"/v1/*"},
				Exclude:   []string{"/v1/admin/*"},
				Support:   "email",
			},
			{
				Name:      "enterprise",
				Price:     &Price{Custom: true},
				Included:  &Included{Units: 1_000_000, Interval: "month"},
				Rate:      &Rate{Limit: 1000, Window: caddy.Duration(time.Minute), Burst: 200},
				Endpoints: []string{"/v1/*", "/v1/admin/*"},
				Support:   "dedicated",
				SLA:       "99.9%",
			},
		},
		Customers: []CustomerConfig{{ID: "hobbyist", Tier: "free"}, {ID: "acme", Tier: "pro"}},
		Keys: []KeyConfig{
			{Key: "{env.DEMO_FREE_KEY}", Customer: "hobbyist"},
			{Key: "{env.DEMO_PRO_KEY}", Customer: "acme"},
		},
	}
	if string(app.Value) != mustJSON(t, want) {
		t.Errorf("got\n%s\nwant\n%s", app.Value, mustJSON(t, want))
	}
}

// mustJSON is v's JSON: the configuration fields only.
func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestParseAppAllOptions(t *testing.T) {
	input := `api_monetize {
		redis rediss://user:{env.REDIS_PASSWORD}@redis.internal:6380/2
		redis_prefix shop:
		admin_api read_write
		upgrade_url https://example.com/pricing
		rate_limit_headers ietf
		store_timeout 2s
		key_secret 0123456789abcdef
		key literal-demo-key-0123456789 acme expires 2027-01-31T00:00:00Z
		customer acme anchor 2026-02-28 tier metered email billing@acme.example stripe cus_123
		tier metered {
			price 12.345678/year
			included 0/month
			endpoints /a/*
			exclude /a/b
			endpoints /c /d*
			exclude /a/c
			on_store_error deny
			rate 7/h burst 3
		}
	}`
	got := new(App)
	if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	want := &App{
		Redis:            "rediss://user:{env.REDIS_PASSWORD}@redis.internal:6380/2",
		RedisPrefix:      "shop:",
		AdminAPI:         "read_write",
		UpgradeURL:       "https://example.com/pricing",
		RateLimitHeaders: "ietf",
		StoreTimeout:     caddy.Duration(2 * time.Second),
		KeySecret:        "0123456789abcdef",
		Tiers: []Tier{{
			Name:         "metered",
			Price:        &Price{AmountMicros: 12_345_678, Interval: "year"},
			Included:     &Included{Units: 0, Interval: "month"},
			Rate:         &Rate{Limit: 7, Window: caddy.Duration(time.Hour), Burst: 3},
			Endpoints:    []string{"/a/*", "/c", "/d*"},
			Exclude:      []string{"/a/b", "/a/c"},
			OnStoreError: "deny",
		}},
		Customers: []CustomerConfig{{
			ID: "acme", Tier: "metered", StripeCustomerID: "cus_123",
			Email: "billing@acme.example", Anchor: "2026-02-28",
		}},
		Keys: []KeyConfig{{Key: "literal-demo-key-0123456789", Customer: "acme", Expires: "2027-01-31T00:00:00Z"}},
	}
	if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
		t.Errorf("got\n%s\nwant\n%s", g, w)
	}
}

// quotaGlobal is the global block of the metering and quota configuration.
const quotaGlobal = `api_monetize {
	currency usd
	tier free {
		included 1000/month
		over_quota block
	}
	tier pro {
		price 49.00/month
		included 50000/month
		over_quota bill 0.002          # USD per unit beyond the included quota
	}
	tier enterprise {
		included 1000000/month
		over_quota throttle 50/min bill 0.001
		period anniversary
	}
	bill_on 2xx 3xx                    # default; which response classes are billable
	usage_cost_header X-Usage-Cost     # optional: trusted upstream reports the real cost
	thresholds 80 100 120              # default; per tier override allowed
}`

func TestParseAppQuota(t *testing.T) {
	got := new(App)
	if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(quotaGlobal)); err != nil {
		t.Fatal(err)
	}
	want := &App{
		Currency:        "usd",
		BillOn:          []string{"2xx", "3xx"},
		UsageCostHeader: "X-Usage-Cost",
		Thresholds:      []int{80, 100, 120},
		Tiers: []Tier{
			{
				Name:      "free",
				Included:  &Included{Units: 1000, Interval: "month"},
				OverQuota: &OverQuota{Mode: "block"},
			},
			{
				Name:      "pro",
				Price:     &Price{AmountMicros: 49_000_000, Interval: "month"},
				Included:  &Included{Units: 50000, Interval: "month"},
				OverQuota: &OverQuota{Mode: "bill", PriceMicros: 2000},
			},
			{
				Name:     "enterprise",
				Included: &Included{Units: 1_000_000, Interval: "month"},
				OverQuota: &OverQuota{
					Mode:        "throttle",
					PriceMicros: 1000,
					Throttle:    &Rate{Limit: 50, Window: caddy.Duration(time.Minute)},
				},
				Period: &Period{Anniversary: true},
			},
		},
	}
	if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
		t.Errorf("got\n%s\nwant\n%s", g, w)
	}
}

func TestParseAppQuotaVariants(t *testing.T) {
	input := `api_monetize {
		currency EUR
		bill_on 2XX 404 304
		usage_cost_header Usage-Units max 250
		thresholds 50% 90 1000
		tier calendar {
			period calendar Europe/Berlin
			thresholds 100
			included 10/month
			over_quota throttle 2/s burst 5
			rate 10/s
		}
		tier quiet {
			included 0/month
			thresholds off
			period calendar
			over_quota bill 0
		}
		tier utc {
			period calendar UTC
		}
	}`
	got := new(App)
	if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	want := &App{
		Currency:        "eur",
		BillOn:          []string{"2xx", "404", "304"},
		UsageCostHeader: "Usage-Units",
		MaxUsageCost:    250,
		Thresholds:      []int{50, 90, 1000},
		Tiers: []Tier{
			{
				Name:       "calendar",
				Included:   &Included{Units: 10, Interval: "month"},
				Rate:       &Rate{Limit: 10, Window: caddy.Duration(time.Second)},
				OverQuota:  &OverQuota{Mode: "throttle", Throttle: &Rate{Limit: 2, Window: caddy.Duration(time.Second), Burst: 5}},
				Period:     &Period{Zone: "Europe/Berlin"},
				Thresholds: []int{100},
			},
			{
				Name:       "quiet",
				Included:   &Included{Units: 0, Interval: "month"},
				OverQuota:  &OverQuota{Mode: "bill"},
				Period:     &Period{},
				Thresholds: []int{},
			},
			{Name: "utc", Period: &Period{Zone: "UTC"}},
		},
	}
	if g, w := mustJSON(t, got), mustJSON(t, want); g != w {
		t.Errorf("got\n%s\nwant\n%s", g, w)
	}
}

// TestParseThresholdsOff checks that "thresholds off" yields an empty, non-nil
// list, which turns thresholds off, and that a tier's survives the JSON the
// adapter writes, where it must stay distinct from an unset list (which
// inherits the app's thresholds).
func TestParseThresholdsOff(t *testing.T) {
	input := `api_monetize {
		thresholds off
		tier off {
			included 10/month
			thresholds off
		}
		tier inherit {
			included 10/month
		}
	}`
	app := new(App)
	if err := app.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err != nil {
		t.Fatal(err)
	}
	if app.Thresholds == nil || len(app.Thresholds) != 0 {
		t.Errorf("global thresholds off: got %#v, want an empty, non-nil list", app.Thresholds)
	}
	var tiers []Tier
	if err := json.Unmarshal([]byte(mustJSON(t, app.Tiers)), &tiers); err != nil {
		t.Fatal(err)
	}
	if off := tiers[0].Thresholds; off == nil || len(off) != 0 {
		t.Errorf("tier thresholds off after a JSON round trip: got %#v, want an empty, non-nil list", off)
	}
	if inherit := tiers[1].Thresholds; inherit != nil {
		t.Errorf("tier without thresholds after a JSON round trip: got %#v, want nil", inherit)
	}
}

func TestParseAppTwice(t *testing.T) {
	d := caddyfile.NewTestDispenser("api_monetize {\n\ttier free\n}")
	_, err := parseApp(d, httpcaddyfile.App{Name: "api_monetize"})
	if err == nil || !strings.Contains(err.Error(), "given twice") {
		t.Fatalf("got %v, want an error about the option given twice", err)
	}
}

func TestPrice(t *testing.T) {
	for in, want := range map[string]*Price{
		"0":                 nil,
		"0.00":              nil,
		"0/month":           nil,
		"custom":            {Custom: true},
		"49.00/month":       {AmountMicros: 49_000_000, Interval: "month"},
		"49/month":          {AmountMicros: 49_000_000, Interval: "month"},
		"0.5/year":          {AmountMicros: 500_000, Interval: "year"},
		"0.000001/month":    {AmountMicros: 1, Interval: "month"},
		"1234.567891/month": {AmountMicros: 1_234_567_891, Interval: "month"},
	} {
		got, err := parsePrice(in)
		if err != nil {
			t.Errorf("price %s: %v", in, err)
			continue
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("price %s: got %+v, want %+v", in, got, want)
		}
	}
}

func TestRateWindows(t *testing.T) {
	for unit, want := range map[string]time.Duration{
		"s": time.Second, "sec": time.Second, "second": time.Second,
		"m": time.Minute, "min": time.Minute, "minute": time.Minute,
		"h": time.Hour, "hour": time.Hour,
		"d": 24 * time.Hour, "day": 24 * time.Hour,
	} {
		r, err := parseRate([]string{"3/" + unit})
		if err != nil {
			t.Errorf("3/%s: %v", unit, err)
			continue
		}
		if *r != (Rate{Limit: 3, Window: caddy.Duration(want)}) {
			t.Errorf("3/%s: got %+v", unit, *r)
		}
	}
}

// inTier wraps tier options in a minimal valid global block; the options
// start on line 3.
func inTier(opts string) string {
	return "api_monetize {\n\ttier pro {\n" + opts + "\n\t}\n}"
}

func TestParseAppErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		line  int
		want  string
		// secret must not appear in the error.
		secret string
	}{
		{"unknown option", "api_monetize {\n\ttier free\n\tnotify_email ops@example.com\n}", 3, "unrecognized api_monetize option 'notify_email'", ""},
		{"arguments", "api_monetize foo {\n\ttier free\n}", 1, "no arguments", ""},
		{"no tier", "api_monetize {\n\tstore_timeout 1s\n}", 1, "no tier defined", ""},
		{"redis twice", "api_monetize {\n\tredis redis://a:6379\n\tredis redis://b:6379\n}", 3, "'redis' is given twice (first at Testfile:2)", ""},
		{"redis scheme", "api_monetize {\n\tredis http://a:6379\n}", 2, "expected a URL such as redis://", ""},
		{"redis hides password", "api_monetize {\n\tredis redis://u:hunter2secret@host:port/0\n}", 2, "redis://", "hunter2secret"},
		{"redis no value", "api_monetize {\n\tredis\n}", 2, "expected exactly one value", ""},
		{"store_path with redis", "api_monetize {\n\ttier free\n\tredis redis://a:6379\n\tstore_path /x.db\n}", 4, "remove one of them", ""},
		{"redis_prefix without redis", "api_monetize {\n\ttier free\n\tredis_prefix x:\n}", 3, "add 'redis <url>'", ""},
		{"redis_prefix empty", "api_monetize {\n\tredis_prefix \"\"\n}", 2, "non-empty prefix", ""},
		{"admin_api", "api_monetize {\n\tadmin_api yes\n}", 2, "read_only or read_write", ""},
		{"admin_api twice", "api_monetize {\n\tadmin_api read_only\n\tadmin_api read_write\n}", 3, "given twice", ""},
		{"rate_limit_headers", "api_monetize {\n\ttier free\n\trate_limit_headers draft\n}", 3, `expected both, ietf, legacy or none, got "draft"`, ""},
		{"rate_limit_headers twice", "api_monetize {\n\trate_limit_headers none\n\trate_limit_headers ietf\n}", 3, "given twice", ""},
		{"upgrade_url relative", "api_monetize {\n\tupgrade_url /pricing\n}", 2, "absolute URL", ""},
		{"upgrade_url scheme", "api_monetize {\n\tupgrade_url ftp://example.com/p\n}", 2, "absolute URL", ""},
		{"store_timeout", "api_monetize {\n\tstore_timeout soon\n}", 2, "positive duration", ""},
		{"store_timeout zero", "api_monetize {\n\tstore_timeout 0s\n}", 2, "positive duration", ""},
		{"key_secret short", "api_monetize {\n\tkey_secret sh0rtSecretX\n}", 2, "at least 16 characters", "sh0rtSecretX"},
		{"tier no name", "api_monetize {\n\ttier {\n\t}\n}", 2, "expected a name", ""},
		{"tier bad name", "api_monetize {\n\ttier \"pro plan\" {\n\t}\n}", 2, "may only contain", ""},
		{"tier extra", "api_monetize {\n\ttier pro plus {\n\t}\n}", 2, "unexpected 'plus'", ""},
		{"tier twice", "api_monetize {\n\ttier pro\n\ttier free\n\ttier pro\n}", 4, "tier 'pro' is defined twice (first at Testfile:2)", ""},
		{"tier unknown option", inTier("discount 10%"), 3, "unrecognized option 'discount'", ""},
		{"price comma", inTier("price 49,00/month"), 3, "use '.' for decimals", ""},
		{"price precision", inTier("price 1.2345678/month"), 3, "at most 6 decimal places", ""},
		{"price negative", inTier("price -1"), 3, "negative amounts are not allowed", ""},
		{"price week", inTier("price 49/week"), 3, "month or year", ""},
		{"price no interval", inTier("price 49"), 3, "49/month", ""},
		{"price word", inTier("price free"), 3, "decimal number", ""},
		{"price huge", inTier("price 10000000000000/month"), 3, "too large", ""},
		{"price twice", inTier("price 1/month\nprice 2/month"), 4, "'price' is given twice (first at Testfile:3)", ""},
		{"price block", inTier("price 1/month {\n}"), 3, "takes no block", ""},
		{"included no interval", inTier("included 1000"), 3, "per month", ""},
		{"included year", inTier("included 1000/year"), 3, "1000/month", ""},
		{"included negative", inTier("included -5/month"), 3, "whole number", ""},
		{"included twice", inTier("included 1/month\nincluded 2/month"), 4, "given twice", ""},
		{"rate zero", inTier("rate 0/min"), 3, "at least 1", ""},
		{"rate week", inTier("rate 10/week"), 3, "unknown window \"week\"", ""},
		{"rate no window", inTier("rate 10"), 3, "<units>/<window>", ""},
		{"rate burst zero", inTier("rate 10/min burst 0"), 3, "invalid burst \"0\": must be a whole number of at least 1", ""},
		{"rate burst plus", inTier("rate 10/min burst +5"), 3, "invalid burst \"+5\"", ""},
		{"rate burst negative", inTier("rate 10/min burst -3"), 3, "invalid burst \"-3\"", ""},
		{"rate burst missing", inTier("rate 10/min burst"), 3, "burst <units>", ""},
		{"rate other word", inTier("rate 10/min boost 5"), 3, "unexpected 'boost'", ""},
		{"rate twice", inTier("rate 10/min\nrate 20/min"), 4, "'rate' is given twice", ""},
		{"rate block", inTier("rate 10/min {\n\tburst 5\n}"), 3, "takes no block", ""},
		{"endpoints empty", inTier("endpoints"), 3, "at least one path pattern", ""},
		{"endpoints relative", inTier("endpoints /v1/* v2/*"), 3, "must start with '/'", ""},
		{"exclude relative", inTier("exclude admin"), 3, "must start with '/'", ""},
		{"support two words", inTier("support phone email"), 3, "exactly one value", ""},
		{"support twice", inTier("support email\nsupport phone"), 4, "given twice", ""},
		{"sla too high", inTier("sla 150%"), 3, "at most 100%", ""},
		{"sla zero", inTier("sla 0%"), 3, "more than 0%", ""},
		{"sla no percent", inTier("sla 99.9"), 3, "percentage", ""},
		{"sla word", inTier("sla high%"), 3, "percentage", ""},
		{"sla twice", inTier("sla 99%\nsla 98%"), 4, "given twice", ""},
		{"on_store_error", inTier("on_store_error panic"), 3, "local, allow or deny", ""},
		{"customer no id", "api_monetize {\n\tcustomer\n}", 2, "expected an id", ""},
		{"customer bad id", "api_monetize {\n\tcustomer a:b tier free\n}", 2, "may only contain", ""},
		{"customer no tier", "api_monetize {\n\ttier free\n\tcustomer acme email a@b.example\n}", 3, "missing 'tier <name>'", ""},
		{"customer unknown option", "api_monetize {\n\tcustomer acme tier free plan gold\n}", 2, "unrecognized option 'plan'", ""},
		{"customer option without value", "api_monetize {\n\tcustomer acme tier\n}", 2, "'tier' needs a value", ""},
		{"customer tier twice", "api_monetize {\n\tcustomer acme tier free tier pro\n}", 2, "'tier' is given twice", ""},
		{"customer stripe", "api_monetize {\n\tcustomer acme tier free stripe acme\n}", 2, "Stripe customer id", ""},
		{"customer email", "api_monetize {\n\tcustomer acme tier free email Acme\n}", 2, "plain address", ""},
		{"customer email with name", "api_monetize {\n\tcustomer acme tier free email \"Acme <a@b.example>\"\n}", 2, "plain address", ""},
		{"customer anchor", "api_monetize {\n\tcustomer acme tier free anchor 2026-13-01\n}", 2, "YYYY-MM-DD", ""},
		{"customer block", "api_monetize {\n\tcustomer acme tier free {\n\t}\n}", 2, "takes no block", ""},
		{"customer twice", "api_monetize {\n\ttier free\n\tcustomer acme tier free\n\tcustomer acme tier free\n}", 4, "customer 'acme' is declared twice (first at Testfile:3)", ""},
		{"customer unknown tier", "api_monetize {\n\ttier free\n\ttier pro\n\n\tcustomer acme tier gold\n}", 5, "unknown tier 'gold'; declared tiers: free, pro", ""},
		{"key one arg", "api_monetize {\n\tkey {env.K}\n}", 2, "expected 'key <key> <customer id> [expires <RFC 3339 date>]', got 1 arguments", ""},
		{"key three args", "api_monetize {\n\tkey {env.K} acme extra\n}", 2, "got 3 arguments", ""},
		{"key expires not a date", "api_monetize {\n\ttier free\n\tkey {env.K} acme expires 2027-01-31\n}", 3, `key of customer acme: expires: expected an RFC 3339 date such as 2027-01-31T00:00:00Z, got "2027-01-31"`, ""},
		{"key until", "api_monetize {\n\tkey {env.K} acme until 2027-01-31T00:00:00Z\n}", 2, "unexpected 'until'; only 'expires <RFC 3339 date>' may follow the customer id", ""},
		{"key literal short", "api_monetize {\n\tkey sh0rt-k3y acme\n}", 2, "at least 20 characters", "sh0rt-k3y"},
		{"key literal bad checksum", "api_monetize {\n\tkey am_live_0123456789abcdefghijklmnopqrstuv_ABCDEF acme\n}", 2, "valid checksum", "0123456789abcdef"},
		{"key twice", "api_monetize {\n\ttier free\n\tcustomer acme tier free\n\tkey literal-demo-key-0123456789 acme\n\tkey literal-demo-key-0123456789 acme\n}", 5, "the same key is declared twice (first at Testfile:4)", "literal-demo-key"},
		{"key undeclared customer", "api_monetize {\n\ttier free\n\tcustomer acme tier free\n\n\n\tkey {env.K} acne\n}", 6, "key for undeclared customer 'acne'", ""},
		{"currency word", "api_monetize {\n\tcurrency dollar\n}", 2, "three-letter code such as usd or eur, got 'dollar'", ""},
		{"currency symbol", "api_monetize {\n\tcurrency $\n}", 2, "three-letter code", ""},
		{"currency twice", "api_monetize {\n\tcurrency usd\n\tcurrency eur\n}", 3, "'currency' is given twice (first at Testfile:2)", ""},
		{"bill_on empty", "api_monetize {\n\tbill_on\n}", 2, "as in 'bill_on 2xx 3xx'", ""},
		{"bill_on class", "api_monetize {\n\tbill_on 2xx 6xx\n}", 2, "'6xx' is neither a status class 1xx to 5xx nor a status code 100 to 599", ""},
		{"bill_on word", "api_monetize {\n\tbill_on success\n}", 2, "'success' is neither", ""},
		{"bill_on code range", "api_monetize {\n\tbill_on 200 600\n}", 2, "'600' is neither", ""},
		{"bill_on code digits", "api_monetize {\n\tbill_on 2000\n}", 2, "'2000' is neither", ""},
		{"bill_on repeated", "api_monetize {\n\tbill_on 2xx 3xx 2XX\n}", 2, "'2xx' is listed twice", ""},
		{"bill_on covered code", "api_monetize {\n\tbill_on 404 2xx 4xx\n}", 2, "404 is already billable as part of 4xx", ""},
		{"bill_on twice", "api_monetize {\n\tbill_on 2xx\n\tbill_on 3xx\n}", 3, "'bill_on' is given twice (first at Testfile:2)", ""},
		{"bill_on block", "api_monetize {\n\tbill_on 2xx {\n\t}\n}", 2, "takes no block", ""},
		{"usage_cost_header missing", "api_monetize {\n\tusage_cost_header\n}", 2, "'<Header-Name> [max <units>]'", ""},
		{"usage_cost_header underscore", "api_monetize {\n\tusage_cost_header X_Usage_Cost\n}", 2, "use a hyphen instead, e.g. X-Usage-Cost", ""},
		{"usage_cost_header dot", "api_monetize {\n\tusage_cost_header X.Usage.Cost\n}", 2, "use a hyphen instead, e.g. X-Usage-Cost", ""},
		{"usage_cost_header invalid", "api_monetize {\n\tusage_cost_header \"X Cost\"\n}", 2, "not a valid header name", ""},
		{"usage_cost_header max zero", "api_monetize {\n\tusage_cost_header X-Cost max 0\n}", 2, "max must be a whole number of units ≥ 1, got '0'", ""},
		{"usage_cost_header max fraction", "api_monetize {\n\tusage_cost_header X-Cost max 1.5\n}", 2, "got '1.5'", ""},
		{"usage_cost_header max missing", "api_monetize {\n\tusage_cost_header X-Cost max\n}", 2, "'<Header-Name> [max <units>]'", ""},
		{"usage_cost_header other word", "api_monetize {\n\tusage_cost_header X-Cost limit 5\n}", 2, "unexpected 'limit'", ""},
		{"usage_cost_header twice", "api_monetize {\n\tusage_cost_header X-Cost\n\tusage_cost_header X-Units\n}", 3, "given twice", ""},
		{"thresholds empty", "api_monetize {\n\tthresholds\n}", 2, "80 100 120, or off", ""},
		{"thresholds descending", "api_monetize {\n\tthresholds 100 80 120\n}", 2, "ascending order, as in 'thresholds 80 100 120'", ""},
		{"thresholds repeated", "api_monetize {\n\tthresholds 80 100 80%\n}", 2, "80% is listed twice", ""},
		{"thresholds zero", "api_monetize {\n\tthresholds 0 100\n}", 2, "from 1 to 1000", ""},
		{"thresholds fraction", "api_monetize {\n\tthresholds 80 99.5\n}", 2, "from 1 to 1000", ""},
		{"thresholds too high", "api_monetize {\n\tthresholds 1001\n}", 2, "from 1 to 1000", ""},
		{"thresholds off with values", "api_monetize {\n\tthresholds off 80\n}", 2, "off stands alone", ""},
		{"thresholds twice", "api_monetize {\n\tthresholds 80\n\tthresholds 90\n}", 3, "given twice", ""},
		{"over_quota empty", inTier("included 1/month\nover_quota"), 4, "tier pro: over_quota: want block", ""},
		{"over_quota mode", inTier("included 1/month\nover_quota charge 1"), 4, "unknown mode \"charge\"", ""},
		{"over_quota block price", inTier("included 1/month\nover_quota block 0.002"), 4, "unexpected \"0.002\"", ""},
		{"over_quota bill no price", inTier("included 1/month\nover_quota bill"), 4, "missing price per unit", ""},
		{"over_quota bill comma", inTier("included 1/month\nover_quota bill 0,002"), 4, "use '.' for decimals", ""},
		{"over_quota bill precision", inTier("included 1/month\nover_quota bill 0.0000001"), 4, "at most 6 decimal places", ""},
		{"over_quota bill negative", inTier("included 1/month\nover_quota bill -0.002"), 4, "negative", ""},
		{"over_quota bill exponent", inTier("included 1/month\nover_quota bill 2e-3"), 4, "without an exponent", ""},
		{"over_quota bill huge", inTier("included 1/month\nover_quota bill 9223372036855"), 4, "too large", ""},
		{"over_quota throttle no rate", inTier("included 1/month\nover_quota throttle"), 4, "missing rate", ""},
		{"over_quota throttle window", inTier("included 1/month\nover_quota throttle 50/week"), 4, "unknown window \"week\"", ""},
		{"over_quota throttle zero", inTier("included 1/month\nover_quota throttle 0/min"), 4, "at least 1 unit per window", ""},
		{"over_quota throttle no window", inTier("included 1/month\nover_quota throttle 50"), 4, "invalid rate \"50\"", ""},
		{"over_quota throttle burst", inTier("included 1/month\nover_quota throttle 50/min burst 0"), 4, "invalid burst \"0\"", ""},
		{"over_quota throttle bill price", inTier("included 1/month\nover_quota throttle 50/min bill"), 4, "missing price per unit after bill", ""},
		{"over_quota throttle bill comma", inTier("included 1/month\nover_quota throttle 50/min bill 0,001"), 4, "use '.' for decimals", ""},
		{"over_quota throttle huge", inTier("included 1/month\nover_quota throttle 9223372036854775807/s"), 4, "too large to enforce", ""},
		{"over_quota throttle extra", inTier("included 1/month\nover_quota throttle 50/min bill 0.001 now"), 4, "unexpected \"now\"", ""},
		{"over_quota throttle not slower", inTier("included 1/month\nover_quota throttle 2/s\nrate 100/min"), 4, "over_quota throttle 2/sec is not slower than the tier's rate 100/min", ""},
		{"over_quota throttle same rate", inTier("rate 60/min\nincluded 1/month\nover_quota throttle 1/s"), 5, "not slower", ""},
		{"over_quota without included", inTier("over_quota bill 0.002\nrate 10/min"), 3, "tier pro: over_quota needs included, as in 'included 1000/month'", ""},
		{"over_quota twice", inTier("included 1/month\nover_quota block\nover_quota bill 1"), 5, "'over_quota' is given twice (first at Testfile:4)", ""},
		{"over_quota block", inTier("included 1/month\nover_quota block {\n}"), 4, "takes no block", ""},
		{"period empty", inTier("period"), 3, "want calendar [zone] or anniversary", ""},
		{"period kind", inTier("period monthly"), 3, "unknown kind \"monthly\"", ""},
		{"period unknown zone", inTier("period calendar Mars/Olympus_Mons"), 3, "unknown time zone \"Mars/Olympus_Mons\"", ""},
		{"period local zone", inTier("period calendar Local"), 3, "not allowed", ""},
		{"period two zones", inTier("period calendar UTC Europe/Berlin"), 3, "at most one time zone", ""},
		{"period anniversary zone", inTier("period anniversary Europe/Berlin"), 3, "take no zone", ""},
		{"period twice", inTier("period anniversary\nperiod calendar"), 4, "'period' is given twice", ""},
		{"tier thresholds descending", inTier("included 1/month\nthresholds 90 50"), 4, "tier pro: thresholds: write the percentages in ascending order, as in 'thresholds 50 90'", ""},
		{"tier thresholds repeated", inTier("included 1/month\nthresholds 50 50"), 4, "listed twice", ""},
		{"tier thresholds without included", inTier("thresholds 50"), 3, "tier pro: thresholds needs included", ""},
		{"tier thresholds twice", inTier("included 1/month\nthresholds 50\nthresholds off"), 5, "'thresholds' is given twice", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseApp(caddyfile.NewTestDispenser(tc.input), nil)
			checkErr(t, err, tc.line, tc.want, tc.secret)
		})
	}
}

// checkErr asserts err names Testfile:line, contains want, and does not
// contain secret.
func checkErr(t *testing.T, err error, line int, want, secret string) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error; want one containing %q", want)
	}
	msg := err.Error()
	if loc := fmt.Sprintf("at Testfile:%d", line); !strings.HasSuffix(msg, loc) {
		t.Errorf("error %q does not end with %q", msg, loc)
	}
	if !strings.Contains(msg, want) {
		t.Errorf("error %q does not contain %q", msg, want)
	}
	if secret != "" && strings.Contains(msg, secret) {
		t.Errorf("error %q leaks %q", msg, secret)
	}
}

func TestParseHandler(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  *Handler
	}{
		{"bare", "api_monetize", &Handler{}},
		{"empty block", "api_monetize {\n}", &Handler{}},
		{"acceptance", "api_monetize {\n\tcost /v1/ml/* 10\n\tcost /v1/health 0\n}", &Handler{
			Costs: []Cost{{Path: "/v1/ml/*", Units: 10}, {Path: "/v1/health", Units: 0}},
		}},
		{"key sources in order", `api_monetize {
			key_from query api_key
			cost * 2
			key_from bearer
			key_from header Api-Key
		}`, &Handler{
			Costs:   []Cost{{Path: "*", Units: 2}},
			KeyFrom: []KeySource{{Query: "api_key"}, {Bearer: true}, {Header: "Api-Key"}},
		}},
		{"forward_key", "api_monetize {\n\tforward_key\n}", &Handler{ForwardKey: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := new(Handler)
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatal(err)
			}
			if g, w := mustJSON(t, got), mustJSON(t, tc.want); g != w {
				t.Errorf("got %s, want %s", g, w)
			}
		})
	}
}

func TestParseHandlerErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		line  int
		want  string
	}{
		{"argument", "api_monetize strict", 1, "unexpected argument 'strict'"},
		{"unknown option", "api_monetize {\n\tcost /a 1\n\tprice 5\n}", 3, "unrecognized option 'price'"},
		{"cost one arg", "api_monetize {\n\tcost 10\n}", 2, "cost <path pattern> <units>"},
		{"cost negative", "api_monetize {\n\tcost /a -1\n}", 2, "whole number ≥ 0"},
		{"cost fraction", "api_monetize {\n\tcost /a 1.5\n}", 2, "whole number ≥ 0"},
		{"cost relative", "api_monetize {\n\tcost v1/* 2\n}", 2, "must start with '/'"},
		{"cost twice", "api_monetize {\n\tcost /a 1\n\tcost /a 2\n}", 3, "given twice (first at Testfile:2)"},
		{"cost block", "api_monetize {\n\tcost /a 1 {\n\t}\n}", 2, "takes no block"},
		{"header underscore", "api_monetize {\n\tkey_from header X_API_KEY\n}", 2, "use a hyphen instead, e.g. X-API-KEY"},
		{"header dot", "api_monetize {\n\tkey_from header X.Api.Key\n}", 2, "contains '.' before any handler sees them; use a hyphen instead, e.g. X-Api-Key"},
		{"header invalid", "api_monetize {\n\tkey_from header \"X API\"\n}", 2, "not a valid header name"},
		{"header missing", "api_monetize {\n\tkey_from header\n}", 2, "header <Name>"},
		{"query missing", "api_monetize {\n\tkey_from query\n}", 2, "query <param>"},
		{"bearer extra", "api_monetize {\n\tkey_from bearer token\n}", 2, "'bearer'"},
		{"unknown source", "api_monetize {\n\tkey_from cookie k\n}", 2, "got 'cookie'"},
		{"no source", "api_monetize {\n\tkey_from\n}", 2, "expected 'header <Name>'"},
		{"source twice", "api_monetize {\n\tkey_from bearer\n\tkey_from header X-Key\n\tkey_from bearer\n}", 4, "given twice (first at Testfile:2)"},
		{"forward_key argument", "api_monetize {\n\tforward_key yes\n}", 2, "forward_key: takes no argument, got 'yes'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)), tc.line, tc.want, "")
		})
	}
}

func TestParseUsageHandler(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  *UsageHandler
	}{
		{"bare", "api_monetize_usage", &UsageHandler{}},
		{"key sources in order", "api_monetize_usage {\n\tkey_from header Api-Key\n\tkey_from bearer\n}", &UsageHandler{
			KeyFrom: []KeySource{{Header: "Api-Key"}, {Bearer: true}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := new(UsageHandler)
			if err := got.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatal(err)
			}
			if g, w := mustJSON(t, got), mustJSON(t, tc.want); g != w {
				t.Errorf("got %s, want %s", g, w)
			}
		})
	}
}

func TestParseUsageHandlerErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		line  int
		want  string
	}{
		{"argument", "api_monetize_usage json", 1, "unexpected argument 'json'"},
		{"cost", "api_monetize_usage {\n\tcost * 1\n}", 2, "unrecognized option 'cost'; expected key_from"},
		{"header underscore", "api_monetize_usage {\n\tkey_from header X_API_KEY\n}", 2, "use a hyphen instead, e.g. X-API-KEY"},
		{"source twice", "api_monetize_usage {\n\tkey_from query k\n\tkey_from query k\n}", 3, "given twice (first at Testfile:2)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkErr(t, new(UsageHandler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)), tc.line, tc.want, "")
		})
	}
}

// TestCaddyfileAdapt runs the golden files in testdata/caddyfile_adapt, in
// the format of Caddy's own suite: a Caddyfile, a line of ten dashes, then
// either the expected JSON or a substring of the expected error.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, expected, ok := strings.Cut(string(data), "----------")
			if !ok {
				t.Fatal("no ---------- separator")
			}
			input, expected = strings.TrimSpace(input)+"\n", strings.TrimSpace(expected)
			if strings.HasPrefix(expected, "{") {
				if !caddytest.CompareAdapt(t, file, input, "caddyfile", expected) {
					t.Error("adapted JSON differs from the expected JSON")
				}
				return
			}
			_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
			if err == nil || !strings.Contains(err.Error(), expected) {
				t.Errorf("got error %v, want one containing %q", err, expected)
			}
		})
	}
}

// TestExamples keeps the shipped example Caddyfiles adapting, without
// warnings (so they are `caddy fmt`-clean), to the reviewed JSON.
func TestExamples(t *testing.T) {
	for _, name := range []string{"quickstart", "redis"} {
		t.Run(name, func(t *testing.T) {
			input, err := os.ReadFile(filepath.Join("..", "caddyfile-examples", name, "Caddyfile"))
			if err != nil {
				t.Fatal(err)
			}
			expected, err := os.ReadFile(filepath.Join("testdata", "caddyfile_adapt", "example_"+name+".json"))
			if err != nil {
				t.Fatal(err)
			}
			_, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, nil)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range warnings {
				t.Errorf("warning: %s:%d: %s", w.File, w.Line, w.Message)
			}
			if !caddytest.CompareAdapt(t, name, string(input), "caddyfile", strings.TrimSpace(string(expected))) {
				t.Error("adapted JSON differs from the expected JSON")
			}
		})
	}
}
