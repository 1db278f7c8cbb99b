package module

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// costZeroUpstream reports tokens and a usage cost: /v1/chat/<n> reports
// n tokens and a cost of 5 in its header; /v1/stream/<n> reports n tokens
// as a trailer after a streamed body; /v1/costly/<n> reports a cost of n
// as a trailer after a streamed body, /v1/costly-header/<n> in the header.
func costZeroUpstream(t testing.TB) *httptest.Server {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		last := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1/chat/"):
			w.Header().Set("X-Tokens-Used", last)
			w.Header().Set("X-Cost", "5")
			fmt.Fprint(w, "chat")
		case strings.HasPrefix(r.URL.Path, "/v1/stream/"):
			w.Header().Set("Trailer", "X-Tokens-Used")
			fmt.Fprint(w, "streamed")
			w.(http.Flusher).Flush()
			w.Header().Set("X-Tokens-Used", last)
		case strings.HasPrefix(r.URL.Path, "/v1/costly/"):
			w.Header().Set("Trailer", "X-Cost, X-Other")
			fmt.Fprint(w, "streamed")
			w.(http.Flusher).Flush()
			w.Header().Set("X-Cost", last)
			w.Header().Set("X-Other", "kept")
		case strings.HasPrefix(r.URL.Path, "/v1/costly-header/"):
			w.Header().Set("Trailer", "X-Cost")
			w.Header().Set("X-Cost", last)
			fmt.Fprint(w, "plain")
			w.(http.Flusher).Flush()
			w.Header().Set("X-Cost", "999")
		default:
			fmt.Fprint(w, "ok")
		}
	}))
	t.Cleanup(up.Close)
	return up
}

// costZeroConfig bills chat calls by tokens only: they cost 0 units.
func costZeroConfig(storeLine, upstream string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		%s
		key_secret test-secret-0123456789
		store_timeout 2s
		usage_cost_header X-Cost
		meter tokens {
			source header X-Tokens-Used max 1000
		}
		tier chat {
			included 1/month
			over_quota block
			meter tokens {
				included 100/month
				over_quota block
			}
		}
		tier drip {
			rate 100/min
			meter tokens {
				included 10/month
				over_quota throttle 1/hour burst 1
			}
		}
		tier plain {
			included 1000/month
		}
		customer z1 tier chat
		customer z2 tier drip
		customer z3 tier plain
		key chat-key-0123456789abcdef z1
		key drip-key-0123456789abcdef z2
		key plain-key-0123456789abcde z3
	}
}

