package module

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// sendRepeated sends n requests with the same Idempotency-Key and returns
// how many were answered 200 and how many 429; any other status fails.
func sendRepeated(t *testing.T, n int, method, path, key, idemKey string) (ok, limited int) {
	t.Helper()
	h := http.Header{"X-Api-Key": {key}, "Idempotency-Key": {idemKey}}
	for i := range n {
		r := do(t, method, testBase+path, h, "")
		switch r.status {
		case http.StatusOK:
			ok++
		case http.StatusTooManyRequests:
			limited++
		default:
			t.Fatalf("request %d: %d %s", i+1, r.status, r.body)
		}
	}
	return ok, limited
}

// unbilledRepeats is how many of admitted requests with one key are not
// billed again under the default limit of 3 repeats: the first is billed.
func unbilledRepeats(admitted int64) int64 { return min(max(admitted-1, 0), 3) }

// TestIdempotencyKeyAbuse: a client repeating one Idempotency-Key is rate
// limited, quota-checked and billed like any caller; only a bounded number
// of repeats of the same request go unbilled.
func TestIdempotencyKeyAbuse(t *testing.T) {
	forEachStore(t, func(t *testing.T, cfg testConfig) {
		newTester(t, cfg)

		// The customers' rates are spent last.
		t.Run("OtherRequestBilled", func(t *testing.T) {
			before := usageOf(t, "bigco")
			h := http.Header{"X-Api-Key": {entKey}, "Idempotency-Key": {"order-7"}}
			steps := []struct {
				method, path string
				billed       int64
			}{
				{http.MethodPost, "/v1/orders", 1},
				{http.MethodPost, "/v1/orders", 0}, // a repeat
				{http.MethodPut, "/v1/orders", 1},  // another method
				{http.MethodPost, "/v1/orders?id=2", 1},
				{http.MethodPost, "/v1/refunds", 1},
				{http.MethodPost, "/v1/ml/orders", 10}, // another cost
				{http.MethodPost, "/v1/orders", 0},     // the first request again
			}
			billed := before.Billed
			for _, s := range steps {
				if r := do(t, s.method, testBase+s.path, h, "{}"); r.status != http.StatusOK {
					t.Fatalf("%s %s: %d", s.method, s.path, r.status)
				}
				billed += s.billed
				if u := usageOf(t, "bigco"); u.Billed != billed {
					t.Fatalf("after %s %s with key order-7: billed %d, want %d", s.method, s.path, u.Billed, billed)
				}
			}
			// Another customer's use of the same key is its own.
			hh := http.Header{"X-Api-Key": {proKey}, "Idempotency-Key": {"order-7"}}
			acme := usageOf(t, "acme")
			if r := do(t, http.MethodPost, testBase+"/v1/orders", hh, "{}"); r.status != http.StatusOK {
				t.Fatal(r.status)
			}
			if u := usageOf(t, "acme"); u.Billed != acme.Billed+1 {
				t.Errorf("another customer's request with key order-7: billed %d -> %d", acme.Billed, u.Billed)
			}
		})

		t.Run("RepeatsBounded", func(t *testing.T) {
			before := usageOf(t, "bigco")
			ok, _ := sendRepeated(t, 8, http.MethodPost, "/v1/pay", entKey, "pay-1")
			if ok != 8 {
				t.Fatalf("%d of 8 admitted", ok)
			}
			// The first is billed, 3 repeats are not, the other 4 are.
			if u := usageOf(t, "bigco"); u.Billed != before.Billed+5 || u.Requests != before.Requests+5 {
				t.Errorf("8 requests with one key: billed %d -> %d, requests %d -> %d; want +5",
					before.Billed, u.Billed, before.Requests, u.Requests)
			}
		})

		t.Run("RepeatRateHeaders", func(t *testing.T) {
			h := http.Header{"X-Api-Key": {entKey}, "Idempotency-Key": {"pay-1"}}
			r := do(t, http.MethodPost, testBase+"/v1/pay", h, "")
			if r.status != http.StatusOK || !strings.Contains(r.header.Get("RateLimit"), `"enterprise-min";r=`) {
				t.Errorf("a repeat's rate state: %d RateLimit %q", r.status, r.header.Get("RateLimit"))
			}
		})
		t.Run("RateLimitStillApplies", func(t *testing.T) {
			// free: 10/min. One key on every request must not lift it.
			ok, limited := sendRepeated(t, 50, http.MethodGet, "/v1/basic/x", freeKey, "same-key")
			if ok > 11 || limited < 39 {
				t.Fatalf("50 requests with one Idempotency-Key at 10/min: %d admitted, %d limited", ok, limited)
			}
			u := usageOf(t, "hobbyist")
			if want := int64(ok) - unbilledRepeats(int64(ok)); u.Billed != want || u.Requests != want {
				t.Errorf("%d admitted: billed %d units in %d requests, want %d", ok, u.Billed, u.Requests, want)
			}
		})

		t.Run("CostlyEndpoint", func(t *testing.T) {
			// pro: 100/min, /v1/ml/* costs 10: ten fit.
			before := usageOf(t, "acme")
			ok, limited := sendRepeated(t, 150, http.MethodGet, "/v1/ml/x", proKey, "ml-key")
			if ok > 11 || limited < 139 {
				t.Fatalf("150 cost-10 requests with one key at 100/min: %d admitted, %d limited", ok, limited)
			}
			u := usageOf(t, "acme")
			if want := before.Billed + 10*(int64(ok)-unbilledRepeats(int64(ok))); u.Billed != want {
				t.Errorf("%d admitted: billed %d units, want %d", ok, u.Billed, want)
			}
		})

		t.Run("EndpointsStillApply", func(t *testing.T) {
			h := http.Header{"X-Api-Key": {freeKey}, "Idempotency-Key": {"same-key"}}
			if r := do(t, http.MethodGet, testBase+"/v1/admin/x", h, ""); r.status != http.StatusForbidden {
				t.Errorf("free tier on /v1/admin/x with an Idempotency-Key: %d", r.status)
			}
		})

	})
}

