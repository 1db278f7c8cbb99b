package module

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestAdminErrorBodies checks what an admin client sees when a request is
// refused: the status, Content-Type application/json and the body
// {"error": "<message>"} that Caddy's admin API answers with, whichever
// check refused it (read-only admin, a bad body, a bad tier, the store
// unavailable, an unknown customer).
func TestAdminErrorBodies(t *testing.T) {
	var api adminAPI
	if err := api.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	down := &shared{openFn: func() (store.Store, error) { return nil, fmt.Errorf("dial: %w", store.ErrUnavailable) }}
	tiers := map[string]*tierRuntime{"free": {Tier: Tier{Name: "free"}}}
	for _, c := range []struct {
		name, adminAPI, method, path, body string
		status                             int
		message                            string
	}{
		{"read only", "read_only", http.MethodPost, "/api_monetize/customers", `{"id":"a","tier":"free"}`, http.StatusForbidden, "changes through the admin API are disabled"},
		{"bad JSON", "read_write", http.MethodPost, "/api_monetize/customers", `{"id":`, http.StatusBadRequest, "invalid JSON body: "},
		{"bad tier", "read_write", http.MethodPost, "/api_monetize/customers", `{"id":"a","tier":"gold"}`, http.StatusBadRequest, `tier: expected one of ["free"], got "gold"`},
		{"bad key body", "read_write", http.MethodPost, "/api_monetize/customers/a/keys", `{"overlap":"1h"}`, http.StatusBadRequest, "overlap: not accepted here"},
		{"store down", "read_only", http.MethodGet, "/api_monetize/customers", "", http.StatusServiceUnavailable, "opening the api_monetize store: dial: "},
		{"store down, change", "read_write", http.MethodPost, "/api_monetize/customers", `{"id":"a","tier":"free"}`, http.StatusServiceUnavailable, "opening the api_monetize store"},
		{"bad audit limit", "read_only", http.MethodGet, "/api_monetize/audit?limit=0", "", http.StatusBadRequest, "limit: expected a whole number"},
		{"no stripe", "read_only", http.MethodGet, "/api_monetize/stripe/reconciliation", "", http.StatusNotFound, "stripe is not configured"},
	} {
		api.app = &App{AdminAPI: c.adminAPI, shared: down, tierByName: tiers, tiers: []*tierRuntime{tiers["free"]}}
		w := httptest.NewRecorder()
		r := httptest.NewRequest(c.method, c.path, strings.NewReader(c.body))
		if err := api.Routes()[0].Handler.ServeHTTP(w, r); err != nil {
			t.Errorf("%s: handed %v back to Caddy's admin server; want it answered", c.name, err)
			continue
		}
		var body map[string]string
		err := json.Unmarshal(w.Body.Bytes(), &body)
		if w.Code != c.status || w.Header().Get("Content-Type") != "application/json" || err != nil || len(body) != 1 || !strings.HasPrefix(body["error"], c.message) {
			t.Errorf("%s: %d %q %s; want %d application/json {\"error\": %q…}", c.name, w.Code, w.Header().Get("Content-Type"), w.Body, c.status, c.message)
		}
	}
}
