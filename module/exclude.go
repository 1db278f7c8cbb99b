package module

import (
	"context"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// excludeGaps lists, for each exclude pattern written "P/*", the path P
// when no exclude pattern matches P itself: Caddy's "/v1/admin/*" matches
// /v1/admin/ and below but not /v1/admin, which a reader of
// `exclude /v1/admin/*` expects excluded too. The answer is, in order,
// the paths left reachable.
func excludeGaps(patterns []string) []string {
	m := caddyhttp.MatchPath(append([]string(nil), patterns...))
	if err := m.Provision(caddy.Context{}); err != nil {
		return nil
	}
	var gaps []string
	for _, p := range patterns {
		base, ok := strings.CutSuffix(p, "/*")
		if !ok || base == "" || strings.ContainsAny(base, "*%") {
			continue
		}
		// Built by hand: the pattern is operator input, which may hold what
		// a URL parser refuses (httptest.NewRequest would panic on it).
		ctx := context.WithValue(context.Background(), caddy.ReplacerCtxKey, caddy.NewReplacer()) // the matcher reads it
		r := (&http.Request{Method: http.MethodGet, URL: &url.URL{Path: base}, Header: http.Header{}}).WithContext(ctx)
		if matched, _ := m.MatchWithError(r); !matched {
			gaps = append(gaps, base)
		}
	}
	return gaps
}

// excludeGapAdvice words one gap for a warning.
func excludeGapAdvice(tier, gap string) string {
	return "tier " + tier + ": exclude " + gap + "/* leaves " + gap + " itself reachable (a path pattern ending in /* does not match the path without the slash); add " + gap + " to the exclude list to refuse it too"
}
