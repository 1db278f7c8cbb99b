package store

import (
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// TestAdmit checks the one admission decision both Go deciders share: the
// throttle applies from the included units on, a block quota refuses what
// does not fit (never a free request or a replay), and nothing overflows.
func TestAdmit(t *testing.T) {
	rate := limiter.Policy{Limit: 10, Period: time.Second}
	thr := limiter.Policy{Limit: 1, Period: time.Second}
	const big = int64(1) << 62
	for _, c := range []struct {
		name     string
		mode     string
		included int64
		used     int64
		cost     int64
		replay   bool
		want     Admission
	}{
		{name: "meter", mode: QuotaMeter, used: 1 << 40, cost: 1, want: Admission{Policy: rate}},
		{name: "bill over", mode: QuotaBill, included: 5, used: 9, cost: 3, want: Admission{Policy: rate}},
		{name: "throttle below", mode: QuotaThrottle, included: 5, used: 4, cost: 3, want: Admission{Policy: rate}},
		{name: "throttle at", mode: QuotaThrottle, included: 5, used: 5, cost: 1, want: Admission{Policy: thr, Throttled: true}},
		{name: "throttle free", mode: QuotaThrottle, included: 5, used: 6, cost: 0, want: Admission{Policy: thr, Throttled: true}},
		{name: "block fits", mode: QuotaBlock, included: 5, used: 2, cost: 3, want: Admission{Policy: rate}},
		{name: "block over", mode: QuotaBlock, included: 5, used: 3, cost: 3, want: Admission{Policy: rate, QuotaExceeded: true}},
		{name: "block free over", mode: QuotaBlock, included: 5, used: 7, cost: 0, want: Admission{Policy: rate}},
		{name: "block replay over", mode: QuotaBlock, included: 5, used: 5, cost: 1, replay: true, want: Admission{Policy: rate}},
		{name: "block no overflow", mode: QuotaBlock, included: big, used: big - 1, cost: big, want: Admission{Policy: rate, QuotaExceeded: true}},
	} {
		r := Reservation{Rate: rate, Cost: c.cost, Replay: c.replay, Quota: Quota{Mode: c.mode, Included: c.included}}
		if c.mode == QuotaThrottle {
			r.Quota.Throttle = thr
		}
		if got := r.Admit(c.used); got != c.want {
			t.Errorf("%s: Admit(%d) = %+v, want %+v", c.name, c.used, got, c.want)
		}
	}
}
