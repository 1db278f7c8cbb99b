package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// guardedHandler is a started app on the embedded store with
// auth_failures 5/min, its handler, and the store's lookup counter.
func guardedHandler(t *testing.T, limit *AuthFailureLimit) (*Handler, *countingStore) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	app := &App{
		StorePath: filepath.Join(t.TempDir(), "store.db"), KeySecret: "test-secret-0123456789",
		AuthFailures: limit,
		Tiers:        []Tier{{Name: "pro", Rate: &Rate{Limit: 1000, Window: caddy.Duration(time.Minute)}}},
		Customers:    []CustomerConfig{{ID: "acme", Tier: "pro"}},
		Keys:         []KeyConfig{{Key: proKey, Customer: "acme"}},
	}
	if err := app.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := app.shared.open()
	if err != nil {
		t.Fatal(err)
	}
	counting := &countingStore{Store: st}
	app.shared.st.Store(&storeBox{counting})
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = app.Stop()
		_ = app.Cleanup()
		cancel()
	})
	return &Handler{app: app, logger: app.logger, KeyFrom: defaultKeySources}, counting
}

// serveFrom sends GET /v1/x with key from the client address addr.
func serveFrom(t *testing.T, h *Handler, addr, key string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(http.MethodGet, "/v1/x", nil)
	r.RemoteAddr = addr + ":40000"
	if a, err := netip.ParseAddr(addr); err == nil && a.Is6() {
		r.RemoteAddr = "[" + addr + "]:40000"
	}
	r.Header.Set("X-API-Key", key)
	caddyhttp.NewTestReplacer(r)
	w := httptest.NewRecorder()
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusOK)
		return nil
	})
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatal(err)
	}
	return w
}

// unknownKey is the i-th of a scanner's guesses.
func unknownKey(i int) string { return fmt.Sprintf("guess-%04d-0123456789abcdef", i) }

// TestAuthFailuresThrottled is a key scanner: distinct unknown keys from
// one address cost at most the failure budget in store lookups, then get
// 429 problem+json with Retry-After (malformed keys too), while the valid
// key from the same address keeps working and another address keeps its
// own budget. IPv6 addresses count per /64.
func TestAuthFailuresThrottled(t *testing.T) {
	h, st := guardedHandler(t, &AuthFailureLimit{Rate: &Rate{Limit: 5, Window: caddy.Duration(time.Minute)}})
	const scanner, neighbour = "203.0.113.7", "203.0.113.8"
	if w := serveFrom(t, h, scanner, proKey); w.Code != http.StatusOK {
		t.Fatalf("valid key before the scan: %d %s", w.Code, w.Body)
	}
	before := st.lookups.Load()
	for i := range 100 {
		w := serveFrom(t, h, scanner, unknownKey(i))
		want := http.StatusUnauthorized
		if i >= 5 {
			want = http.StatusTooManyRequests
		}
		if w.Code != want {
			t.Fatalf("guess %d: %d %s, want %d", i+1, w.Code, w.Body, want)
		}
	}
	if n := st.lookups.Load() - before; n > 5 {
		t.Errorf("100 guesses from one address cost %d store lookups, want at most the 5 allowed failures", n)
	}
	w := serveFrom(t, h, scanner, unknownKey(1000))
	var p problem
	if err := json.Unmarshal(w.Body.Bytes(), &p); err != nil || p.Type != problemAuthThrottled || p.Status != http.StatusTooManyRequests {
		t.Errorf("throttled answer: %s (%v)", w.Body, err)
	}
	if ct := w.Header().Get("Content-Type"); ct != problemContentTypeHeader {
		t.Errorf("Content-Type %q", ct)
	}
	if ra, err := strconv.Atoi(w.Header().Get("Retry-After")); err != nil || ra < 1 || ra > 12 {
		t.Errorf("Retry-After %q, want the seconds until one more failure is allowed (12 s at 5/min)", w.Header().Get("Retry-After"))
	}
	if w := serveFrom(t, h, scanner, "short"); w.Code != http.StatusTooManyRequests {
		t.Errorf("malformed key from the throttled address: %d", w.Code)
	}

	// Successes are not throttled: the customer behind the same address
	// (a NAT) keeps working, and costs no failure.
	for i := range 20 {
		if w := serveFrom(t, h, scanner, proKey); w.Code != http.StatusOK {
			t.Fatalf("valid key from the throttled address, call %d: %d %s", i+1, w.Code, w.Body)
		}
	}
	// Another address has its own budget.
	if w := serveFrom(t, h, neighbour, unknownKey(2000)); w.Code != http.StatusUnauthorized {
		t.Errorf("another address: %d, want 401", w.Code)
	}
	// One IPv6 host cannot escape by rotating addresses within its /64.
	for i := range 10 {
		w := serveFrom(t, h, fmt.Sprintf("2001:db8:1:2::%x", i+1), unknownKey(3000+i))
		if want := map[bool]int{true: http.StatusUnauthorized, false: http.StatusTooManyRequests}[i < 5]; w.Code != want {
			t.Errorf("IPv6 guess %d from the same /64: %d, want %d", i+1, w.Code, want)
		}
	}
	if w := serveFrom(t, h, "2001:db8:1:3::1", unknownKey(4000)); w.Code != http.StatusUnauthorized {
		t.Errorf("another /64: %d, want 401", w.Code)
	}
}

