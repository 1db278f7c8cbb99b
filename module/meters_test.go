package module

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// tokensUpstream is a test upstream that reports X-Tokens-Used: /v1/tok/<v>
// reports v (as written) and answers "tok"; /v1/fail/<v> reports v on a
// 500; /v1/bytes/<n> answers n bytes; /v1/upload reads the body and
// answers its length.
func tokensUpstream(t testing.TB) *httptest.Server {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1/tok/"):
			w.Header().Set("X-Tokens-Used", strings.TrimPrefix(r.URL.Path, "/v1/tok/"))
			fmt.Fprint(w, "tok")
		case strings.HasPrefix(r.URL.Path, "/v1/fail/"):
			w.Header().Set("X-Tokens-Used", strings.TrimPrefix(r.URL.Path, "/v1/fail/"))
			w.WriteHeader(http.StatusInternalServerError)
		case strings.HasPrefix(r.URL.Path, "/v1/bytes/"):
			n, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/v1/bytes/"))
			w.Header().Set("Content-Type", "application/octet-stream")
			io.Copy(w, io.LimitReader(zeros{}, int64(n)))
		case strings.HasPrefix(r.URL.Path, "/v1/trailer/"):
			// A streamed response: the tokens are known after the body.
			w.Header().Set("Trailer", "X-Other, X-Tokens-Used")
			fmt.Fprint(w, "streamed")
			w.(http.Flusher).Flush()
			w.Header().Set("X-Tokens-Used", strings.TrimPrefix(r.URL.Path, "/v1/trailer/"))
			w.Header().Set("X-Other", "kept")
		case r.URL.Path == "/v1/upload":
			n, _ := io.Copy(io.Discard, r.Body)
			fmt.Fprint(w, n)
		default:
			fmt.Fprint(w, "ok")
		}
	}))
	t.Cleanup(up.Close)
	return up
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// metersConfig is a Caddyfile with three meters in front of upstream.
func metersConfig(storeLine, upstream string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		%s
		key_secret test-secret-0123456789
		store_timeout 2s
		meter tokens {
			source header X-Tokens-Used max 1000
		}
		meter download {
			source response_bytes max 5000
		}
		meter upload {
			source request_bytes
		}
		tier capped {
			meter tokens {
				included 100/month
				over_quota block
				thresholds 50 100
			}
		}
		tier billed {
			included 100/month
			meter tokens {
				included 100/month
				over_quota bill 0.01
			}
		}
		tier uploader {
			meter upload {
				included 10/month
				over_quota block
			}
		}
		tier slowed {
			rate 100/min
			meter tokens {
				included 10/month
				over_quota throttle 1/hour burst 2
			}
		}
		customer c1 tier capped
		customer p1 tier billed
		customer u1 tier uploader
		customer s1 tier slowed
		key slowed-key-0123456789abcd s1
		key capped-key-0123456789abcd c1
		key billed-key-0123456789abcd p1
		key upload-key-0123456789abcd u1
	}
}

