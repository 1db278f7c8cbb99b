package module

import (
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestUsageAfterAPIMonetize checks api_monetize_usage placed after
// api_monetize in a route, as a reader writes it: the caller who sent a key
// gets their usage (api_monetize checked the key and took it out of the
// request, and hands its identity on), not 401. The identity cannot be
// forged: a request variable of the same name set by the configuration is
// not an identity, and without api_monetize before it the usage handler
// still wants a key.
func TestUsageAfterAPIMonetize(t *testing.T) {
	dir := t.TempDir()
	loadCaddyfile(t, fmt.Sprintf(`api_monetize {
		store_path %s
		key_secret test-secret-0123456789
		tier pro {
			included 1000/month
			rate 1000/min
		}
		customer acme tier pro
		customer bigco tier pro
		key %s acme
		key %s bigco
	}`, filepath.Join(dir, "store.db"), proKey, entKey), fmt.Sprintf(`:%d {
	route /v1/usage {
		api_monetize
		api_monetize_usage
	}
	route /v2/usage {
		vars %s bigco
		api_monetize_usage
	}
	respond "ok"
}
`, testHTTPPort, identityVar))

	r := call(t, "/v1/usage", proKey)
	if r.status != http.StatusOK || !strings.Contains(r.body, `"customer":"acme"`) {
		t.Fatalf("usage behind api_monetize with a key: %d %s", r.status, r.body)
	}
	// Through Authorization: Bearer too.
	r = do(t, http.MethodGet, testBase+"/v1/usage", http.Header{"Authorization": {"Bearer " + entKey}}, "")
	if r.status != http.StatusOK || !strings.Contains(r.body, `"customer":"bigco"`) {
		t.Fatalf("usage behind api_monetize with a bearer key: %d %s", r.status, r.body)
	}
	if r := call(t, "/v1/usage", ""); r.status != http.StatusUnauthorized {
		t.Errorf("usage behind api_monetize without a key: %d %s", r.status, r.body)
	}
	// A variable named like the identity, set by the configuration, does
	// not identify anyone.
	if r := call(t, "/v2/usage", ""); r.status != http.StatusUnauthorized {
		t.Errorf("usage with a forged identity variable: %d %s", r.status, r.body)
	}
	r = call(t, "/v2/usage", proKey)
	if r.status != http.StatusOK || !strings.Contains(r.body, `"customer":"acme"`) {
		t.Errorf("usage alone with a key: %d %s", r.status, r.body)
	}
}

// loadCaddyfile loads a Caddyfile made of these global options (after the
// test's admin and ports) and these sites into the test's Caddy.
func loadCaddyfile(t *testing.T, globalOptions, sites string) {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(fmt.Sprintf("{\n\tadmin localhost:%d\n\thttp_port %d\n\thttps_port 9382\n\tgrace_period 1ns\n\t%s\n}\n\n%s",
		testAdminPort, testHTTPPort, globalOptions, sites), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
}
