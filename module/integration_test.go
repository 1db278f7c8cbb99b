package module

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	"github.com/apimonetize/caddy-api-monetize/metering"
)

// Integration tests run one in-process Caddy per test binary (caddytest),
// on a private admin port; each InitServer is a real config reload.
// Their ports move by API_MONETIZE_TEST_PORT_OFFSET, so that test runs of
// several working copies on one machine do not answer each other.
var (
	testAdminPort = 2991 + testPortOffset()
	testHTTPPort  = 9381 + testPortOffset()
	testBase      = fmt.Sprintf("http://127.0.0.1:%d", testHTTPPort)
	testAdminBase = fmt.Sprintf("http://localhost:%d", testAdminPort)
)

// testPortOffset reads API_MONETIZE_TEST_PORT_OFFSET (default 0).
func testPortOffset() int {
	n, _ := strconv.Atoi(os.Getenv("API_MONETIZE_TEST_PORT_OFFSET"))
	return n
}

const (
	freeKey = "free-key-0123456789abcdef"
	proKey  = "pro-key-0123456789abcdef"
	entKey  = "enterprise-key-0123456789"
)

// envRunCaddy makes the test binary run as a Caddy process (args from
// envCaddyArgs), so tests can start several real Caddy instances.
const (
	envRunCaddy  = "API_MONETIZE_TEST_RUN_CADDY"
	envCaddyArgs = "API_MONETIZE_TEST_CADDY_ARGS"
)

// testBinary is this test binary, which runs as Caddy under envRunCaddy.
// (caddytest rewrites os.Args when it starts its in-process Caddy, so it is
// read first.)
var testBinary string

func TestMain(m *testing.M) {
	testBinary, _ = os.Executable()
	if os.Getenv(envRunCaddy) == "1" {
		injectDiskFull()
		os.Args = append([]string{"caddy"}, strings.Fields(os.Getenv(envCaddyArgs))...)
		caddycmd.Main()
		return
	}
	dir, err := os.MkdirTemp("", "api-monetize-test-")
	if err != nil {
		panic(err)
	}
	// Keep Caddy's data (and the embedded store) out of the user's home.
	os.Setenv("XDG_DATA_HOME", filepath.Join(dir, "data"))
	os.Setenv("XDG_CONFIG_HOME", filepath.Join(dir, "config"))
	code := m.Run()
	stopSharedCluster()
	os.RemoveAll(dir)
	os.Exit(code)
}

// testConfig is the Caddyfile used by the integration tests. storeLine
// selects the store (a store_path line or a redis line); extra is added to
// the global api_monetize block and freeRate is the free tier's rate.
type testConfig struct {
	storeLine string
	extra     string
	freeRate  string
}

