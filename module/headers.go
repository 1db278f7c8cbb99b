package module

import (
	"fmt"
	"math/bits"
	"net/http"
	"strconv"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// headerSet is which rate-limit headers responses carry (App.RateLimitHeaders).
type headerSet uint8

const (
	// headersIETF: RateLimit-Policy and RateLimit.
	headersIETF headerSet = 1 << iota
	// headersLegacy: X-RateLimit-Limit, -Remaining and -Reset.
	headersLegacy
)

// parseHeaderSet reads a rate_limit_headers value.
func parseHeaderSet(v string) (headerSet, error) {
	switch v {
	case "", "both":
		return headersIETF | headersLegacy, nil
	case "ietf":
		return headersIETF, nil
	case "legacy":
		return headersLegacy, nil
	case "none":
		return 0, nil
	}
	return 0, fmt.Errorf("rate_limit_headers: expected both, ietf, legacy or none, got %q", v)
}

// policyState is one policy's item in the rate-limit headers.
type policyState struct {
	quotedName string // the policy name as an RFC 9651 String
	policy     string // the RateLimit-Policy item, or "" for a quota item
	limit      int64  // q
	remaining  int64  // r
	wait       int64  // t, seconds
	window     int64  // w of a quota item
}

// setMeterHeaders writes the state of every policy that applied to the
// caller, in the headers of set: RateLimit-Policy and RateLimit
// (draft-ietf-httpapi-ratelimit-headers-10, RFC 9651 lists; the rate or
// throttle item, then the quota item) and the de-facto
// X-RateLimit-Limit/Remaining/Reset (Reset in epoch seconds) for the most
// restrictive one.
//
// For a rate, t is when the caller's allowance is whole again; on a denial
// it is when the denied request would be admitted, which is also
// Retry-After. For the quota, t is the end of the period.
//
// It runs on every request, so all values are built in one buffer and
// share one string.
func setMeterHeaders(h http.Header, set headerSet, t, throttle *tierRuntime, out store.Reserved, period metering.Period, now time.Time) {
	if set == 0 {
		return
	}
	var arr [2]policyState
	items := arr[:0]
	switch {
	case out.Throttled:
		items = append(items, rateState(throttle.throttleQuoted, throttle.throttleHeader, throttle.throttle, out.Rate))
	case t.hasRate && !out.QuotaExceeded:
		items = append(items, rateState(t.rateQuoted, t.policyHeader, t.policy, out.Rate))
	}
	if t.quotaMode != store.QuotaMeter {
		items = append(items, policyState{
			quotedName: t.quotaQuoted,
			limit:      t.included,
			remaining:  max(0, t.included-out.Used),
			wait:       period.SecondsLeft(now),
			window:     period.Seconds(),
		})
	}
	for i, tm := range t.meters { // one quota item per meter with included units
		if !tm.hasQuota() || i >= len(out.Meters) {
			continue
		}
		q := tm.quota
		items = append(items, policyState{
			quotedName: q.quotaQuoted,
			limit:      q.included,
			remaining:  max(0, q.included-out.Meters[i].Used),
			wait:       period.SecondsLeft(now),
			window:     period.Seconds(),
		})
	}
	n := len(items)
	if n == 0 {
		return
	}

	buf := make([]byte, 0, 256)
	var ends [5]int
	k := 0
	if set&headersIETF != 0 {
		for i, it := range items {
			if i > 0 {
				buf = append(buf, ", "...)
			}
			if it.policy != "" {
				buf = append(buf, it.policy...)
			} else {
				buf = append(buf, it.quotedName...)
				buf = append(buf, ";q="...)
				buf = strconv.AppendInt(buf, it.limit, 10)
				buf = append(buf, ";w="...)
				buf = strconv.AppendInt(buf, it.window, 10)
			}
		}
		ends[k], k = len(buf), k+1
		for i, it := range items {
			if i > 0 {
				buf = append(buf, ", "...)
			}
			buf = append(buf, it.quotedName...)
			buf = append(buf, ";r="...)
			buf = strconv.AppendInt(buf, it.remaining, 10)
			buf = append(buf, ";t="...)
			buf = strconv.AppendInt(buf, it.wait, 10)
		}
		ends[k], k = len(buf), k+1
	}
	if set&headersLegacy != 0 {
		m := items[0]
		for _, it := range items[1:] {
			if moreRestrictive(it, m) {
				m = it
			}
		}
		buf = strconv.AppendInt(buf, m.limit, 10)
		ends[k], k = len(buf), k+1
		buf = strconv.AppendInt(buf, m.remaining, 10)
		ends[k], k = len(buf), k+1
		const second = int64(time.Second)
		buf = strconv.AppendInt(buf, (now.UnixNano()+second-1)/second+m.wait, 10) // never before the reset
		ends[k], k = len(buf), k+1
	}

	// One string and one slice hold every value.
	all := string(buf)
	vals := make([]string, k)
	from := 0
	for i, end := range ends[:k] {
		vals[i], from = all[from:end], end
	}
	if set&headersIETF != 0 {
		h["Ratelimit-Policy"] = vals[0:1:1]
		h["Ratelimit"] = vals[1:2:2]
		vals = vals[2:]
	}
	if set&headersLegacy != 0 {
		h["X-Ratelimit-Limit"] = vals[0:1:1]
		h["X-Ratelimit-Remaining"] = vals[1:2:2]
		h["X-Ratelimit-Reset"] = vals[2:3:3]
	}
}

// rateState is the header state of a GCRA decision.
func rateState(quotedName, item string, p limiter.Policy, d limiter.Decision) policyState {
	wait := d.ResetAfter
	if !d.Allowed {
		wait = d.RetryAfter
	}
	var secs int64
	if wait > 0 {
		secs = ceilSeconds(wait)
	}
	return policyState{quotedName: quotedName, policy: item, limit: p.Limit, remaining: d.Remaining, wait: secs}
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