:%d {
	handle /v1/usage {
		api_monetize_usage
	}
	handle {
		api_monetize {
			cost /v1/chat/* 0
			cost /v1/stream/* 0
		}
		reverse_proxy %s
	}
}
`, testAdminPort, testHTTPPort, storeLine, testHTTPPort, strings.TrimPrefix(upstream, "http://"))
}

// getWithTrailers sends a GET with key and returns the response with its
// body read (so its trailers are in).
func getWithTrailers(t *testing.T, path, key string) (*http.Response, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, testBase+path, nil)
	req.Header.Set("X-API-Key", key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	return res, string(body)
}

// TestMetersCostZero: a request whose cost is 0 makes only the default
// meter free; its other meters are counted, blocked and throttled as for
// any cost (issue 21's money bug: `cost /v1/chat/* 0` with a tokens meter
// served every token unbilled).
func TestMetersCostZero(t *testing.T) {
	forEachSingleStore(t, func(t *testing.T, storeLine string) {
		up := costZeroUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(costZeroConfig(storeLine, up.URL), "caddyfile")

		t.Run("TokensCountedAndBlocked", func(t *testing.T) {
			const key = "chat-key-0123456789abcdef"
			tokens := getMetrics().meterUnits.WithLabelValues("chat", "tokens")
			tokensBefore := testutil.ToFloat64(tokens)
			for i, v := range []string{"60", "30"} {
				r := call(t, "/v1/chat/"+v, key)
				if r.status != http.StatusOK || r.body != "chat" {
					t.Fatalf("call %d: %d %s", i+1, r.status, r.body)
				}
				if r.header.Get("X-Tokens-Used") != "" || r.header.Get("X-Cost") != "" {
					t.Errorf("call %d: the upstream's meter headers reached the client: %v", i+1, r.header)
				}
			}
			// Tokens reported as a trailer by a streamed free call count too.
			if res, body := getWithTrailers(t, "/v1/stream/15", key); res.StatusCode != http.StatusOK || body != "streamed" {
				t.Fatalf("stream: %d %q", res.StatusCode, body)
			}
			// 105 ≥ 100 tokens: refused before the upstream, naming the meter.
			r := call(t, "/v1/chat/1", key)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("after the tokens quota: %d %s; want 429", r.status, r.body)
			}
			if p := r.problem(t); fmt.Sprint(p["violated-policies"]) != "[chat-tokens-month]" {
				t.Errorf("problem %s; want chat-tokens-month", r.body)
			}
			v := usageOf(t, "z1")
			if tok := meterOf(v, "tokens"); tok.Billed != 105 || tok.Overage != 5 || tok.Requests != 3 {
				t.Errorf("tokens %+v; want 105 billed (5 beyond the quota) in 3 requests", tok)
			}
			// The default meter stays free: no unit, no request, and the
			// upstream's X-Cost of a free call is not billed.
			if v.Billed != 0 || v.Requests != 0 {
				t.Errorf("default meter %+v; want nothing (the calls cost 0)", v.Counters)
			}
			if n := testutil.ToFloat64(tokens) - tokensBefore; n != 105 {
				t.Errorf("meter_units_total{tier=chat,meter=tokens} grew by %v; want 105", n)
			}
		})

		t.Run("ThrottleEnforced", func(t *testing.T) {
			const key = "drip-key-0123456789abcdef"
			if r := call(t, "/v1/chat/20", key); r.status != http.StatusOK {
				t.Fatalf("first call: %d %s", r.status, r.body)
			}
			// 20 ≥ 10 tokens: the throttle (1/hour, burst 1) applies to
			// free calls too, one unit each.
			r := call(t, "/v1/chat/1", key)
			if r.status != http.StatusOK || !strings.HasPrefix(r.header.Get("RateLimit-Policy"), `"drip-tokens-throttle-hour";q=1;w=3600`) {
				t.Fatalf("throttled call: %d %q", r.status, r.header.Get("RateLimit-Policy"))
			}
			r = call(t, "/v1/chat/1", key)
			if r.status != http.StatusTooManyRequests {
				t.Fatalf("over the throttle: %d %s; want 429", r.status, r.body)
			}
			if p := r.problem(t); fmt.Sprint(p["violated-policies"]) != "[drip-tokens-throttle-hour]" {
				t.Errorf("problem %s", r.body)
			}
			if tok := meterOf(usageOf(t, "z2"), "tokens"); tok.Billed != 21 {
				t.Errorf("tokens %+v; want 21", tok)
			}
		})

		t.Run("CostTrailerCountedAndHidden", func(t *testing.T) {
			const key = "plain-key-0123456789abcde"
			res, body := getWithTrailers(t, "/v1/costly/7", key)
			if res.StatusCode != http.StatusOK || body != "streamed" {
				t.Fatalf("costly: %d %q", res.StatusCode, body)
			}
			if _, leaked := res.Trailer["X-Cost"]; leaked || strings.Contains(strings.Join(res.Header.Values("Trailer"), ","), "Cost") {
				t.Errorf("the cost trailer reached the client: trailer %v, announced %q", res.Trailer, res.Header.Values("Trailer"))
			}
			if res.Trailer.Get("X-Other") != "kept" {
				t.Errorf("another trailer was lost: %v", res.Trailer)
			}
			if got := usageOf(t, "z3").Billed; got != 7 {
				t.Errorf("default meter billed %d; want the trailer's 7", got)
			}
			// A value in the header wins over a trailer.
			res, _ = getWithTrailers(t, "/v1/costly-header/3", key)
			if _, leaked := res.Trailer["X-Cost"]; leaked || res.Header.Get("X-Cost") != "" {
				t.Errorf("the cost header reached the client: header %v, trailer %v", res.Header, res.Trailer)
			}
			if got := usageOf(t, "z3").Billed; got != 10 {
				t.Errorf("default meter billed %d; want 7 + the header's 3", got)
			}
		})
	})
}