:%d {
	handle /v1/usage {
		api_monetize_usage
	}
	handle {
		api_monetize
		reverse_proxy %s
	}
}
`, testAdminPort, testHTTPPort, storeLine, testHTTPPort, strings.TrimPrefix(upstream, "http://"))
}

const (
	cappedKey   = "capped-key-0123456789abcd"
	meterBilled = "billed-key-0123456789abcd"
	uploadKey   = "upload-key-0123456789abcd"
)

// meterOf is the view of meter in v (zero when absent).
func meterOf(v usageView, meter string) meterView {
	for _, m := range v.Meters {
		if m.Meter == meter {
			return m
		}
	}
	return meterView{}
}

// forEachSingleStore runs test on a fresh embedded store and a fresh
// Redis key space.
func forEachSingleStore(t *testing.T, test func(t *testing.T, storeLine string)) {
	t.Run("embedded", func(t *testing.T) { test(t, "store_path "+filepath.Join(t.TempDir(), "store.db")) })
	t.Run("redis", func(t *testing.T) {
		test(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+redisTestPrefix(t))
	})
}

func TestMeters(t *testing.T) {
	forEachSingleStore(t, func(t *testing.T, storeLine string) {
		up := tokensUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(metersConfig(storeLine, up.URL), "caddyfile")

		t.Run("TokensCountedExactlyAndStripped", func(t *testing.T) {
			ignored := getMetrics().ignoredUsage.WithLabelValues("billed", "tokens")
			ignoredBefore := testutil.ToFloat64(ignored)
			for _, v := range []string{"30", "30", "30", "5000", "-5", "abc", "2.5"} {
				r := call(t, "/v1/tok/"+v, meterBilled)
				if r.status != http.StatusOK || r.body != "tok" {
					t.Fatalf("tok/%s: %d %q", v, r.status, r.body)
				}
				if got := r.header.Values("X-Tokens-Used"); len(got) != 0 {
					t.Fatalf("tok/%s: X-Tokens-Used reached the client: %q", v, got)
				}
			}
			// A 500 is not billable: its reported tokens are not counted.
			if r := call(t, "/v1/fail/40", meterBilled); r.status != http.StatusInternalServerError || r.header.Get("X-Tokens-Used") != "" {
				t.Fatalf("fail/40: %d %q", r.status, r.header.Get("X-Tokens-Used"))
			}
			if n := testutil.ToFloat64(ignored) - ignoredBefore; n != 3 {
				t.Errorf("ignored_usage_values_total grew by %v, want 3 (-5, abc, 2.5)", n)
			}
			v := usageOf(t, "p1")
			tok := meterOf(v, "tokens")
			// 30+30+30, 5000 clamped to 1000; -5, abc and 2.5 ignored.
			if tok.Billed != 1090 || tok.Overage != 990 || tok.Included == nil || *tok.Included != 100 || *tok.Remaining != 0 {
				t.Errorf("tokens %+v, want 1090 billed, 990 overage, 100 included, 0 remaining", tok)
			}
			if tok.OverageCharge != "9.9" {
				t.Errorf("tokens overage charge %q, want 9.9 (990 × 0.01)", tok.OverageCharge)
			}
			if v.Billed != 7 {
				t.Errorf("default meter billed %d, want 7 (the 500 released)", v.Billed)
			}
			// response_bytes: 7 × "tok".
			if d := meterOf(v, "download"); d.Billed != 21 || d.Included != nil {
				t.Errorf("download %+v, want 21 bytes, only metered", d)
			}
		})

		t.Run("DuplicateStripped", func(t *testing.T) {
			// An Idempotency-Key repeat of the same request is a duplicate
			// (not counted again): the upstream's meter header is still
			// removed before the client sees it.
			before := meterOf(usageOf(t, "p1"), "tokens").Billed
			h := http.Header{"X-Api-Key": {meterBilled}, "Idempotency-Key": {"dup-strip-1"}}
			for i := range 2 {
				r := do(t, http.MethodGet, testBase+"/v1/tok/7", h, "")
				if r.status != http.StatusOK || r.body != "tok" {
					t.Fatalf("request %d: %d %q", i+1, r.status, r.body)
				}
				if got := r.header.Values("X-Tokens-Used"); len(got) != 0 {
					t.Fatalf("request %d (a duplicate: %v): X-Tokens-Used reached the client: %q", i+1, i > 0, got)
				}
			}
			if got := meterOf(usageOf(t, "p1"), "tokens").Billed - before; got != 7 {
				t.Errorf("tokens counted %d for a request and its duplicate, want 7 (once)", got)
			}
		})

		t.Run("TokensInATrailer", func(t *testing.T) {
			before := meterOf(usageOf(t, "p1"), "tokens").Billed
			req, _ := http.NewRequest(http.MethodGet, testBase+"/v1/trailer/25", nil)
			req.Header.Set("X-API-Key", meterBilled)
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK || string(body) != "streamed" {
				t.Fatalf("%d %q", res.StatusCode, body)
			}
			if _, leaked := res.Trailer["X-Tokens-Used"]; leaked || strings.Contains(strings.Join(res.Header.Values("Trailer"), ","), "Tokens") {
				t.Errorf("the tokens trailer reached the client: trailer %v, announced %q", res.Trailer, res.Header.Values("Trailer"))
			}
			if res.Trailer.Get("X-Other") != "kept" {
				t.Errorf("another trailer was lost: %v", res.Trailer)
			}
			if got := meterOf(usageOf(t, "p1"), "tokens").Billed - before; got != 25 {
				t.Errorf("tokens grew by %d, want the trailer's 25", got)
			}
		})

		t.Run("ResponseBytesClamped", func(t *testing.T) {
			before := meterOf(usageOf(t, "p1"), "download").Billed
			if r := call(t, "/v1/bytes/3000", meterBilled); r.status != http.StatusOK || len(r.body) != 3000 {
				t.Fatalf("bytes/3000: %d, %d bytes", r.status, len(r.body))
			}
			if r := call(t, "/v1/bytes/9000", meterBilled); r.status != http.StatusOK || len(r.body) != 9000 {
				t.Fatalf("bytes/9000: %d, %d bytes", r.status, len(r.body))
			}
			if got := meterOf(usageOf(t, "p1"), "download").Billed - before; got != 3000+5000 {
				t.Errorf("download grew by %d, want 8000 (9000 capped at max 5000)", got)
			}
		})

		t.Run("BlockPerMeter", func(t *testing.T) {
			for i, v := range []string{"60", "60"} {
				r := call(t, "/v1/tok/"+v, cappedKey)
				if r.status != http.StatusOK {
					t.Fatalf("call %d: %d %s", i+1, r.status, r.body)
				}
				if !strings.Contains(r.header.Get("RateLimit-Policy"), `"capped-tokens-month";q=100;w=`) {
					t.Errorf("RateLimit-Policy = %q, want the tokens quota item", r.header.Get("RateLimit-Policy"))
				}
			}
			// 120 ≥ 100 included: the next request is refused before the
			// upstream, naming the meter's policy.
			r := call(t, "/v1/tok/1", cappedKey)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("after the tokens quota: %d %s", r.status, r.body)
			}
			p := r.problem(t)
			if fmt.Sprint(p["violated-policies"]) != "[capped-tokens-month]" || !strings.Contains(fmt.Sprint(p["detail"]), "100 tokens per period and 120 are used") {
				t.Errorf("problem %s", r.body)
			}
			if up, _ := p["upgrade"].(map[string]any); fmt.Sprint(up["tiers"]) != "[billed uploader slowed]" {
				t.Errorf("upgrade %v, want the tiers with more tokens or not blocked: [billed uploader slowed]", p["upgrade"])
			}
			if !strings.Contains(r.header.Get("RateLimit"), `"capped-tokens-month";r=0;t=`) {
				t.Errorf("RateLimit = %q", r.header.Get("RateLimit"))
			}
			v := usageOf(t, "c1")
			// The second request, admitted at 60 < 100, overshoots by 20
			// (recorded beyond the quota; the bound is one request's max).
			if tok := meterOf(v, "tokens"); tok.Billed != 120 || tok.Overage != 20 || tok.Requests != 2 {
				t.Errorf("tokens %+v, want 120 billed (20 beyond the quota) in 2 requests (the refused one adds nothing)", tok)
			}
			if v.Billed != 2 {
				t.Errorf("default meter %d, want 2: the refused request is not billed", v.Billed)
			}
		})

		t.Run("ThrottlePerMeter", func(t *testing.T) {
			const key = "slowed-key-0123456789abcd"
			r := call(t, "/v1/tok/20", key)
			if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("RateLimit-Policy"), `"slowed-min";q=100;w=60`) {
				t.Fatalf("first call: %d %q", r.status, r.header.Get("RateLimit-Policy"))
			}
			// 20 ≥ 10 tokens: the meter's throttle (1/hour) replaces the
			// tier's rate, named after the meter.
			r = call(t, "/v1/tok/1", key)
			if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("RateLimit-Policy"), `"slowed-tokens-throttle-hour";q=1;w=3600;am-burst=2`) {
				t.Fatalf("throttled call: %d %q", r.status, r.header.Get("RateLimit-Policy"))
			}
			r = call(t, "/v1/tok/1", key)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("over the throttle: %d %s", r.status, r.body)
			}
			if p := r.problem(t); fmt.Sprint(p["violated-policies"]) != "[slowed-tokens-throttle-hour]" {
				t.Errorf("problem %s", r.body)
			}
			if tok := meterOf(usageOf(t, "s1"), "tokens"); tok.Billed != 21 || tok.Overage != 11 {
				t.Errorf("tokens %+v, want 21 billed, 11 beyond the quota", tok)
			}
		})

		t.Run("ThresholdsPerMeterOnce", func(t *testing.T) {
			r := admin(t, http.MethodGet, "/api_monetize/customers/c1/thresholds", "")
			var events []store.ThresholdEvent
			if err := json.Unmarshal([]byte(r.body), &events); err != nil {
				t.Fatal(err, r.body)
			}
			var got []string
			for _, e := range events {
				got = append(got, fmt.Sprintf("%s:%d:%d/%d", e.Meter, e.Threshold, e.Used, e.Included))
			}
			if fmt.Sprint(got) != "[tokens:50:60/100 tokens:100:120/100]" {
				t.Errorf("threshold events %v, want tokens 50 and 100 once each", got)
			}
		})

		t.Run("RequestBytes", func(t *testing.T) {
			h := http.Header{"X-Api-Key": {uploadKey}}
			if r := do(t, http.MethodPost, testBase+"/v1/upload", h, "12345678"); r.status != http.StatusOK || r.body != "8" {
				t.Fatalf("upload of 8 bytes: %d %s", r.status, r.body)
			}
			// Content-Length known: 8 + 5 > 10 is refused before the upstream.
			r := do(t, http.MethodPost, testBase+"/v1/upload", h, "12345")
			if r.status != http.StatusTooManyRequests || !strings.Contains(r.body, "uploader-upload-month") {
				t.Fatalf("upload of 5 more bytes: %d %s", r.status, r.body)
			}
			// A chunked body is counted as it is read: 2 fits (used 8 < 10).
			req, _ := http.NewRequest(http.MethodPost, testBase+"/v1/upload", io.MultiReader(strings.NewReader("ab")))
			req.Header.Set("X-API-Key", uploadKey)
			req.ContentLength = -1
			res, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if res.StatusCode != http.StatusOK || string(body) != "2" {
				t.Fatalf("chunked upload: %d %s", res.StatusCode, body)
			}
			if up := meterOf(usageOf(t, "u1"), "upload"); up.Billed != 10 {
				t.Errorf("upload %+v, want 10 bytes", up)
			}
		})
	})
}

// metersSharedCaddyfile is one instance of a three-instance deployment on
// one Redis with a tokens meter: alpha's tokens are blocked at 700, beta's
// billed beyond 500.
func metersSharedCaddyfile(prefix, upstream string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis %s
		redis_prefix %s
		store_timeout 2s
		key_secret multi-instance-secret-0123
		meter tokens {
			source header X-Tokens-Used max 1000
		}
		tier blocked {
			meter tokens {
				included 700/month
				over_quota block
			}
		}
		tier billed {
			meter tokens {
				included 500/month
				over_quota bill 0.01
				thresholds 50 100 200
			}
		}
		customer alpha tier blocked
		customer beta tier billed
		key %s alpha
		key %s beta
	}
}

:%d {
	api_monetize
	reverse_proxy %s
}
`, adminPort, httpPort, testRedisURL, prefix, sharedKeyA, sharedKeyB, httpPort, strings.TrimPrefix(upstream, "http://"))
	}
}

