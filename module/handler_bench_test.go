package module

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// benchHandler provisions and starts an app and a handler outside a Caddy
// server, so a benchmark measures the plugin's own CPU per request: key
// check and lookup, endpoint check, reservation against the rate limit and
// the quota, metering headers and settlement of a billable response.
func benchHandler(b testing.TB, storeLine func(app *App)) (*Handler, func()) {
	b.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	app := &App{
		KeySecret: "bench-secret-0123456789",
		Tiers: []Tier{{
			Name:      "pro",
			Rate:      &Rate{Limit: 1_000_000_000, Window: caddy.Duration(time.Minute)},
			Included:  &Included{Units: 1_000_000_000_000, Interval: "month"},
			OverQuota: &OverQuota{Mode: "bill", PriceMicros: 2000},
			Endpoints: []string{"/v1/*"},
		}},
		Customers: []CustomerConfig{{ID: "acme", Tier: "pro"}},
		Keys:      []KeyConfig{{Key: "bench-key-0123456789abcdef", Customer: "acme"}},
	}
	storeLine(app)
	if err := app.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	if err := app.Start(); err != nil {
		b.Fatal(err)
	}
	h := &Handler{app: app, logger: app.logger, KeyFrom: defaultKeySources}
	return h, func() {
		_ = app.Stop()
		_ = app.Cleanup()
		cancel()
	}
}

func benchServe(b *testing.B, h *Handler) {
	benchServeNext(b, h, caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusOK)
		return nil
	}))
}

func benchServeNext(b *testing.B, h *Handler, next caddyhttp.Handler) {
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := httptest.NewRequest(http.MethodGet, "/v1/items", nil)
			r.Header.Set("X-API-Key", "bench-key-0123456789abcdef")
			caddyhttp.NewTestReplacer(r) // the replacer Caddy's server gives a request
			w := httptest.NewRecorder()
			if err := h.ServeHTTP(w, r, next); err != nil || w.Code != http.StatusOK {
				b.Fatalf("status %d, err %v", w.Code, err)
			}
		}
	})
}

// BenchmarkHandlerEmbedded is the handler's CPU per allowed, metered
// request on the embedded store.
func BenchmarkHandlerEmbedded(b *testing.B) {
	h, stop := benchHandler(b, func(app *App) { app.StorePath = filepath.Join(b.TempDir(), "store.db") })
	defer stop()
	benchServe(b, h)
}

// benchMeters adds two meters to the benchmark's app: tokens a trusted
// upstream reports (billed beyond 1e12 included) and response bytes (only
// metered).
func benchMeters(app *App) {
	app.Meters = []MeterConfig{
		{Name: "tokens", Source: MeterSource{Kind: "header", Header: "X-Tokens-Used", Max: 100000}},
		{Name: "download", Source: MeterSource{Kind: "response_bytes"}},
	}
	app.Tiers[0].Meters = []TierMeter{{Meter: "tokens", Included: &Included{Units: 1_000_000_000_000, Interval: "month"}, OverQuota: &OverQuota{Mode: "bill", PriceMicros: 10}}}
}

// BenchmarkHandlerEmbeddedTwoMeters is BenchmarkHandlerEmbedded with two
// meters whose amounts stay 0 (the upstream reports no tokens and writes
// no body): the reservation carries them, the headers list the tokens
// quota, no settlement is needed.
func BenchmarkHandlerEmbeddedTwoMeters(b *testing.B) {
	h, stop := benchHandler(b, func(app *App) {
		app.StorePath = filepath.Join(b.TempDir(), "store.db")
		benchMeters(app)
	})
	defer stop()
	benchServe(b, h)
}

// BenchmarkHandlerEmbeddedTwoMetersReported is the same with an upstream
// that reports 42 tokens and writes a 2-byte body: every request is
// settled once more (both meters changed).
func BenchmarkHandlerEmbeddedTwoMetersReported(b *testing.B) {
	h, stop := benchHandler(b, func(app *App) {
		app.StorePath = filepath.Join(b.TempDir(), "store.db")
		benchMeters(app)
	})
	defer stop()
	benchServeNext(b, h, caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.Header().Set("X-Tokens-Used", "42")
		w.WriteHeader(http.StatusOK)
		_, err := w.Write([]byte("ok"))
		return err
	}))
}

// BenchmarkHandlerRedis is the same on Redis (one round trip per request
// included).
func BenchmarkHandlerRedis(b *testing.B) {
	prefix := redisTestPrefix(b)
	h, stop := benchHandler(b, func(app *App) {
		app.Redis, app.RedisPrefix, app.StoreTimeout = testRedisURL, prefix, caddy.Duration(2*time.Second)
	})
	defer stop()
	benchServe(b, h)
}

// BenchmarkRequestSetup is the cost of building the benchmark's request and
// recorder alone, to subtract from the handler benchmarks.
func BenchmarkRequestSetup(b *testing.B) {
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := httptest.NewRequest(http.MethodGet, "/v1/items", nil)
			r.Header.Set("X-API-Key", "bench-key-0123456789abcdef")
			caddyhttp.NewTestReplacer(r) // the replacer Caddy's server gives a request
			_ = httptest.NewRecorder()
		}
	})
}

// BenchmarkResponseHeaders is the cost of the rate-limit headers in a
// proxied response's header map, per rate_limit_headers choice: the map
// starts with Caddy's Server header, gets the plugin's headers, then the
// four a minimal upstream sends (added as reverse_proxy copies them) and is
// read once in full (as net/http writes it). Past eight entries a Go map
// leaves its one-group form, so "both" (five headers) costs more than
// their count alone suggests.
func BenchmarkResponseHeaders(b *testing.B) {
	h, stop := benchHandler(b, func(app *App) { app.StorePath = filepath.Join(b.TempDir(), "store.db") })
	defer stop()
	tier := h.app.tiers[0]
	now := time.Now()
	period, _ := tier.period(now, time.Time{})
	out := store.Reserved{Allowed: true, Used: 1, Rate: limiter.Decision{Allowed: true, Remaining: 99}}
	upstream := []string{"Content-Length", "Content-Type", "Date", "Via"}
	for _, tc := range []struct {
		choice string
		sent   int
	}{{"none", 0}, {"ietf", 2}, {"legacy", 3}, {"both", 5}} {
		set, err := parseHeaderSet(tc.choice)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(tc.choice, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				hdr := make(http.Header)
				hdr["Server"] = []string{"Caddy"}
				setMeterHeaders(hdr, set, tier, tier, out, period, now)
				for _, k := range upstream {
					hdr.Add(k, "x")
				}
				n := 0
				for range hdr {
					n++
				}
				if n != 5+tc.sent {
					b.Fatalf("%d headers, want %d", n, 5+tc.sent)
				}
			}
		})
	}
}
