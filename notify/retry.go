package notify

import (
	"math/rand/v2"
	"time"
)

// Retry is the schedule of a notification's delivery attempts: exponential
// backoff from Base, each delay capped at Max and jittered to between half
// and all of it, until GiveUp after the first attempt; then the
// notification is dead-lettered.
type Retry struct {
	// Base is the delay after the first failed attempt (before jitter).
	Base time.Duration
	// Max caps one delay (before jitter).
	Max time.Duration
	// GiveUp is how long after the first attempt the last one is made.
	GiveUp time.Duration
}

// DefaultRetry retries after about 10 s, 20 s, 40 s, … up to 2 h apart,
// for 24 h.
var DefaultRetry = Retry{Base: 10 * time.Second, Max: 2 * time.Hour, GiveUp: 24 * time.Hour}

// Next decides what follows the failed attempt number attempts (1 for the
// first) made at now, the first having been made at first: the time of the
// next attempt, or dead when GiveUp has passed. The last attempt is made at
// first+GiveUp.
func (r Retry) Next(attempts int, first, now time.Time) (next time.Time, dead bool) {
	deadline := first.Add(r.GiveUp)
	if !now.Before(deadline) {
		return time.Time{}, true
	}
	d := r.Base
	for i := 1; i < attempts && d < r.Max; i++ {
		d *= 2
	}
	d = min(d, r.Max)
	if half := d / 2; half > 0 {
		d = half + rand.N(half+1)
	}
	next = now.Add(d)
	if next.After(deadline) {
		next = deadline
	}
	return next, false
}