func (c testConfig) String() string {
	if c.freeRate == "" {
		c.freeRate = "10/min"
	}
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
		%s
		tier free {
			price 0
			included 1000/month
			rate %s
			endpoints /v1/basic/*
			support community
		}
		tier pro {
			price 49.00/month
			included 50000/month
			rate 100/min
			endpoints /v1/*
			exclude /v1/admin /v1/admin/*
			support email
		}
		tier enterprise {
			price custom
			included 1000000/month
			rate 1000/min burst 200
			endpoints /v1/* /v1/admin/*
			support dedicated
			sla 99.9%%
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
	api_monetize {
		cost /v1/ml/* 10
		cost /v1/basic/ml 10
		cost /v1/health 0
		cost /v1/basic/health 0
	}
	respond "ok customer={http.api_monetize.customer} tier={http.api_monetize.tier} key={http.api_monetize.key_id}"
}
`, testAdminPort, testHTTPPort, c.storeLine, c.extra, c.freeRate, freeKey, proKey, entKey, testHTTPPort)
}

func newTester(t *testing.T, cfg testConfig) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(cfg.String(), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	return tester
}

// forEachStore runs test on a fresh embedded store and on a fresh Redis
// key space.
func forEachStore(t *testing.T, test func(t *testing.T, cfg testConfig)) {
	t.Run("embedded", func(t *testing.T) {
		test(t, testConfig{storeLine: "store_path " + filepath.Join(t.TempDir(), "store.db")})
	})
	t.Run("redis", func(t *testing.T) {
		test(t, testConfig{storeLine: "redis " + testRedisURL + "\n\t\tredis_prefix " + redisTestPrefix(t)})
	})
	t.Run("redis cluster", func(t *testing.T) {
		test(t, testConfig{storeLine: clusterStoreLines(t)})
	})
}

type response struct {
	status int
	header http.Header
	body   string
}

// problemBody decodes an application/problem+json body.
func (r response) problem(t *testing.T) map[string]any {
	t.Helper()
	if ct := r.header.Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("Content-Type = %q, want application/problem+json (status %d, body %s)", ct, r.status, r.body)
	}
	var p map[string]any
	if err := json.Unmarshal([]byte(r.body), &p); err != nil {
		t.Fatalf("problem body is not JSON: %v: %s", err, r.body)
	}
	for _, f := range []string{"type", "title", "detail"} {
		if s, _ := p[f].(string); s == "" {
			t.Errorf("problem has no %q: %s", f, r.body)
		}
	}
	if int(p["status"].(float64)) != r.status {
		t.Errorf("problem status %v, response status %d", p["status"], r.status)
	}
	return p
}

func do(t *testing.T, method, url string, header http.Header, body string) response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return response{status: res.StatusCode, header: res.Header, body: string(b)}
}

// call sends a GET to the API with key in X-API-Key (none when empty).
func call(t *testing.T, path, key string) response {
	t.Helper()
	h := http.Header{}
	if key != "" {
		h.Set("X-API-Key", key)
	}
	return do(t, http.MethodGet, testBase+path, h, "")
}

func admin(t *testing.T, method, path, body string) response {
	t.Helper()
	h := http.Header{}
	if body != "" {
		h.Set("Content-Type", "application/json")
	}
	return do(t, method, testAdminBase+path, h, body)
}

// monthSeconds is the length of the current UTC calendar month in
// seconds, the w of a monthly quota policy.
func monthSeconds() string {
	return strconv.FormatInt(metering.PeriodRule{}.Period(time.Now(), time.Time{}).Seconds(), 10)
}

func headerInt(t *testing.T, r response, name string) int64 {
	t.Helper()
	v, err := strconv.ParseInt(r.header.Get(name), 10, 64)
	if err != nil {
		t.Fatalf("%s = %q: %v", name, r.header.Get(name), err)
	}
	return v
}

func TestAuthentication(t *testing.T) { forEachStore(t, testAuthentication) }

func testAuthentication(t *testing.T, cfg testConfig) {
	newTester(t, cfg)

	r := call(t, "/v1/basic/hello", "")
	if r.status != http.StatusUnauthorized || r.header.Get("WWW-Authenticate") == "" {
		t.Fatalf("no key: status %d, WWW-Authenticate %q", r.status, r.header.Get("WWW-Authenticate"))
	}
	if p := r.problem(t); !strings.Contains(p["detail"].(string), "X-API-Key") {
		t.Errorf("missing-key detail does not say where to send the key: %v", p["detail"])
	}

	for _, bad := range []string{"short", "unknown-key-0123456789abcdef", "am_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA_AAAAAA"} {
		r := call(t, "/v1/basic/hello", bad)
		if r.status != http.StatusUnauthorized || !strings.Contains(r.header.Get("WWW-Authenticate"), "invalid_token") {
			t.Errorf("key %q: status %d, WWW-Authenticate %q", bad, r.status, r.header.Get("WWW-Authenticate"))
		}
		r.problem(t)
	}

	r = call(t, "/v1/basic/hello", freeKey)
	if r.status != http.StatusOK || !strings.HasPrefix(r.body, "ok customer=hobbyist tier=free key=key_") {
		t.Fatalf("valid key: %d %q", r.status, r.body)
	}
	if strings.Contains(r.body, freeKey) {
		t.Error("the key placeholder leaked the key itself")
	}

	bearer := do(t, http.MethodGet, testBase+"/v1/basic/hello", http.Header{"Authorization": {"Bearer " + proKey}}, "")
	if bearer.status != http.StatusOK || !strings.Contains(bearer.body, "customer=acme tier=pro") {
		t.Fatalf("bearer key: %d %q", bearer.status, bearer.body)
	}
}

func TestEndpointAccess(t *testing.T) { forEachStore(t, testEndpointAccess) }

func testEndpointAccess(t *testing.T, cfg testConfig) {
	newTester(t, cfg)

	r := call(t, "/v1/reports", freeKey)
	if r.status != http.StatusForbidden {
		t.Fatalf("free tier on /v1/reports: status %d", r.status)
	}
	p := r.problem(t)
	if d := p["detail"].(string); !strings.Contains(d, "pro, enterprise") {
		t.Errorf("403 detail should name the tiers including the path: %q", d)
	}
	if up, _ := p["upgrade"].(map[string]any); up == nil {
		t.Errorf("403 has no upgrade hint: %s", r.body)
	}

	if r := call(t, "/v1/admin/users", proKey); r.status != http.StatusForbidden || !strings.Contains(r.problem(t)["detail"].(string), "enterprise") {
		t.Errorf("pro tier on an excluded path: %d %s", r.status, r.body)
	}
	// The README's exclude (/v1/admin and /v1/admin/*) covers the path
	// itself too, not only what is below it.
	for _, path := range []string{"/v1/admin", "/v1/admin/", "/v1/Admin"} {
		if r := call(t, path, proKey); r.status != http.StatusForbidden {
			t.Errorf("pro tier on %s: %d %s", path, r.status, r.body)
		}
	}
	if r := call(t, "/v1/admin/users", entKey); r.status != http.StatusOK {
		t.Errorf("enterprise on /v1/admin/users: %d", r.status)
	}
	if r := call(t, "/v1/reports", proKey); r.status != http.StatusOK {
		t.Errorf("pro on /v1/reports: %d", r.status)
	}
	// Caddy path matching is case-insensitive and cleans the path: no bypass.
	if r := call(t, "/v1/ADMIN/users", proKey); r.status != http.StatusForbidden {
		t.Errorf("pro on /v1/ADMIN/users: %d", r.status)
	}
	if r := call(t, "/v1//admin/users", proKey); r.status != http.StatusForbidden {
		t.Errorf("pro on /v1//admin/users: %d", r.status)
	}
}

func TestRateLimitAndHeaders(t *testing.T) { forEachStore(t, testRateLimitAndHeaders) }

func testRateLimitAndHeaders(t *testing.T, cfg testConfig) {
	newTester(t, cfg)

	// Cost 0 is neither limited nor counted.
	for range 3 {
		if r := call(t, "/v1/basic/health", freeKey); r.status != http.StatusOK || r.header.Get("X-RateLimit-Remaining") != "10" {
			t.Fatalf("cost-0 call: %d remaining %q", r.status, r.header.Get("X-RateLimit-Remaining"))
		}
	}
	for i := int64(1); i <= 10; i++ {
		r := call(t, "/v1/basic/hello", freeKey)
		if r.status != http.StatusOK {
			t.Fatalf("call %d: status %d", i, r.status)
		}
		if got := headerInt(t, r, "X-RateLimit-Remaining"); got != 10-i {
			t.Errorf("call %d: X-RateLimit-Remaining %d, want %d", i, got, 10-i)
		}
		if got := r.header.Get("RateLimit-Policy"); got != `"free-min";q=10;w=60, "free-month";q=1000;w=`+monthSeconds() {
			t.Errorf("RateLimit-Policy = %q", got)
		}
		if got, want := r.header.Get("RateLimit"), fmt.Sprintf(`"free-min";r=%d;t=`, 10-i); !strings.HasPrefix(got, want) {
			t.Errorf("RateLimit = %q, want prefix %q", got, want)
		}
		if headerInt(t, r, "X-RateLimit-Limit") != 10 || headerInt(t, r, "X-RateLimit-Reset") < 1_700_000_000 {
			t.Errorf("X-RateLimit-Limit/Reset: %v", r.header)
		}
	}
	r := call(t, "/v1/basic/hello", freeKey)
	if r.status != http.StatusTooManyRequests {
		t.Fatalf("11th call: status %d", r.status)
	}
	retry := headerInt(t, r, "Retry-After")
	if retry < 1 || retry > 6 {
		t.Errorf("Retry-After = %d, want 1..6 (one unit of 10/min)", retry)
	}
	p := r.problem(t)
	if p["type"] != problemQuotaExceeded || fmt.Sprint(p["violated-policies"]) != "[free-min]" {
		t.Errorf("429 problem: %s", r.body)
	}
	if r.header.Get("X-RateLimit-Remaining") != "0" {
		t.Errorf("429 X-RateLimit-Remaining = %q", r.header.Get("X-RateLimit-Remaining"))
	}
	// A denied request consumed nothing: another customer is unaffected and
	// the free customer is still denied, not further in debt.
	if r := call(t, "/v1/basic/hello", proKey); r.status != http.StatusOK {
		t.Errorf("another customer: %d", r.status)
	}
}

// TestRateLimitHeaderChoice checks rate_limit_headers: each choice sends
// exactly its headers, with the same values as by default, and a 429
// keeps Retry-After even when no rate-limit header is sent.
func TestRateLimitHeaderChoice(t *testing.T) {
	ietf := []string{"RateLimit-Policy", "RateLimit"}
	legacy := []string{"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"}
	for _, tc := range []struct {
		mode      string
		sent, not []string
	}{
		{"ietf", ietf, legacy},
		{"legacy", legacy, ietf},
		{"none", nil, append(ietf, legacy...)},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			newTester(t, testConfig{
				storeLine: "store_path " + filepath.Join(t.TempDir(), "store.db"),
				extra:     "rate_limit_headers " + tc.mode,
			})
			for i := int64(1); i <= 10; i++ {
				r := call(t, "/v1/basic/hello", freeKey)
				if r.status != http.StatusOK {
					t.Fatalf("call %d: status %d", i, r.status)
				}
				for _, h := range tc.sent {
					if r.header.Get(h) == "" {
						t.Errorf("call %d: no %s header: %v", i, h, r.header)
					}
				}
				for _, h := range tc.not {
					if v := r.header.Get(h); v != "" {
						t.Errorf("call %d: %s: %q sent, want none", i, h, v)
					}
				}
				switch tc.mode {
				case "ietf":
					if got, want := r.header.Get("RateLimit"), fmt.Sprintf(`"free-min";r=%d;t=`, 10-i); !strings.HasPrefix(got, want) {
						t.Errorf("RateLimit = %q, want prefix %q", got, want)
					}
				case "legacy":
					if got := headerInt(t, r, "X-RateLimit-Remaining"); got != 10-i || headerInt(t, r, "X-RateLimit-Limit") != 10 {
						t.Errorf("call %d: X-RateLimit-Limit/Remaining %v", i, r.header)
					}
				}
			}
			r := call(t, "/v1/basic/hello", freeKey)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("11th call: status %d", r.status)
			}
			if retry := headerInt(t, r, "Retry-After"); retry < 1 || retry > 6 {
				t.Errorf("Retry-After = %d, want 1..6", retry)
			}
			r.problem(t)
		})
	}
}

func TestCostWeighting(t *testing.T) { forEachStore(t, testCostWeighting) }

func testCostWeighting(t *testing.T, cfg testConfig) {
	newTester(t, cfg)
	// pro: 100/min; /v1/ml/* costs 10.
	for i := int64(1); i <= 10; i++ {
		r := call(t, "/v1/ml/predict", proKey)
		if r.status != http.StatusOK || headerInt(t, r, "X-RateLimit-Remaining") != 100-10*i {
			t.Fatalf("ml call %d: %d remaining %s", i, r.status, r.header.Get("X-RateLimit-Remaining"))
		}
	}
	if r := call(t, "/v1/ml/predict", proKey); r.status != http.StatusTooManyRequests {
		t.Fatalf("11th ml call: %d", r.status)
	}
	// Limits belong to the customer, whatever key it uses: an admin-issued
	// second key of acme is denied too.
}

func TestAdminAPI(t *testing.T) { forEachStore(t, testAdminAPI) }

func testAdminAPI(t *testing.T, cfg testConfig) {
	newTester(t, cfg)

	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"newco","tier":"pro"}`); r.status != http.StatusForbidden {
		t.Fatalf("write with admin_api read_only: %d %s", r.status, r.body)
	}
	r := admin(t, http.MethodGet, "/api_monetize/customers", "")
	if r.status != http.StatusOK || !strings.Contains(r.body, `"id":"acme"`) {
		t.Fatalf("list customers: %d %s", r.status, r.body)
	}

	cfg.extra = "admin_api read_write"
	newTester(t, cfg)
	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"newco","tier":"gold"}`); r.status != http.StatusBadRequest || !strings.Contains(r.body, "gold") {
		t.Errorf("unknown tier: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"newco","tier":"free"`); r.status != http.StatusBadRequest {
		t.Errorf("broken JSON: %d %s", r.status, r.body)
	}
	// email and stripe_customer_id are validated as the Caddyfile does: no
	// line break can reach a notification's headers or a Stripe call.
	for _, body := range []string{
		`{"id":"newco","tier":"free","email":"a@example.com\r\nBcc: victim@example.com"}`,
		`{"id":"newco","tier":"free","email":"Acme <a@example.com>"}`,
		`{"id":"newco","tier":"free","stripe_customer_id":"cus_1\r\nX: y"}`,
		`{"id":"newco","tier":"free","stripe_customer_id":"acme"}`,
	} {
		if r := admin(t, http.MethodPost, "/api_monetize/customers", body); r.status != http.StatusBadRequest {
			t.Errorf("%s: %d %s, want 400", body, r.status, r.body)
		}
	}
	if r := admin(t, http.MethodGet, "/api_monetize/customers/newco", ""); r.status != http.StatusNotFound {
		t.Fatalf("a refused customer was stored: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"mailco","tier":"free","email":"billing@mailco.example","stripe_customer_id":"cus_MailCo1"}`); r.status != http.StatusCreated {
		t.Errorf("valid email and Stripe id: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"newco","tier":"free"}`); r.status != http.StatusCreated {
		t.Fatalf("create: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/customers", `{"id":"newco","tier":"free"}`); r.status != http.StatusConflict {
		t.Errorf("create twice: %d %s", r.status, r.body)
	}
	r = admin(t, http.MethodPost, "/api_monetize/customers/newco/keys", "")
	if r.status != http.StatusCreated {
		t.Fatalf("issue key: %d %s", r.status, r.body)
	}
	var issued struct{ ID, Key, Prefix string }
	if err := json.Unmarshal([]byte(r.body), &issued); err != nil || !strings.HasPrefix(issued.Key, "am_live_") {
		t.Fatalf("issued key: %v %s", err, r.body)
	}
	if r := call(t, "/v1/basic/x", issued.Key); r.status != http.StatusOK || !strings.Contains(r.body, "customer=newco tier=free key="+issued.ID) {
		t.Fatalf("new key: %d %s", r.status, r.body)
	}
	r = admin(t, http.MethodGet, "/api_monetize/customers/newco/keys", "")
	if r.status != http.StatusOK || strings.Contains(r.body, issued.Key) || !strings.Contains(r.body, issued.Prefix) || strings.Contains(r.body, "hash") {
		t.Errorf("list keys must show the prefix only: %s", r.body)
	}

	// A tier change applies to the very next request.
	if r := admin(t, http.MethodPut, "/api_monetize/customers/newco/tier", `{"tier":"pro"}`); r.status != http.StatusOK {
		t.Fatalf("set tier: %d %s", r.status, r.body)
	}
	if r := call(t, "/v1/reports", issued.Key); r.status != http.StatusOK || !strings.Contains(r.body, "tier=pro") {
		t.Errorf("after upgrade: %d %s", r.status, r.body)
	}

	if r := admin(t, http.MethodDelete, "/api_monetize/keys/"+issued.ID, ""); r.status != http.StatusOK || !strings.Contains(r.body, "revoked_at") {
		t.Fatalf("revoke: %d %s", r.status, r.body)
	}
	if r := call(t, "/v1/reports", issued.Key); r.status != http.StatusUnauthorized {
		t.Errorf("revoked key: %d", r.status)
	}
	if r := admin(t, http.MethodDelete, "/api_monetize/keys/key_doesnotexist", ""); r.status != http.StatusNotFound {
		t.Errorf("revoke unknown key: %d", r.status)
	}
	if r := admin(t, http.MethodGet, "/api_monetize/customers/nobody", ""); r.status != http.StatusNotFound {
		t.Errorf("get unknown customer: %d", r.status)
	}
}

func TestReloadKeepsCountersAndAppliesRates(t *testing.T) {
	forEachStore(t, testReloadKeepsCountersAndAppliesRates)
}

func testReloadKeepsCountersAndAppliesRates(t *testing.T, cfg testConfig) {
	newTester(t, cfg)
	for range 4 {
		if r := call(t, "/v1/basic/x", freeKey); r.status != http.StatusOK {
			t.Fatalf("status %d", r.status)
		}
	}
	// Reload with a changed rate: the counter carries over and the new rate
	// applies at once.
	cfg.freeRate = "20/min"
	newTester(t, cfg)
	r := call(t, "/v1/basic/x", freeKey)
	if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("RateLimit-Policy"), `"free-min";q=20;w=60, `) {
		t.Fatalf("after reload: %d %q", r.status, r.header.Get("RateLimit-Policy"))
	}
	if got := headerInt(t, r, "X-RateLimit-Remaining"); got != 15 {
		t.Errorf("remaining after reload = %d, want 15 (20 - 4 before - 1 now)", got)
	}
}

func TestKeyRemovedFromConfigIsRevoked(t *testing.T) {
	forEachStore(t, testKeyRemovedFromConfigIsRevoked)
}

func testKeyRemovedFromConfigIsRevoked(t *testing.T, cfg testConfig) {
	const extraKey = "extra-key-0123456789abcdef"
	withKey := cfg
	withKey.extra = "key " + extraKey + " acme"
	newTester(t, withKey)
	if r := call(t, "/v1/reports", extraKey); r.status != http.StatusOK {
		t.Fatalf("declared key: %d", r.status)
	}
	newTester(t, cfg)
	if r := call(t, "/v1/reports", extraKey); r.status != http.StatusUnauthorized {
		t.Fatalf("key removed from the configuration: %d, want 401", r.status)
	}
	if r := call(t, "/v1/reports", proKey); r.status != http.StatusOK {
		t.Fatalf("key still declared: %d", r.status)
	}
	// Declaring it again does not bring a revoked key back.
	newTester(t, withKey)
	if r := call(t, "/v1/reports", extraKey); r.status != http.StatusUnauthorized {
		t.Fatalf("re-declared revoked key: %d, want 401", r.status)
	}
}
