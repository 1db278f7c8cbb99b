package module

import (
	"sync/atomic"
	"time"
)

// frozenClock, when set, is the instant clockNow returns instead of the
// current time. Only tests set it, to put the handler, key expiry and the
// key lifecycle at an exact instant.
var frozenClock atomic.Pointer[time.Time]

// clockNow is the time the handler and the key lifecycle decide with.
func clockNow() time.Time {
	if t := frozenClock.Load(); t != nil {
		return *t
	}
	return time.Now()
}