// TestAuthFailuresOff checks that auth_failures off never throttles.
func TestAuthFailuresOff(t *testing.T) {
	h, _ := guardedHandler(t, &AuthFailureLimit{Off: true})
	for i := range 50 {
		if w := serveFrom(t, h, "203.0.113.7", unknownKey(i)); w.Code != http.StatusUnauthorized {
			t.Fatalf("guess %d: %d", i+1, w.Code)
		}
	}
}

// TestAuthGuardBounded checks that the throttle's memory does not grow
// with the number of addresses: a million distinct addresses failing leave
// the table its fixed size, and an address that never failed is not
// throttled by them.
func TestAuthGuardBounded(t *testing.T) {
	g, err := newAuthGuard(&AuthFailureLimit{Rate: &Rate{Limit: 1, Window: caddy.Duration(time.Hour)}})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	for i := range 1 << 20 {
		g.failed(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), now)
	}
	for i := range g.rows {
		if len(g.rows[i]) != authGuardSlots {
			t.Fatalf("row %d has %d slots", i, len(g.rows[i]))
		}
	}
	if throttled, _ := g.throttled(netip.MustParseAddr("10.0.0.1"), now); !throttled {
		t.Error("an address that failed is not throttled")
	}
	// 2^20 addresses over 2 x 2^15 slots fill every slot, so an address
	// that never failed is throttled too: the table degrades to a global
	// budget (which known-valid keys bypass), never to unbounded memory.
	if throttled, _ := g.throttled(netip.MustParseAddr("192.0.2.1"), now); !throttled {
		t.Error("a full table does not throttle a new address")
	}
	for i := range 1 << 18 {
		g.accepted(digest{byte(i), byte(i >> 8), byte(i >> 16)})
	}
	n := 0
	for i := range g.valid {
		n += len(g.valid[i].keys)
	}
	if n > authGuardValidShards*authGuardValidPerShard {
		t.Errorf("%d known-valid keys kept, more than the bound", n)
	}
}