// TestIdempotencyKeyBlockQuota: once a block quota is used up, a repeat of
// the request that used it up is refused like any request.
func TestIdempotencyKeyBlockQuota(t *testing.T) {
	forEachStore(t, func(t *testing.T, cfg testConfig) {
		up := meterUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(meterConfig(cfg.storeLine, up.URL), "caddyfile")
		for i := range 4 {
			if r := call(t, "/v1/x", blockedKey); r.status != http.StatusOK {
				t.Fatalf("call %d: %d", i+1, r.status)
			}
		}
		h := http.Header{"X-Api-Key": {blockedKey}, "Idempotency-Key": {"last-one"}}
		if r := do(t, http.MethodGet, testBase+"/v1/x", h, ""); r.status != http.StatusOK {
			t.Fatalf("5th call: %d", r.status)
		}
		if r := call(t, "/v1/x", blockedKey); r.status != http.StatusTooManyRequests {
			t.Fatalf("6th call without a key: %d", r.status)
		}
		for range 3 {
			if r := do(t, http.MethodGet, testBase+"/v1/x", h, ""); r.status != http.StatusTooManyRequests {
				t.Fatalf("a repeat of the 5th call beyond the block quota: %d %s", r.status, r.body)
			}
		}
		if u := usageOf(t, "b1"); u.Billed != 5 || u.Requests != 5 {
			t.Errorf("usage %+v", u.PeriodUsage)
		}
	})
}

// TestIdempotencyConfig: idempotency off bills every repeat; max_repeats
// bounds the unbilled ones.
func TestIdempotencyConfig(t *testing.T) {
	for _, c := range []struct {
		name, extra string
		billed      int64 // of 4 identical requests
	}{
		{"Off", "idempotency off", 4},
		{"MaxRepeats1", "idempotency {\n\t\t\tmax_repeats 1\n\t\t\twindow 1h\n\t\t}", 3},
		{"Default", "", 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			forEachStore(t, func(t *testing.T, cfg testConfig) {
				cfg.extra = c.extra
				newTester(t, cfg)
				before := usageOf(t, "bigco")
				if ok, _ := sendRepeated(t, 4, http.MethodPost, "/v1/orders", entKey, "k"); ok != 4 {
					t.Fatalf("%d of 4 admitted", ok)
				}
				if u := usageOf(t, "bigco"); u.Billed != before.Billed+c.billed {
					t.Errorf("4 identical requests: billed %d -> %d, want +%d", before.Billed, u.Billed, c.billed)
				}
			})
		})
	}
}

func TestParseIdempotency(t *testing.T) {
	for _, tc := range []struct {
		body string
		want *IdempotencyConfig
	}{
		{"idempotency off", &IdempotencyConfig{Off: true}},
		{"idempotency {\n\t\twindow 1h\n\t\tmax_repeats 5\n\t}", &IdempotencyConfig{Window: caddy.Duration(time.Hour), MaxRepeats: 5}},
		{"idempotency {\n\t\tmax_repeats 1\n\t}", &IdempotencyConfig{MaxRepeats: 1}},
	} {
		v, err := parseApp(caddyfile.NewTestDispenser("api_monetize {\n\ttier free\n\t"+tc.body+"\n}"), nil)
		if err != nil {
			t.Fatalf("%q: %v", tc.body, err)
		}
		var app App
		if err := json.Unmarshal(v.(httpcaddyfile.App).Value, &app); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(app.Idempotency, tc.want) {
			t.Errorf("%q: %+v, want %+v", tc.body, app.Idempotency, tc.want)
		}
	}
}

