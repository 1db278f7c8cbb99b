package module

import (
	"context"
	"fmt"
	"net/http"
	"net/netip"
	"net/textproto"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// caller is an authenticated API caller.
type caller struct {
	key      store.Key
	customer store.Customer
	tier     *tierRuntime
	// placeholders provides the request placeholders (see Handler).
	placeholders caddy.ReplacerFunc
}

// defaultKeySources are used when a handler configures no key_from.
var defaultKeySources = []KeySource{{Header: "X-API-Key", canonical: "X-Api-Key"}, {Bearer: true}}

// authenticate identifies the caller of r, arrived at now, from the key in
// sources; its store calls end by ctx's deadline. When it returns false it
// has written the error response (401, 403 or 503).
func (a *App) authenticate(ctx context.Context, w http.ResponseWriter, r *http.Request, now time.Time, sources []KeySource, logger *zap.Logger) (caller, store.Store, bool) {
	m := getMetrics()
	key, _ := extractKey(r, sources)
	if key == "" {
		m.requests.WithLabelValues("none", decisionUnauthorized).Inc()
		w.Header().Set("WWW-Authenticate", authenticateMissingHeader)
		writeProblem(w, r, problem{
			Type: problemMissingKey, Title: "API key required", Status: http.StatusUnauthorized,
			Detail: "Send your API key in the " + keyHint(sources) + ".",
		}, 0)
		return caller{}, nil, false
	}
	guard := a.authGuard
	if apikey.Check(key) != nil {
		if guard != nil {
			address := clientAddress(r)
			if a.authThrottled(w, r, guard, address, now) {
				return caller{}, nil, false
			}
			guard.failed(address, now)
		}
		invalidKey(w, r)
		return caller{}, nil, false
	}

	a.waitReady(time.Second)
	st, err := a.store()
	if err != nil {
		storeUnavailable(w, r, logger, nil, "open", err)
		return caller{}, nil, false
	}
	hasher, err := a.hasher(ctx)
	if err != nil {
		storeUnavailable(w, r, logger, nil, "secret", err)
		return caller{}, nil, false
	}
	// A key this process accepted before skips the throttle: customers
	// behind the same address as a scanner keep working.
	sum := hasher.Sum(key)
	known := guard == nil || guard.knownValid(sum)
	var address netip.Addr
	if !known {
		address = clientAddress(r)
		if a.authThrottled(w, r, guard, address, now) {
			return caller{}, nil, false
		}
	}
	entry, err := a.shared.registry.lookup(ctx, st, sum, now)
	if err != nil {
		storeUnavailable(w, r, logger, nil, "lookup", err)
		return caller{}, nil, false
	}
	if !entry.found {
		if guard != nil {
			if known {
				address = clientAddress(r)
				guard.refused(sum)
			}
			guard.failed(address, now)
		}
		invalidKey(w, r)
		return caller{}, nil, false
	}
	// An expired key is not a failed authentication (auth_failures counts
	// malformed, unknown and revoked keys): it was valid, it is cached, and
	// its caller learns from the answer when it expired.
	if entry.key.Expired(now) {
		expiredKey(w, r, entry.key.ExpiresAt)
		return caller{}, nil, false
	}
	if !known {
		guard.accepted(sum)
	}
	entry.use.record(now)
	tier := a.tierByName[entry.customer.Tier]
	if tier == nil {
		if c := logger.Check(zapcore.WarnLevel, "customer is on a tier that is not configured"); c != nil {
			c.Write(zap.String("customer", entry.customer.ID), zap.String("tier", entry.customer.Tier))
		}
		m.requests.WithLabelValues("none", decisionForbidden).Inc()
		writeProblem(w, r, problem{
			Type: problemTierNotConfigured, Title: "Plan not available", Status: http.StatusForbidden,
			Detail: fmt.Sprintf("Your plan %q is not offered by this API any more; contact the API provider.", entry.customer.Tier),
			Tier:   entry.customer.Tier,
		}, 0)
		return caller{}, nil, false
	}
	return caller{key: entry.key, customer: entry.customer, tier: tier, placeholders: entry.placeholders}, st, true
}

// authThrottled answers 429 when address has spent its failed
// authentications, and reports whether it did.
func (a *App) authThrottled(w http.ResponseWriter, r *http.Request, guard *authGuard, address netip.Addr, now time.Time) bool {
	throttled, wait := guard.throttled(address, now)
	if !throttled {
		return false
	}
	getMetrics().requests.WithLabelValues("none", decisionAuthThrottled).Inc()
	writeProblem(w, r, problem{
		Type: problemAuthThrottled, Title: "Too many failed authentications", Status: http.StatusTooManyRequests,
		Detail: fmt.Sprintf("Too many requests from your address carried an invalid API key; retry after %d seconds with a valid key.", ceilSeconds(wait)),
	}, wait)
	return true
}

// extractKey returns the API key from the first source that has one, and
// that source.
func extractKey(r *http.Request, sources []KeySource) (string, KeySource) {
	for _, s := range sources {
		var v string
		switch {
		case s.Header != "":
			if vs := r.Header[s.canonical]; len(vs) > 0 {
				v = vs[0]
			}
		case s.Query != "":
			v = r.URL.Query().Get(s.Query)
		case s.Bearer:
			auth := r.Header.Get("Authorization")
			if len(auth) > 7 && strings.EqualFold(auth[:7], "bearer ") {
				v = auth[7:]
			}
		}
		if v = strings.TrimSpace(v); v != "" {
			return v, s
		}
	}
	return "", KeySource{}
}

// removeKeys takes every configured key source out of r, not only the one
// whose key was checked, so that a second key sent beside it (say in
// X-API-Key and in Authorization: Bearer) reaches neither the next handlers
// nor the upstream either.
func removeKeys(r *http.Request, sources []KeySource) {
	for _, s := range sources {
		removeKey(r, s)
	}
}

// removeKey takes source s out of r, so that neither the next handlers nor
// the upstream see a key there: the header, every Bearer Authorization
// value (other schemes, such as Basic, are the upstream's and are kept), or
// every occurrence of the query parameter (in r.URL and r.RequestURI; the
// other parameters are kept as sent).
func removeKey(r *http.Request, s KeySource) {
	switch {
	case s.Header != "":
		delete(r.Header, s.canonical)
	case s.Bearer:
		removeBearer(r.Header)
	case s.Query != "":
		q, removed := withoutParam(r.URL.RawQuery, s.Query)
		if !removed {
			return // not there: the request stays as sent
		}
		r.URL.RawQuery = q
		if path, query, ok := strings.Cut(r.RequestURI, "?"); ok {
			r.RequestURI = path
			if q, _ := withoutParam(query, s.Query); q != "" {
				r.RequestURI += "?" + q
			}
		}
	}
}

// removeBearer deletes the Authorization values that carry a Bearer token,
// keeping the others.
func removeBearer(h http.Header) {
	values, ok := h["Authorization"]
	if !ok {
		return
	}
	kept := values[:0:0]
	for _, v := range values {
		if !isBearer(v) {
			kept = append(kept, v)
		}
	}
	if len(kept) == 0 {
		delete(h, "Authorization")
		return
	}
	h["Authorization"] = kept
}

// isBearer reports whether an Authorization value uses the Bearer scheme.
func isBearer(v string) bool {
	return len(v) >= 7 && strings.EqualFold(v[:7], "bearer ")
}

// withoutParam is the raw query without the parameter name, matched as
// url.ParseQuery decodes names; the other parameters keep their order and
// encoding. removed reports whether the parameter was there; when it was
// not, the query is returned unchanged.
func withoutParam(rawQuery, name string) (query string, removed bool) {
	var kept []string
	for part := range strings.SplitSeq(rawQuery, "&") {
		k, _, _ := strings.Cut(part, "=")
		if key, err := url.QueryUnescape(k); err == nil && key == name {
			removed = true
			continue
		}
		if part != "" {
			kept = append(kept, part)
		}
	}
	if !removed {
		return rawQuery, false
	}
	return strings.Join(kept, "&"), true
}

// keyHint describes the key sources for error messages.
func keyHint(sources []KeySource) string {
	parts := make([]string, 0, len(sources))
	for _, s := range sources {
		switch {
		case s.Header != "":
			parts = append(parts, s.Header+" header")
		case s.Query != "":
			parts = append(parts, "'"+s.Query+"' query parameter")
		case s.Bearer:
			parts = append(parts, "Authorization header as 'Bearer <key>'")
		}
	}
	return strings.Join(parts, " or the ")
}

// checkKeySources validates a handler's key_from list, defaulting it.
func checkKeySources(sources []KeySource) ([]KeySource, error) {
	if len(sources) == 0 {
		return defaultKeySources, nil
	}
	checked := make([]KeySource, len(sources))
	for i, s := range sources {
		n := 0
		for _, set := range []bool{s.Header != "", s.Query != "", s.Bearer} {
			if set {
				n++
			}
		}
		if n != 1 {
			return nil, fmt.Errorf("key_from: each source sets exactly one of header, query or bearer")
		}
		s.canonical = textproto.CanonicalMIMEHeaderKey(s.Header)
		checked[i] = s
	}
	return checked, nil
}

func invalidKey(w http.ResponseWriter, r *http.Request) {
	getMetrics().requests.WithLabelValues("none", decisionUnauthorized).Inc()
	w.Header().Set("WWW-Authenticate", authenticateInvalidHeader)
	writeProblem(w, r, problem{
		Type: problemInvalidKey, Title: "Invalid API key", Status: http.StatusUnauthorized,
		Detail: "The API key is malformed, unknown or revoked.",
	}, 0)
}
