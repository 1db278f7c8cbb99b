package module

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestKeyKeptFromUpstreamAndLogs checks what the README promises about
// where a key goes after the handler checked it: by default the upstream
// does not receive it (from a header, a query parameter or a Bearer
// Authorization), with forward_key it receives it unchanged, and an access
// log written with the README's filter records the key's id but never the
// key — while an unfiltered access log does record an X-API-Key header or
// a query-parameter key in clear, which is why the README gives the filter.
func TestKeyKeptFromUpstreamAndLogs(t *testing.T) {
	dir := t.TempDir()
	filtered, plain := filepath.Join(dir, "filtered.log"), filepath.Join(dir, "plain.log")
	const sources = `key_from header X-API-Key
			key_from query api_key
			key_from bearer`
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		store_path %s
		key_secret test-secret-0123456789
		tier pro {
			rate 1000/min
			endpoints /*
		}
		customer acme tier pro
		key %s acme
	}
}

:%d {
	log filtered {
		output file %s
		format filter {
			request>headers>X-Api-Key delete
			request>uri query {
				delete api_key
			}
		}
	}
	log_append key_id {http.api_monetize.key_id}
	handle /forwarded/* {
		api_monetize {
			%s
			forward_key
		}
		reverse_proxy 127.0.0.1:9384
	}
	handle {
		api_monetize {
			%s
		}
		reverse_proxy 127.0.0.1:9384
	}
}

:9385 {
	log {
		output file %s
	}
	api_monetize {
		%s
	}
	reverse_proxy 127.0.0.1:9384
}

:9384 {
	respond "x-api-key=[{header.X-API-Key}] authorization=[{header.Authorization}] uri=[{uri}]"
}
`, testAdminPort, testHTTPPort, filepath.Join(dir, "store.db"), proKey, testHTTPPort, filtered, sources, sources, plain, sources), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}

	type sent struct {
		name, path string
		header     http.Header
	}
	ways := []sent{
		{"header", "/v1/a?x=1", http.Header{"X-Api-Key": {proKey}}},
		{"query", "/v1/b?x=1&api_key=" + proKey + "&y=2", nil},
		{"bearer", "/v1/c", http.Header{"Authorization": {"Bearer " + proKey}}},
		// A second key beside the one checked reaches the upstream neither.
		{"three sources", "/v1/d?api_key=second-key-0123456789abcdef&x=1",
			http.Header{"X-Api-Key": {proKey}, "Authorization": {"Bearer third-key-0123456789abcdef"}}},
	}
	want := map[string]string{
		"header":        "x-api-key=[] authorization=[] uri=[/v1/a?x=1]",
		"query":         "x-api-key=[] authorization=[] uri=[/v1/b?x=1&y=2]",
		"bearer":        "x-api-key=[] authorization=[] uri=[/v1/c]",
		"three sources": "x-api-key=[] authorization=[] uri=[/v1/d?x=1]",
	}
	for _, w := range ways {
		r := do(t, http.MethodGet, testBase+w.path, w.header, "")
		if r.status != http.StatusOK || r.body != want[w.name] {
			t.Errorf("%s: the upstream got %q (status %d), want %q", w.name, r.body, r.status, want[w.name])
		}
		r = do(t, http.MethodGet, testBase+"/forwarded"+w.path, w.header, "")
		if r.status != http.StatusOK || !strings.Contains(r.body, proKey) {
			t.Errorf("%s with forward_key: the upstream got %q (status %d), want the key", w.name, r.body, r.status)
		}
		if r := do(t, http.MethodGet, "http://127.0.0.1:9385"+w.path, w.header, ""); r.status != http.StatusOK {
			t.Errorf("%s on the unfiltered site: status %d", w.name, r.status)
		}
	}

	// Caddy writes an access log entry after the response; wait for all
	// of them.
	read := func(path string, entries int) string {
		return eventually(5*time.Second, func() string { b, _ := os.ReadFile(path); return string(b) },
			func(s string) bool { return strings.Count(s, "\n") >= entries })
	}
	logged := read(filtered, 2*len(ways))
	if n := strings.Count(logged, "\n"); n != 2*len(ways) {
		t.Fatalf("filtered access log has %d entries, want %d:\n%s", n, 2*len(ways), logged)
	}
	if strings.Contains(logged, proKey) {
		t.Errorf("the filtered access log holds the key:\n%s", logged)
	}
	if n := strings.Count(logged, `"key_id":"key_`); n != 2*len(ways) {
		t.Errorf("the filtered access log names the key id in %d entries, want %d:\n%s", n, 2*len(ways), logged)
	}
	unfiltered := read(plain, len(ways))
	for _, part := range []string{`"X-Api-Key":["` + proKey, "api_key=" + proKey} {
		if !strings.Contains(unfiltered, part) {
			t.Errorf("the unfiltered access log does not hold %q; if Caddy now redacts it, update the README:\n%s", part, unfiltered)
		}
	}
}
