package redisstore

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// errBreakerOpen is returned, without contacting Redis, while the circuit
// breaker is open.
var errBreakerOpen = fmt.Errorf("redisstore: circuit breaker open: %w: %w", store.ErrUnavailable, store.ErrNotSent)

// outcome is what one call through the breaker says about Redis.
type outcome int

const (
	// healthy: Redis answered (possibly with an error reply about the data).
	healthy outcome = iota
	// failed: Redis could not be reached, timed out or refused service.
	failed
	// unknown: the caller gave up first; nothing is learned about Redis.
	unknown
)

// breaker is a consecutive-failure circuit breaker. After threshold
// consecutive failed calls it is open: calls fail at once with
// errBreakerOpen for cooldown. Then one probe call goes through (half-open);
// its success closes the breaker, its failure opens it for another cooldown.
// A healthy store pays one atomic load per call.
type breaker struct {
	threshold int32
	cooldown  time.Duration
	now       func() time.Time

	// fails counts consecutive failures; the breaker is closed while it is
	// below threshold.
	fails atomic.Int32

	mu        sync.Mutex
	openUntil time.Time // guarded by mu
	probing   bool      // guarded by mu: a half-open probe is in flight
}

func newBreaker(threshold int, cooldown time.Duration) *breaker {
	return &breaker{threshold: int32(threshold), cooldown: cooldown, now: time.Now}
}

// allow reports whether a call may proceed, and whether it is the half-open
// probe. Every allowed call must be followed by done with the same probe
// value.
func (b *breaker) allow() (probe bool, err error) {
	if b.fails.Load() < b.threshold {
		return false, nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.fails.Load() < b.threshold {
		return false, nil // closed meanwhile
	}
	if b.probing || b.now().Before(b.openUntil) {
		return false, errBreakerOpen
	}
	b.probing = true
	return true, nil
}

// done records the outcome of an allowed call.
func (b *breaker) done(probe bool, o outcome) {
	switch o {
	case healthy:
		if !probe && b.fails.Load() == 0 {
			return
		}
		b.mu.Lock()
		b.fails.Store(0)
		if probe {
			b.probing = false
		}
		b.mu.Unlock()
	case failed:
		b.mu.Lock()
		n := b.fails.Add(1)
		if probe {
			b.probing = false
			b.openUntil = b.now().Add(b.cooldown)
		} else if n == b.threshold {
			b.openUntil = b.now().Add(b.cooldown)
		}
		b.mu.Unlock()
	case unknown:
		if probe {
			b.mu.Lock()
			b.probing = false
			b.mu.Unlock()
		}
	}
}

// failing reports whether the last call (or more) failed for want of
// Redis: the breaker counts consecutive failures, open or not.
func (b *breaker) failing() bool { return b.fails.Load() > 0 }
