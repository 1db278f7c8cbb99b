package module

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// pathsUpstream reports tokens on every path: /v1/chat/<n> reports n, any
// other path 7 (which a meter whose paths exclude it must not count).
func pathsUpstream(t testing.TB) *httptest.Server {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := "7"
		if rest, ok := strings.CutPrefix(r.URL.Path, "/v1/chat/"); ok {
			n = rest
		}
		w.Header().Set("X-Tokens-Used", n)
		fmt.Fprint(w, "ok")
	}))
	t.Cleanup(up.Close)
	return up
}

// pathsConfig limits the tokens meter to the chat endpoints; /health is
// free (cost 0) and outside it.
func pathsConfig(storeLine, upstream string) string {
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
			paths /v1/chat/*
			paths /v1/complete/*
		}
		tier chat {
			included 1000/month
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
		customer z1 tier chat
		customer z2 tier drip
		key chat-key-0123456789abcdef z1
		key drip-key-0123456789abcdef z2
	}
}

:%d {
	handle /v1/usage {
		api_monetize_usage
	}
	handle {
		api_monetize {
			cost /health 0
			cost /v1/chat/* 0
		}
		reverse_proxy %s
	}
}
`, testAdminPort, testHTTPPort, storeLine, testHTTPPort, strings.TrimPrefix(upstream, "http://"))
}

// TestMeterPaths: a meter applies to its paths only. A request outside
// them is neither counted nor refused by it: a free health check passes
// while the tokens meter is used up (block) or throttled, a paid call
// outside the paths counts its cost but not the tokens its upstream
// reports; calls inside the paths still count and are refused.
func TestMeterPaths(t *testing.T) {
	forEachSingleStore(t, func(t *testing.T, storeLine string) {
		up := pathsUpstream(t)
		tester := newTester(t, testConfig{})
		tester.InitServer(pathsConfig(storeLine, up.URL), "caddyfile")

		t.Run("Block", func(t *testing.T) {
			const key = "chat-key-0123456789abcdef"
			for _, n := range []string{"60", "50"} {
				if r := call(t, "/v1/chat/"+n, key); r.status != http.StatusOK {
					t.Fatalf("chat %s: %d %s", n, r.status, r.body)
				}
			}
			if r := call(t, "/v1/chat/1", key); r.status != http.StatusTooManyRequests {
				t.Fatalf("chat after the tokens quota: %d %s; want 429", r.status, r.body)
			}
			for i := range 3 {
				r := call(t, "/health", key)
				if r.status != http.StatusOK {
					t.Fatalf("health %d with the tokens meter used up: %d %s; want 200 (outside the meter's paths)", i, r.status, r.body)
				}
				if r.header.Get("X-Tokens-Used") != "" {
					t.Errorf("health: the upstream's tokens header reached the client")
				}
				if strings.Contains(r.header.Get("RateLimit-Policy"), "tokens") {
					t.Errorf("health: RateLimit-Policy %q names the tokens meter, which does not apply", r.header.Get("RateLimit-Policy"))
				}
			}
			r := call(t, "/v1/other", key) // cost 1, outside the paths
			if r.status != http.StatusOK || r.header.Get("X-Tokens-Used") != "" {
				t.Fatalf("other: %d %v", r.status, r.header)
			}
			v := usageOf(t, "z1")
			if tok := meterOf(v, "tokens"); tok.Billed != 110 || tok.Requests != 2 {
				t.Errorf("tokens %+v; want 110 in 2 requests (the chat calls only)", tok)
			}
			if v.Billed != 1 || v.Requests != 1 {
				t.Errorf("default meter %+v; want the one paid call", v.Counters)
			}
		})

		t.Run("Throttle", func(t *testing.T) {
			const key = "drip-key-0123456789abcdef"
			if r := call(t, "/v1/chat/20", key); r.status != http.StatusOK {
				t.Fatalf("chat: %d %s", r.status, r.body)
			}
			// The tokens meter is used up: its throttle (1/hour, burst 1)
			// would refuse the second free call it applies to.
			for i := range 3 {
				if r := call(t, "/health", key); r.status != http.StatusOK {
					t.Fatalf("health %d: %d %s; want 200 (outside the throttled meter's paths)", i, r.status, r.body)
				}
			}
			if r := call(t, "/v1/chat/1", key); r.status != http.StatusOK {
				t.Fatalf("first throttled chat: %d %s", r.status, r.body)
			}
			if r := call(t, "/v1/chat/1", key); r.status != http.StatusTooManyRequests {
				t.Fatalf("second throttled chat: %d %s; want 429", r.status, r.body)
			}
			if tok := meterOf(usageOf(t, "z2"), "tokens"); tok.Billed != 21 {
				t.Errorf("tokens %+v; want 21", tok)
			}
		})
	})
}

func TestParseMeterPaths(t *testing.T) {
	app, err := parseGlobal("api_monetize {\n\tmeter m {\n\t\tpaths /v1/chat/*\n\t\tsource cost\n\t\tpaths /v1/complete/* /v2/*\n\t}\n\ttier t\n}")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := app.Meters[0].Paths, []string{"/v1/chat/*", "/v1/complete/*", "/v2/*"}; !reflect.DeepEqual(got, want) {
		t.Errorf("paths %q; want %q", got, want)
	}
	for _, tc := range []struct {
		name, input string
		line        int
		want        string
	}{
		{"no pattern", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t\tpaths\n\t}\n\ttier t\n}", 4, "meter m: paths: expected at least one path pattern"},
		{"bad pattern", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t\tpaths /a\n\t\tpaths b\n\t}\n\ttier t\n}", 5, "meter m: paths: path pattern 'b' must start with '/'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseApp(caddyfile.NewTestDispenser(tc.input), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), fmt.Sprintf("Testfile:%d", tc.line)) {
				t.Fatalf("error %v; want %q at line %d", err, tc.want, tc.line)
			}
		})
	}
}
