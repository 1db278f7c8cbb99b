package module

import (
	"net/http"
	"strconv"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// setRateHeaders writes the rate-limit state of a decision:
// RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers-10,
// RFC 9651 lists) and the de-facto X-RateLimit-Limit/Remaining/Reset
// (Reset in epoch seconds).
//
// t (and X-RateLimit-Reset) is when the caller's allowance is whole again;
// on a denial it is when the denied request would be admitted, which is
// also Retry-After.
func setRateHeaders(h http.Header, t *tierRuntime, d limiter.Decision, now time.Time) {
	wait := d.ResetAfter
	if !d.Allowed {
		wait = d.RetryAfter
	}
	var secs int64
	if wait > 0 {
		secs = ceilSeconds(wait)
	}
	remaining := strconv.FormatInt(d.Remaining, 10)

	buf := make([]byte, 0, len(t.rateName)+40)
	buf = strconv.AppendQuote(buf, t.rateName)
	buf = append(buf, ";r="...)
	buf = append(buf, remaining...)
	buf = append(buf, ";t="...)
	buf = strconv.AppendInt(buf, secs, 10)

	h["Ratelimit-Policy"] = []string{t.policyHeader}
	h["Ratelimit"] = []string{string(buf)}
	h["X-Ratelimit-Limit"] = []string{strconv.FormatInt(t.policy.Limit, 10)}
	h["X-Ratelimit-Remaining"] = []string{remaining}
	h["X-Ratelimit-Reset"] = []string{strconv.FormatInt(ceilUnix(now.Add(wait)), 10)}
}

// ceilUnix is t in epoch seconds, rounded up.
func ceilUnix(t time.Time) int64 {
	const second = int64(time.Second)
	return (t.UnixNano() + second - 1) / second
}
