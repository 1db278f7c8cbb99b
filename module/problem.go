package module

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Problem types (RFC 9457). Rate and quota denials use the IANA-registered
// types from draft-ietf-httpapi-ratelimit-headers; the others are this
// plugin's, documented in its README.
const (
	problemQuotaExceeded      = "https://iana.org/assignments/http-problem-types#quota-exceeded"
	problemReducedCapacity    = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
	problemTypeBase           = "https://github.com/apimonetize/caddy-api-monetize#problem-"
	problemMissingKey         = problemTypeBase + "missing-api-key"
	problemInvalidKey         = problemTypeBase + "invalid-api-key"
	problemExpiredKey         = problemTypeBase + "expired-api-key"
	problemAuthThrottled      = problemTypeBase + "auth-throttled"
	problemEndpointNotInTier  = problemTypeBase + "endpoint-not-in-tier"
	problemTierNotConfigured  = problemTypeBase + "tier-not-configured"
	problemCostExceedsBurst   = problemTypeBase + "cost-exceeds-burst"
	problemContentTypeHeader  = "application/problem+json"
	authenticateMissingHeader = `Bearer realm="api", charset="UTF-8"`
	authenticateInvalidHeader = `Bearer realm="api", error="invalid_token", error_description="unknown or revoked API key"`
	authenticateExpiredHeader = `Bearer realm="api", error="invalid_token", error_description="expired API key"`
)

// problem is an RFC 9457 problem details body.
type problem struct {
	Type     string `json:"type"`
	Title    string `json:"title"`
	Status   int    `json:"status"`
	Detail   string `json:"detail"`
	Instance string `json:"instance,omitempty"`
	// ViolatedPolicies names the RateLimit policies that denied the request.
	ViolatedPolicies []string `json:"violated-policies,omitempty"`
	// Tier is the caller's tier.
	Tier string `json:"tier,omitempty"`
	// Feature is the feature the request needs (require_feature).
	Feature string `json:"feature,omitempty"`
	// Upgrade tells the caller how to get what was denied.
	Upgrade *upgradeHint `json:"upgrade,omitempty"`
}

// upgradeHint lists the tiers that would allow the request and where to
// change plan.
type upgradeHint struct {
	Tiers []string `json:"tiers"`
	URL   string   `json:"url,omitempty"`
}

// writeProblem sends p as application/problem+json. retryAfter, when
// positive, is sent as Retry-After in whole seconds, rounded up.
func writeProblem(w http.ResponseWriter, r *http.Request, p problem, retryAfter time.Duration) {
	h := w.Header()
	h.Set("Content-Type", problemContentTypeHeader)
	h.Set("Cache-Control", "no-store")
	if retryAfter > 0 {
		h.Set("Retry-After", strconv.FormatInt(ceilSeconds(retryAfter), 10))
	}
	p.Instance = r.URL.Path
	body, _ := json.Marshal(p) // fields are strings, ints and slices: cannot fail
	w.WriteHeader(p.Status)
	_, _ = w.Write(body)
}

// ceilSeconds rounds d up to whole seconds, at least 1.
func ceilSeconds(d time.Duration) int64 {
	return max(1, int64((d+time.Second-1)/time.Second))
}
