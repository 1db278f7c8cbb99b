package module

import (
	"net/http/httptest"
	"testing"
)

// TestExtractKey checks key_from as a user writes it: header names in any
// case, the sources tried in order, and only a Bearer Authorization taken.
func TestExtractKey(t *testing.T) {
	sources, err := checkKeySources([]KeySource{{Header: "api-key"}, {Query: "api_key"}, {Bearer: true}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, url string
		headers   map[string]string
		want      string
	}{
		{"header, other case", "/v1/x", map[string]string{"API-KEY": "from-header"}, "from-header"},
		{"header before query", "/v1/x?api_key=from-query", map[string]string{"Api-Key": "from-header"}, "from-header"},
		{"query", "/v1/x?api_key=from-query", nil, "from-query"},
		{"bearer, any case, trimmed", "/v1/x", map[string]string{"Authorization": "bearer  from-bearer "}, "from-bearer"},
		{"basic auth is not a key", "/v1/x", map[string]string{"Authorization": "Basic dXNlcjpwYXNz"}, ""},
		{"empty header falls through", "/v1/x?api_key=q", map[string]string{"Api-Key": " "}, "q"},
		{"none", "/v1/x", nil, ""},
	} {
		r := httptest.NewRequest("GET", tc.url, nil)
		for k, v := range tc.headers {
			r.Header.Set(k, v)
		}
		if got := extractKey(r, sources); got != tc.want {
			t.Errorf("%s: key %q, want %q", tc.name, got, tc.want)
		}
	}

	r := httptest.NewRequest("GET", "/v1/x", nil)
	r.Header.Set("x-api-key", "default-source")
	if got := extractKey(r, defaultKeySources); got != "default-source" {
		t.Errorf("default sources: key %q, want the X-API-Key header's", got)
	}
	if _, err := checkKeySources([]KeySource{{Header: "a", Bearer: true}}); err == nil {
		t.Error("a source with both a header and bearer was accepted")
	}
}
