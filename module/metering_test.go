package module

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// meterUpstream is a test upstream: /status/<code> answers that status,
// /cost/<n> reports a usage cost of n, /hang waits until the client is
// gone.
func meterUpstream(t *testing.T) *httptest.Server {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1/status/"):
			code, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/v1/status/"))
			w.WriteHeader(code)
		case strings.HasPrefix(r.URL.Path, "/v1/cost/"):
			w.Header().Set("X-Usage-Cost", strings.TrimPrefix(r.URL.Path, "/v1/cost/"))
			fmt.Fprint(w, "costed")
		case r.URL.Path == "/v1/hang":
			<-r.Context().Done()
		default:
			fmt.Fprint(w, "ok")
		}
	}))
	t.Cleanup(up.Close)
	return up
}

// meterConfig is a Caddyfile with quota tiers in front of upstream.
func meterConfig(storeLine, upstream string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		%s
		key_secret test-secret-0123456789
		# Behaviour tests: a loaded machine must not turn a slow Redis call
		# into a degraded decision.
		store_timeout 2s
		usage_cost_header X-Usage-Cost max 50
		tier blocked {
			included 5/month
			over_quota block
		}
		tier billed {
			included 10/month
			over_quota bill 0.002
		}
		tier throttled {
			included 2/month
			rate 100/min
			over_quota throttle 2/hour burst 4
		}
		customer b1 tier blocked
		customer p1 tier billed
		customer t1 tier throttled
		key blocked-key-0123456789abc b1
		key billed-key-0123456789abcd p1
		key throttled-key-0123456789a t1
	}
}

