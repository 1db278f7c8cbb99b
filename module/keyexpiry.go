package module

import (
	"net/http"
	"sync/atomic"
	"time"
)

// expiredKey answers a request with an expired key: 401 with its own
// problem type and the instant it expired. Only a caller holding a real
// key ever gets it; unknown and revoked keys get invalidKey.
func expiredKey(w http.ResponseWriter, r *http.Request, at time.Time) {
	getMetrics().requests.WithLabelValues("none", decisionUnauthorized).Inc()
	w.Header().Set("WWW-Authenticate", authenticateExpiredHeader)
	writeProblem(w, r, problem{
		Type: problemExpiredKey, Title: "API key expired", Status: http.StatusUnauthorized,
		Detail: "The API key expired at " + at.UTC().Format(time.RFC3339Nano) + "; use the key that replaced it, or ask for a new one.",
	}, 0)
}

// keyExpiryScanInterval is how often the notifier looks for keys about to
// expire (a scan reads every customer's keys). Tests shorten it.
var keyExpiryScanInterval atomic.Int64

func init() { keyExpiryScanInterval.Store(int64(time.Minute)) }