// TestAuthFailuresClientIP checks, in Caddy, that the throttle counts
// Caddy's client IP: behind a trusted proxy each forwarded client has its
// own budget, while on a server that trusts no proxy a client cannot
// escape the throttle by sending a different X-Forwarded-For each time.
func TestAuthFailuresClientIP(t *testing.T) {
	loadCaddyfile(t, fmt.Sprintf(`servers :9386 {
		trusted_proxies static 127.0.0.1/32
	}
	api_monetize {
		store_path %s
		key_secret test-secret-0123456789
		auth_failures 3/min
		tier pro {
			rate 1000/min
		}
		customer acme tier pro
		key %s acme
	}`, filepath.Join(t.TempDir(), "store.db"), proKey), fmt.Sprintf(`:%d, :9386 {
	api_monetize
	respond "ok"
}
`, testHTTPPort))
	send := func(base, forwardedFor string, i int) int {
		h := http.Header{"X-Api-Key": {unknownKey(i)}, "X-Forwarded-For": {forwardedFor}}
		return do(t, http.MethodGet, base+"/v1/x", h, "").status
	}
	const trusted = "http://127.0.0.1:9386"
	for i := range 4 {
		want := map[bool]int{true: http.StatusUnauthorized, false: http.StatusTooManyRequests}[i < 3]
		if got := send(trusted, "198.51.100.1", i); got != want {
			t.Fatalf("behind the trusted proxy, client 198.51.100.1, guess %d: %d, want %d", i+1, got, want)
		}
	}
	if got := send(trusted, "198.51.100.2", 10); got != http.StatusUnauthorized {
		t.Errorf("behind the trusted proxy, another client: %d, want 401", got)
	}
	for i := range 4 {
		want := map[bool]int{true: http.StatusUnauthorized, false: http.StatusTooManyRequests}[i < 3]
		if got := send(testBase, fmt.Sprintf("192.0.2.%d", i+1), 20+i); got != want {
			t.Fatalf("untrusted X-Forwarded-For, guess %d: %d, want %d", i+1, got, want)
		}
	}
	if r := call(t, "/v1/x", proKey); r.status != http.StatusOK {
		t.Errorf("the configured key from the throttled address: %d %s", r.status, r.body)
	}
}

// TestParseAuthFailures checks the auth_failures option.
func TestParseAuthFailures(t *testing.T) {
	for _, tc := range []struct {
		line string
		want *AuthFailureLimit
		err  string
	}{
		{"auth_failures 5/min", &AuthFailureLimit{Rate: &Rate{Limit: 5, Window: caddy.Duration(time.Minute)}}, ""},
		{"auth_failures 100/hour burst 10", &AuthFailureLimit{Rate: &Rate{Limit: 100, Window: caddy.Duration(time.Hour), Burst: 10}}, ""},
		{"auth_failures off", &AuthFailureLimit{Off: true}, ""},
		{"auth_failures", nil, "auth_failures: expected 'off' or a rate"},
		{"auth_failures 0/min", nil, "at least 1"},
		{"auth_failures lots", nil, "auth_failures: expected 'off' or a rate"},
	} {
		d := caddyfile.NewTestDispenser("api_monetize {\n\t" + tc.line + "\n\ttier free\n}")
		app := new(App)
		err := app.UnmarshalCaddyfile(d)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), "Testfile:2") {
				t.Errorf("%q: error %v, want one at Testfile:2 containing %q", tc.line, err, tc.err)
			}
			continue
		}
		if err != nil || !reflect.DeepEqual(app.AuthFailures, tc.want) {
			t.Errorf("%q: %+v, %v; want %+v", tc.line, app.AuthFailures, err, tc.want)
		}
	}
}

// BenchmarkAuthGuardAccepted is what the throttle adds to an accepted
// request: the known-valid lookup of the key's digest (and removeKeys
// going over both default sources instead of one).
func BenchmarkAuthGuardAccepted(b *testing.B) {
	g, err := newAuthGuard(nil)
	if err != nil {
		b.Fatal(err)
	}
	sum := digest{1, 2, 3}
	g.accepted(sum)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if !g.knownValid(sum) {
				b.Fatal("not known")
			}
		}
	})
}

// BenchmarkRemoveKeys is removeKeys over the default sources (X-API-Key,
// then Bearer) for a request with the key in X-API-Key.
func BenchmarkRemoveKeys(b *testing.B) {
	r := httptest.NewRequest(http.MethodGet, "/v1/x?a=1", nil)
	b.ReportAllocs()
	for b.Loop() {
		r.Header["X-Api-Key"] = []string{"k"}
		removeKeys(r, defaultKeySources)
	}
}