:%d {
	handle /v1/usage {
		api_monetize_usage
	}
	handle {
		api_monetize {
			cost /v1/nine 9
		}
		reverse_proxy %s
	}
}
`, testAdminPort, testHTTPPort, storeLine, testHTTPPort, strings.TrimPrefix(upstream, "http://"))
}

const (
	blockedKey   = "blocked-key-0123456789abc"
	billedKey    = "billed-key-0123456789abcd"
	throttledKey = "throttled-key-0123456789a"
)

// usageOf reads a customer's usage through the admin API.
func usageOf(t *testing.T, customer string) usageView {
	t.Helper()
	r := admin(t, http.MethodGet, "/api_monetize/customers/"+customer+"/usage", "")
	if r.status != http.StatusOK {
		t.Fatalf("usage of %s: %d %s", customer, r.status, r.body)
	}
	var v usageView
	if err := json.Unmarshal([]byte(r.body), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

func TestMetering(t *testing.T) {
	forEachStore(t, func(t *testing.T, cfg testConfig) {
		up := meterUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(meterConfig(cfg.storeLine, up.URL), "caddyfile")

		t.Run("BlockQuota", func(t *testing.T) {
			for i := range 5 {
				if r := call(t, "/v1/x", blockedKey); r.status != http.StatusOK {
					t.Fatalf("call %d: %d %s", i+1, r.status, r.body)
				}
			}
			r := call(t, "/v1/x", blockedKey)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("6th call: %d", r.status)
			}
			p := r.problem(t)
			if p["type"] != problemQuotaExceeded || fmt.Sprint(p["violated-policies"]) != "[blocked-month]" {
				t.Errorf("quota problem: %s", r.body)
			}
			if ra := headerInt(t, r, "Retry-After"); ra < 1 || ra > 31*24*3600 {
				t.Errorf("Retry-After %d is not the time to the period's end", ra)
			}
			if !strings.Contains(r.header.Get("RateLimit"), `"blocked-month";r=0;t=`) {
				t.Errorf("RateLimit = %q", r.header.Get("RateLimit"))
			}
			if u := usageOf(t, "b1"); u.Billed != 5 || u.Requests != 5 || u.Overage != 0 {
				t.Errorf("usage after the block: %+v", u.PeriodUsage)
			}
		})

		t.Run("BillOverage", func(t *testing.T) {
			for range 8 {
				if r := call(t, "/v1/x", billedKey); r.status != http.StatusOK {
					t.Fatalf("%d %s", r.status, r.body)
				}
			}
			// 8 used; a request costing 9 straddles the quota: 2 included, 7 overage.
			r := call(t, "/v1/nine", billedKey)
			if r.status != http.StatusOK {
				t.Fatalf("%d", r.status)
			}
			u := usageOf(t, "p1")
			if u.Billed != 17 || u.Overage != 7 || u.Requests != 9 || u.OverageCharge != "0.014" || u.Currency != "usd" {
				t.Errorf("usage: %+v charge %q %q", u.PeriodUsage, u.OverageCharge, u.Currency)
			}
			if *u.Remaining != 0 || len(u.Hours) != 1 || u.Hours[0].Billed != 17 {
				t.Errorf("remaining %d hours %+v", *u.Remaining, u.Hours)
			}
			// Thresholds 80, 100 and 120 were each crossed once.
			ev := admin(t, http.MethodGet, "/api_monetize/customers/p1/thresholds", "")
			var events []struct {
				Threshold int `json:"threshold"`
			}
			if err := json.Unmarshal([]byte(ev.body), &events); err != nil || len(events) != 3 ||
				events[0].Threshold != 80 || events[1].Threshold != 100 || events[2].Threshold != 120 {
				t.Errorf("threshold events: %s", ev.body)
			}
		})

		t.Run("OnlyBillableResponsesCount", func(t *testing.T) {
			before := usageOf(t, "p1")
			for _, path := range []string{"/v1/status/500", "/v1/status/404", "/v1/status/503"} {
				if r := call(t, path, billedKey); r.status < 400 {
					t.Fatalf("%s: %d", path, r.status)
				}
			}
			if r := call(t, "/v1/status/302", billedKey); r.status != http.StatusFound {
				t.Fatalf("302: %d", r.status)
			}
			after := usageOf(t, "p1")
			if after.Billed != before.Billed+1 || after.Requests != before.Requests+1 {
				t.Errorf("after 500/404/503/302: billed %d -> %d, requests %d -> %d (only the 302 counts)",
					before.Billed, after.Billed, before.Requests, after.Requests)
			}
		})

		t.Run("ClientAbortNotBilled", func(t *testing.T) {
			before := usageOf(t, "p1")
			client := &http.Client{Timeout: 300 * time.Millisecond}
			req, _ := http.NewRequest(http.MethodGet, testBase+"/v1/hang", nil)
			req.Header.Set("X-API-Key", billedKey)
			if res, err := client.Do(req); err == nil {
				res.Body.Close()
				t.Fatalf("hang answered %d", res.StatusCode)
			}
			// The release happens when the proxy notices the client left.
			deadline := time.Now().Add(5 * time.Second)
			for {
				u := usageOf(t, "p1")
				if u.Billed == before.Billed && u.Requests == before.Requests {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("aborted request still billed: %+v -> %+v", before.PeriodUsage, u.PeriodUsage)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})

		t.Run("UsageCostHeader", func(t *testing.T) {
			before := usageOf(t, "p1")
			r := call(t, "/v1/cost/7", billedKey)
			if r.status != http.StatusOK || r.header.Get("X-Usage-Cost") != "" {
				t.Fatalf("%d, X-Usage-Cost leaked: %q", r.status, r.header.Get("X-Usage-Cost"))
			}
			r = call(t, "/v1/cost/5000", billedKey) // capped at max 50
			if r.status != http.StatusOK {
				t.Fatalf("%d", r.status)
			}
			if after := usageOf(t, "p1"); after.Billed != before.Billed+7+50 || after.Requests != before.Requests+2 {
				t.Errorf("reported costs: billed %d -> %d", before.Billed, after.Billed)
			}
		})

		t.Run("IdempotencyKey", func(t *testing.T) {
			before := usageOf(t, "p1")
			h := http.Header{"X-Api-Key": {billedKey}, "Idempotency-Key": {"order-42"}}
			for range 3 {
				if r := do(t, http.MethodPost, testBase+"/v1/orders", h, "{}"); r.status != http.StatusOK {
					t.Fatalf("%d", r.status)
				}
			}
			if after := usageOf(t, "p1"); after.Billed != before.Billed+1 || after.Requests != before.Requests+1 {
				t.Errorf("three retries with one Idempotency-Key: billed %d -> %d", before.Billed, after.Billed)
			}
		})

		t.Run("ThrottleAfterQuota", func(t *testing.T) {
			for range 2 {
				if r := call(t, "/v1/x", throttledKey); r.status != http.StatusOK {
					t.Fatalf("%d", r.status)
				}
			}
			// Beyond the quota: 2/hour, burst 4. The 2 units owed under
			// the tier's rate carry over, so 2 more fit.
			for i := range 2 {
				r := call(t, "/v1/x", throttledKey)
				if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("RateLimit-Policy"), `"throttled-throttle-hour";q=2;w=3600;am-burst=4`) {
					t.Fatalf("throttled call %d: %d %q", i, r.status, r.header.Get("RateLimit-Policy"))
				}
			}
			if r := call(t, "/v1/x", throttledKey); r.status != http.StatusTooManyRequests {
				t.Fatalf("over the throttle: %d", r.status)
			}
			if u := usageOf(t, "t1"); u.Billed != 4 || u.Overage != 2 {
				t.Errorf("throttled usage %+v", u.PeriodUsage)
			}
		})

		t.Run("CallerReadsOwnUsage", func(t *testing.T) {
			r := call(t, "/v1/usage", blockedKey)
			if r.status != http.StatusOK {
				t.Fatalf("%d %s", r.status, r.body)
			}
			var v usageView
			if err := json.Unmarshal([]byte(r.body), &v); err != nil || v.Customer != "b1" || v.Billed != 5 || *v.Included != 5 {
				t.Errorf("own usage: %v %s", err, r.body)
			}
			if r := call(t, "/v1/usage", ""); r.status != http.StatusUnauthorized {
				t.Errorf("usage without a key: %d", r.status)
			}
		})
	})
}
