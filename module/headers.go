package module

import (
	"math/bits"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// policyState is one policy's item in the rate-limit headers.
type policyState struct {
	name      string
	policy    string // the RateLimit-Policy item
	limit     int64  // q
	remaining int64  // r
	wait      int64  // t, seconds
}

// setMeterHeaders writes the state of every policy that applied to the
// caller: RateLimit-Policy and RateLimit
// (draft-ietf-httpapi-ratelimit-headers-10, RFC 9651 lists; the rate or
// throttle item, then the quota item) and the de-facto
// X-RateLimit-Limit/Remaining/Reset (Reset in epoch seconds) for the most
// restrictive one.
//
// For a rate, t is when the caller's allowance is whole again; on a denial
// it is when the denied request would be admitted, which is also
// Retry-After. For the quota, t is the end of the period.
func setMeterHeaders(h http.Header, t *tierRuntime, out store.Reserved, period metering.Period, now time.Time) {
	var items [2]policyState
	n := 0
	switch {
	case out.Throttled:
		items[n] = rateState(t.throttleName, t.throttleHeader, t.throttle, out.Rate)
		n++
	case t.hasRate && !out.Duplicate && !out.QuotaExceeded:
		items[n] = rateState(t.rateName, t.policyHeader, t.policy, out.Rate)
		n++
	}
	if t.quotaMode != store.QuotaMeter {
		items[n] = policyState{
			name:      t.quotaName,
			policy:    strconv.Quote(t.quotaName) + ";q=" + strconv.FormatInt(t.included, 10) + ";w=" + strconv.FormatInt(period.Seconds(), 10),
			limit:     t.included,
			remaining: max(0, t.included-out.Used),
			wait:      period.SecondsLeft(now),
		}
		n++
	}
	if n == 0 {
		return
	}
	var policies, states strings.Builder
	most := 0
	for i, it := range items[:n] {
		if i > 0 {
			policies.WriteString(", ")
			states.WriteString(", ")
			if moreRestrictive(it, items[most]) {
				most = i
			}
		}
		policies.WriteString(it.policy)
		states.WriteString(strconv.Quote(it.name))
		states.WriteString(";r=")
		states.WriteString(strconv.FormatInt(it.remaining, 10))
		states.WriteString(";t=")
		states.WriteString(strconv.FormatInt(it.wait, 10))
	}
	m := items[most]
	h["Ratelimit-Policy"] = []string{policies.String()}
	h["Ratelimit"] = []string{states.String()}
	h["X-Ratelimit-Limit"] = []string{strconv.FormatInt(m.limit, 10)}
	h["X-Ratelimit-Remaining"] = []string{strconv.FormatInt(m.remaining, 10)}
	h["X-Ratelimit-Reset"] = []string{strconv.FormatInt(now.Unix()+m.wait, 10)}
}

// rateState is the header state of a GCRA decision.
func rateState(name, item string, p limiter.Policy, d limiter.Decision) policyState {
	wait := d.ResetAfter
	if !d.Allowed {
		wait = d.RetryAfter
	}
	var secs int64
	if wait > 0 {
		secs = ceilSeconds(wait)
	}
	return policyState{name: name, policy: item, limit: p.Limit, remaining: d.Remaining, wait: secs}
}

// moreRestrictive reports whether a leaves a smaller share of its limit
// than b (exact: a.r/a.q < b.r/b.q, compared as 128-bit products).
func moreRestrictive(a, b policyState) bool {
	if a.limit <= 0 || b.limit <= 0 {
		return a.remaining < b.remaining
	}
	ahi, alo := bits.Mul64(uint64(a.remaining), uint64(b.limit))
	bhi, blo := bits.Mul64(uint64(b.remaining), uint64(a.limit))
	return ahi < bhi || (ahi == bhi && alo < blo)
}