// TestMetersThreeInstances checks per-meter block and bill across three
// Caddy processes sharing one Redis, under concurrent load: each meter's
// ledger equals what the upstream reported for the admitted requests, a
// block meter's overshoot stays within (requests in flight) × (reported
// amount), and each threshold is crossed once.
func TestMetersThreeInstances(t *testing.T) {
	up := tokensUpstream(t)
	cfg := metersSharedCaddyfile(redisTestPrefix(t), up.URL)
	var procs [3]*caddyProcess
	for i := range procs {
		procs[i] = launchCaddy(t, fmt.Sprintf("caddy-%d", i+1), cfg)
	}
	for _, p := range procs {
		p.waitServing(t)
	}
	paths := make([]string, len(procs))
	for i, p := range procs {
		paths[i] = p.base + "/v1/tok/7"
	}
	const concurrency = 30
	client := loadClient(t, 2*concurrency)
	usage := func(customer string) usageView {
		t.Helper()
		res, err := http.Get(procs[2].adminBase + "/api_monetize/customers/" + customer + "/usage")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var v usageView
		if err := json.NewDecoder(res.Body).Decode(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	t.Run("block", func(t *testing.T) {
		c := fire(client, paths, sharedKeyA, 400, concurrency)
		c.check(t, "400 requests reporting 7 tokens")
		admitted := int64(c.statuses[http.StatusOK])
		v := usage("alpha")
		tok := meterOf(v, "tokens")
		if tok.Billed != 7*admitted || v.Billed != admitted {
			t.Errorf("tokens %d and calls %d for %d admitted requests, want %d and %d", tok.Billed, v.Billed, admitted, 7*admitted, admitted)
		}
		// At least the quota (100 requests), at most the quota plus one
		// request in flight per client connection.
		if admitted < 100 || admitted > 100+concurrency {
			t.Errorf("admitted %d, want 100 to %d (the documented overshoot bound)", admitted, 100+concurrency)
		}
		t.Logf("admitted %d of 400, tokens %d (overshoot %d)", admitted, tok.Billed, tok.Billed-700)
		if tok.Billed-700 > concurrency*7 {
			t.Errorf("overshoot %d tokens, above the bound %d", tok.Billed-700, concurrency*7)
		}
		if limited := c.statuses[http.StatusTooManyRequests]; int64(limited) != 400-admitted {
			t.Errorf("statuses %v", c.statuses)
		}
	})

	t.Run("bill", func(t *testing.T) {
		c := fire(client, paths, sharedKeyB, 300, concurrency)
		c.check(t, "300 requests reporting 7 tokens")
		if c.statuses[http.StatusOK] != 300 {
			t.Fatalf("statuses %v, want 300 × 200", c.statuses)
		}
		tok := meterOf(usage("beta"), "tokens")
		if tok.Billed != 2100 || tok.Overage != 1600 || tok.Requests != 300 {
			t.Errorf("tokens %+v, want 2100 billed, 1600 overage, 300 requests", tok)
		}
		if tok.OverageCharge != "16" {
			t.Errorf("overage charge %q, want 16 (1600 × 0.01)", tok.OverageCharge)
		}
		res, err := http.Get(procs[0].adminBase + "/api_monetize/customers/beta/thresholds")
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		var events []store.ThresholdEvent
		if err := json.NewDecoder(res.Body).Decode(&events); err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, e := range events {
			got = append(got, fmt.Sprintf("%s:%d", e.Meter, e.Threshold))
		}
		if fmt.Sprint(got) != "[tokens:50 tokens:100 tokens:200]" {
			t.Errorf("threshold events %v, want tokens 50, 100, 200 once each", got)
		}
	})
}

// seedMeterHour bills units of meter (and one cost unit) in a past hour of
// the customer's current period, through the store as the handler would.
func seedMeterHour(t *testing.T, st store.Store, customer, meter string, hoursAgo int, units int64) {
	t.Helper()
	now := time.Now()
	p := metering.PeriodRule{}.Period(now, time.Time{})
	hour := metering.HourStart(now).Add(-time.Duration(hoursAgo) * time.Hour)
	if hour.Before(p.Start) {
		p = metering.PeriodRule{}.Period(hour, time.Time{})
	}
	_, err := st.Reserve(context.Background(), store.Reservation{
		Subject: customer, Cost: 1,
		Quota:  store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(hour)},
		Meters: []store.MeterReservation{{Meter: meter, Amount: units}},
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestStripeReportsEachMeter runs the reporter in Caddy with a tokens
// meter, through Stripe faults (an event accepted but answered 500, a
// rate limit): each closed hour of each meter is one event under the
// meter's event name, the sums per meter equal the ledger, and the
// reconciliation totals each meter apart.
func TestStripeReportsEachMeter(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	double.Fail(stripedouble.None, stripedouble.None, stripedouble.AcceptThen500, stripedouble.RateLimit)
	prefix := redisTestPrefix(t)
	st, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	seedMeterHour(t, st, "acme", "tokens", 2, 5000)
	seedMeterHour(t, st, "acme", "tokens", 2, 1)
	seedMeterHour(t, st, "acme", "tokens", 3, 700)
	seedMeterHour(t, st, "beta", "tokens", 2, 42)
	cf := reportCaddyfile(t, prefix, double.URL, "1h", "read_write")
	cf = strings.Replace(cf, "\t\ttier free {", "\t\tmeter tokens {\n\t\t\tsource header X-Tokens-Used max 100000\n\t\t\tstripe ai_tokens\n\t\t}\n\t\ttier free {", 1)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(cf, "caddyfile")

	var recon reconciliationView
	waitUntil(t, 20*time.Second, "every hour sent", func() bool {
		if r := admin(t, http.MethodPost, "/api_monetize/stripe/report", ""); r.status != http.StatusOK {
			t.Fatalf("report: %d %s", r.status, r.body)
		}
		r := admin(t, http.MethodGet, "/api_monetize/stripe/reconciliation", "")
		recon = reconciliationView{}
		if err := json.Unmarshal([]byte(r.body), &recon); err != nil {
			t.Fatal(err)
		}
		return len(double.Events()) == 6
	})
	sums := map[string]int64{}
	seen := map[string]bool{}
	for _, e := range double.Events() {
		if seen[e.Identifier] {
			t.Fatalf("identifier %s sent twice", e.Identifier)
		}
		seen[e.Identifier] = true
		sums[e.EventName+"|"+e.Customer] += e.Value
	}
	if n := double.Requests("POST /v1/billing/meter_events"); n != 8 {
		t.Errorf("%d meter event requests, want 8 (6 events, 2 of them retried after a fault)", n)
	}
	want := map[string]int64{"api_calls|cus_ACME": 3, "ai_tokens|cus_ACME": 5701, "api_calls|cus_BETA": 1, "ai_tokens|cus_BETA": 42}
	if fmt.Sprint(sums) != fmt.Sprint(want) {
		t.Fatalf("Stripe sums %v, want %v (the ledger)", sums, want)
	}
	if recon.LedgerUnits != 4 || recon.ReportedUnits != 4 || len(recon.Meters) != 1 {
		t.Fatalf("reconciliation %+v", recon)
	}
	if m := recon.Meters[0]; m.Meter != "tokens" || m.LedgerUnits != 5743 || m.ReportedUnits != 5743 || m.UnreportedUnits != 0 {
		t.Fatalf("tokens reconciliation %+v", m)
	}

	// Units added to sent hours after they were sent are unreported; the
	// report splits them by meter (and keeps the total).
	seedMeterHour(t, st, "acme", "tokens", 2, 5)
	r := admin(t, http.MethodPost, "/api_monetize/stripe/report", "")
	var rep reportView
	if err := json.Unmarshal([]byte(r.body), &rep); err != nil || r.status != http.StatusOK {
		t.Fatalf("report: %d %s (%v)", r.status, r.body, err)
	}
	if rep.UnreportedUnits != 6 || fmt.Sprint(rep.Meters) != "[{cost 1} {tokens 5}]" {
		t.Fatalf("report unreported %d by meter %v; want 6: cost 1 (the late call) and tokens 5", rep.UnreportedUnits, rep.Meters)
	}
}

// TestMetersRedisOutage: while Redis is down, meters are decided from the
// usage this instance last saw (a block meter refuses once used up, naming
// its policy) and what is served is spooled with its meters; when Redis
// comes back (empty), the outage's tokens are replayed exactly once.
func TestMetersRedisOutage(t *testing.T) {
	port := freePort(t)
	stop := startRedis(t, port)
	defer configResyncInterval.Store(configResyncInterval.Load())
	configResyncInterval.Store(int64(200 * time.Millisecond))
	up := tokensUpstream(t)
	tester := newTester(t, testConfig{})
	tester.InitServer(metersConfig(fmt.Sprintf("redis redis://127.0.0.1:%d/0", port), up.URL), "caddyfile")
	for key, v := range map[string]string{meterBilled: "30", cappedKey: "60"} {
		if r := call(t, "/v1/tok/"+v, key); r.status != http.StatusOK {
			t.Fatalf("before the outage: %d %s", r.status, r.body)
		}
	}
	// One more call each, so the cache holds the settled tokens as the
	// store reports them.
	for _, key := range []string{meterBilled, cappedKey} {
		if r := call(t, "/v1/tok/0", key); r.status != http.StatusOK {
			t.Fatalf("before the outage: %d %s", r.status, r.body)
		}
	}

	stop()
	for range 3 {
		if r := call(t, "/v1/tok/10", meterBilled); r.status != http.StatusOK || r.header.Get("X-Tokens-Used") != "" {
			t.Fatalf("billed during the outage: %d %q", r.status, r.header.Get("X-Tokens-Used"))
		}
	}
	if r := call(t, "/v1/tok/50", cappedKey); r.status != http.StatusOK {
		t.Fatalf("capped at 60 of 100 during the outage: %d %s", r.status, r.body)
	}
	r := call(t, "/v1/tok/1", cappedKey)
	if r.status != http.StatusTooManyRequests || !strings.Contains(r.body, "capped-tokens-month") {
		t.Fatalf("capped at 110 of 100 during the outage: %d %s", r.status, r.body)
	}

	// Redis comes back empty: only the outage's usage is in it, once.
	restart := startRedis(t, port)
	defer restart()
	for customer, want := range map[string][2]int64{"p1": {3, 30}, "c1": {1, 50}} {
		ok := func(r response) bool {
			var v usageView
			return r.status == http.StatusOK && json.Unmarshal([]byte(r.body), &v) == nil && v.Billed == want[0] && meterOf(v, "tokens").Billed == want[1]
		}
		r := eventually(15*time.Second, func() response {
			return admin(t, http.MethodGet, "/api_monetize/customers/"+customer+"/usage", "")
		}, ok)
		if !ok(r) {
			t.Errorf("%s after the replay: %d %s; want %d calls and %d tokens", customer, r.status, r.body, want[0], want[1])
		}
	}
}

// TestMeterNotificationsDelivered: a meter's thresholds crossed through
// Caddy are delivered once each, the webhook payload naming the meter and
// the email counting its units; the default meter's payload has no meter.
func TestMeterNotificationsDelivered(t *testing.T) {
	fastNotify()
	secret := notifyEnv(t)
	hook := notifytest.NewReceiver(t, secret, 0)
	smtpSrv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "mail-password"})
	up := tokensUpstream(t)
	cf := fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1ns
	api_monetize {
		store_path %s
		key_secret notify-test-secret-0123456
		notify {
			webhook %s {
				secret {env.NOTIFY_TEST_SECRET}
			}
			email {
				smtp %s
				username {env.NOTIFY_TEST_SMTP_USER}
				password {env.NOTIFY_TEST_SMTP_PASSWORD}
				from "API Billing <billing@example.com>"
			}
		}
		meter tokens {
			source header X-Tokens-Used max 1000
		}
		tier metered {
			included 2/month
			thresholds 100
			meter tokens {
				included 100/month
				over_quota bill 0.01
				thresholds 50 100
			}
		}
		customer acme tier metered email dev@acme.example
		key %s acme
	}
}

:%d {
	api_monetize
	reverse_proxy %s
}
`, testAdminPort, testHTTPPort, filepath.Join(t.TempDir(), "store.db"), hook.URL, smtpSrv.Addr, notifyAcmeKey, testHTTPPort, strings.TrimPrefix(up.URL, "http://"))
	caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort}).InitServer(cf, "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	for _, v := range []string{"60", "50"} { // tokens 60 (50 %), then 110 (100 %); calls 2 (100 %)
		if r := call(t, "/v1/tok/"+v, notifyAcmeKey); r.status != http.StatusOK {
			t.Fatalf("tok/%s: %d %s", v, r.status, r.body)
		}
	}
	waitFor(t, 20*time.Second, "3 webhooks and 3 emails", func() bool {
		u, _ := hook.Accepted()
		return len(u) == 3 && len(smtpSrv.Mails()) == 3
	})
	unique, total := hook.Accepted()
	var got []string
	for _, d := range unique {
		var p notify.Payload
		if err := json.Unmarshal(d.Body, &p); err != nil {
			t.Fatal(err)
		}
		got = append(got, fmt.Sprintf("%s:%d:%s", p.Data.Meter, p.Data.Threshold, p.Data.Message))
	}
	slices.Sort(got)
	want := []string{
		":100:You have used all of your included 2 API calls. Further requests are blocked until the period ends.",
		"tokens:100:You have exceeded your included 100 tokens. Overage billing is active.",
		"tokens:50:You have used 50% of your included tokens.",
	}
	if !slices.Equal(got, want) || total != 3 {
		t.Errorf("webhooks %q (%d deliveries), want %q once each", got, total, want)
	}
	var subjects []string
	for _, m := range smtpSrv.Mails() {
		msg, err := mail.ReadMessage(bytes.NewReader(m.Data))
		if err != nil {
			t.Fatal(err)
		}
		subjects = append(subjects, msg.Header.Get("Subject"))
	}
	slices.Sort(subjects)
	if want := []string{"API usage alert: 100% of your included API calls", "API usage alert: 100% of your included tokens", "API usage alert: 50% of your included tokens"}; !slices.Equal(subjects, want) {
		t.Errorf("email subjects %q, want %q", subjects, want)
	}
}
