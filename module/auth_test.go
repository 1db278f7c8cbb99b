package module

import (
	"net/http"
	"net/http/httptest"
	"sort"
	"strings"
	"testing"
)

// threeKeySources is key_from header api-key, query api_key, bearer.
func threeKeySources(t *testing.T) []KeySource {
	t.Helper()
	sources, err := checkKeySources([]KeySource{{Header: "api-key"}, {Query: "api_key"}, {Bearer: true}})
	if err != nil {
		t.Fatal(err)
	}
	return sources
}

// TestExtractKey checks key_from as a user writes it: header names in any
// case, the sources tried in order, and only a Bearer Authorization taken.
func TestExtractKey(t *testing.T) {
	sources := threeKeySources(t)
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
		r := testRequest(tc.url, tc.headers)
		if got, _ := extractKey(r, sources); got != tc.want {
			t.Errorf("%s: key %q, want %q", tc.name, got, tc.want)
		}
	}

	r := httptest.NewRequest("GET", "/v1/x", nil)
	r.Header.Set("x-api-key", "default-source")
	if got, _ := extractKey(r, defaultKeySources); got != "default-source" {
		t.Errorf("default sources: key %q, want the X-API-Key header's", got)
	}
	if _, err := checkKeySources([]KeySource{{Header: "a", Bearer: true}}); err == nil {
		t.Error("a source with both a header and bearer was accepted")
	}
}

// testRequest is a GET of url with these headers.
func testRequest(url string, headers map[string]string) *http.Request {
	r := httptest.NewRequest("GET", url, nil)
	for k, v := range headers {
		r.Header.Set(k, v)
	}
	return r
}

// TestRemoveKey checks that a checked key leaves the request by the source
// that carried it, and nothing else does: other headers, the other query
// parameters in their order and encoding.
func TestRemoveKey(t *testing.T) {
	sources := threeKeySources(t)
	for _, tc := range []struct {
		name, url           string
		headers             map[string]string
		wantURI, wantHeader string // wantHeader: the headers left, as "Name=value;..."
	}{
		{"header", "/v1/x?api_key=q", map[string]string{"Api-Key": "k", "Authorization": "Bearer other"},
			"/v1/x?api_key=q", "Authorization=Bearer other"},
		{"query, every occurrence, others kept as sent", "/v1/x?a=1&api_key=k&b=%2F+x&api%5Fkey=k2&c",
			map[string]string{"Authorization": "Bearer other"}, "/v1/x?a=1&b=%2F+x&c", "Authorization=Bearer other"},
		{"query alone", "/v1/x?api_key=k", nil, "/v1/x", ""},
		{"a parameter that only starts like it stays", "/v1/x?api_key_hint=1&api_key=k", nil, "/v1/x?api_key_hint=1", ""},
		{"bearer", "/v1/x", map[string]string{"Authorization": "Bearer k", "X-Other": "1"}, "/v1/x", "X-Other=1"},
	} {
		r := testRequest(tc.url, tc.headers)
		key, source := extractKey(r, sources)
		if key == "" {
			t.Fatalf("%s: no key found", tc.name)
		}
		removeKey(r, source)
		checkURI(t, tc.name, r, tc.wantURI)
		if got := headersLeft(r); got != tc.wantHeader {
			t.Errorf("%s: headers left %q, want %q", tc.name, got, tc.wantHeader)
		}
		if k, _ := extractKey(r, sources); k == key {
			t.Errorf("%s: the key can still be read from the request", tc.name)
		}
	}
}

// TestRemoveKeysEverySource checks that, without forward_key, every
// configured key source leaves the request, not only the one whose key was
// checked: a second key sent beside the first must not reach the upstream.
// What is not a key source stays as sent.
func TestRemoveKeysEverySource(t *testing.T) {
	sources := threeKeySources(t)
	for _, tc := range []struct {
		name, url           string
		headers             map[string]string
		wantURI, wantHeader string
	}{
		{"all three", "/v1/x?x=1&api_key=k2", map[string]string{"Api-Key": "k1", "Authorization": "Bearer k3"}, "/v1/x?x=1", ""},
		{"header and bearer", "/v1/x", map[string]string{"Api-Key": "k1", "Authorization": "bearer k3", "X-Other": "1"}, "/v1/x", "X-Other=1"},
		{"basic auth is the upstream's", "/v1/x?api_key=k2", map[string]string{"Authorization": "Basic dXNlcjpwYXNz"}, "/v1/x", "Authorization=Basic dXNlcjpwYXNz"},
		{"a query without the parameter is kept as sent", "/v1/x?a&&b=%2F", map[string]string{"Api-Key": "k1"}, "/v1/x?a&&b=%2F", ""},
	} {
		r := testRequest(tc.url, tc.headers)
		removeKeys(r, sources)
		checkURI(t, tc.name, r, tc.wantURI)
		if got := headersLeft(r); got != tc.wantHeader {
			t.Errorf("%s: headers left %q, want %q", tc.name, got, tc.wantHeader)
		}
		if k, _ := extractKey(r, sources); k != "" {
			t.Errorf("%s: a key (%q) can still be read from the request", tc.name, k)
		}
	}
}

// headersLeft is r's headers as "Name=value;...", sorted.
func headersLeft(r *http.Request) string {
	var left []string
	for k, v := range r.Header {
		left = append(left, k+"="+strings.Join(v, ","))
	}
	sort.Strings(left)
	return strings.Join(left, ";")
}

// checkURI checks that both r.RequestURI and r.URL say want.
func checkURI(t *testing.T, name string, r *http.Request, want string) {
	t.Helper()
	if r.RequestURI != want || r.URL.RequestURI() != want {
		t.Errorf("%s: RequestURI %q, URL %q, want %q", name, r.RequestURI, r.URL.RequestURI(), want)
	}
}