func TestParseIdempotencyErrors(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		line        int
		want        string
	}{
		{"no value", "api_monetize {\n\tidempotency\n}", 2, "expected 'idempotency off' or a block"},
		{"empty block", "api_monetize {\n\tidempotency {\n\t}\n}", 3, "expected 'idempotency off' or a block"},
		{"on", "api_monetize {\n\tidempotency on\n}", 2, "expected 'idempotency off' or a block with 'window <duration>' and 'max_repeats <n>', got 'on'"},
		{"off with block", "api_monetize {\n\tidempotency off {\n\t\twindow 1h\n\t}\n}", 2, "takes no block"},
		{"window", "api_monetize {\n\tidempotency {\n\t\twindow soon\n\t}\n}", 3, "window: expected a duration between 1s and 720h such as 24h, got 'soon'"},
		{"window zero", "api_monetize {\n\tidempotency {\n\t\twindow 0s\n\t}\n}", 3, "between 1s and 720h"},
		{"window long", "api_monetize {\n\tidempotency {\n\t\twindow 31d\n\t}\n}", 3, "between 1s and 720h"},
		{"max_repeats zero", "api_monetize {\n\tidempotency {\n\t\tmax_repeats 0\n\t}\n}", 3, "max_repeats: expected a whole number between 1 and 100, got '0'"},
		{"max_repeats big", "api_monetize {\n\tidempotency {\n\t\tmax_repeats 101\n\t}\n}", 3, "between 1 and 100"},
		{"unknown", "api_monetize {\n\tidempotency {\n\t\tttl 1h\n\t}\n}", 3, "unrecognized option 'ttl'; expected window or max_repeats"},
		{"twice", "api_monetize {\n\tidempotency off\n\tidempotency off\n}", 3, "'idempotency' is given twice"},
		{"window twice", "api_monetize {\n\tidempotency {\n\t\twindow 1h\n\t\twindow 2h\n\t}\n}", 4, "'window' is given twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseApp(caddyfile.NewTestDispenser(tc.input), nil)
			checkErr(t, err, tc.line, tc.want, "")
		})
	}
}

// TestCompileIdempotency: JSON configuration gets the Caddyfile's rules.
func TestCompileIdempotency(t *testing.T) {
	for _, c := range []*IdempotencyConfig{
		{Off: true, MaxRepeats: 2},
		{Off: true, Window: caddy.Duration(time.Hour)},
		{MaxRepeats: -1},
		{MaxRepeats: 101},
		{Window: caddy.Duration(time.Millisecond)},
		{Window: caddy.Duration(-time.Hour)},
		{Window: caddy.Duration(31 * 24 * time.Hour)},
	} {
		if _, err := compileIdempotency(c); err == nil {
			t.Errorf("%+v accepted", *c)
		}
	}
	got, err := compileIdempotency(nil)
	if err != nil || got != (idempotency{repeats: 3, window: 24 * time.Hour}) {
		t.Errorf("defaults: %+v, %v", got, err)
	}
	if got, err := compileIdempotency(&IdempotencyConfig{Off: true}); err != nil || got.repeats != 0 {
		t.Errorf("off: %+v, %v", got, err)
	}
}

// TestRequestFingerprint: the fingerprint separates method, path, query
// and cost, and nothing else (headers, body).
func TestRequestFingerprint(t *testing.T) {
	fp := func(method, target string, cost int64) string {
		return requestFingerprint(httptest.NewRequest(method, target, nil), cost)
	}
	base := fp("POST", "/v1/orders?a=1", 1)
	for _, other := range []string{fp("PUT", "/v1/orders?a=1", 1), fp("POST", "/v1/order?a=1", 1), fp("POST", "/v1/orders?a=2", 1),
		fp("POST", "/v1/orders", 1), fp("POST", "/v1/orders?a=1", 2), fp("POST", "/v1/orders%3Fa=1", 1)} {
		if other == base {
			t.Errorf("two different requests share the fingerprint %s", base)
		}
	}
	r := httptest.NewRequest("POST", "/v1/orders?a=1", strings.NewReader("body"))
	r.Header.Set("X-Other", "1")
	if requestFingerprint(r, 1) != base || len(base) > store.MaxIdempotencyFingerprintLen {
		t.Errorf("fingerprint %q depends on headers or body, or is too long", base)
	}
}
