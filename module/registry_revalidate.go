package module

import (
	"context"
	"errors"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Revalidation of the key cache after an invalidation (see registry).
const (
	// revalidateTimeout bounds one lookup of the revalidation.
	revalidateTimeout = 2 * time.Second
	// revalidateRetry is the first pause before revalidating again after
	// the store failed; it doubles up to revalidateMaxRetry.
	revalidateRetry    = 250 * time.Millisecond
	revalidateMaxRetry = 5 * time.Second
)

// revalidateLoop reads again, one at a time, the lookups an invalidation
// moved to pending, so that those still valid serve again while the store
// is unreachable (and the others, a revoked key or a customer's old tier,
// are known as such). It runs until ctx is done; while the store fails it
// retries with a growing pause.
func (r *registry) revalidateLoop(ctx context.Context, st store.Store) {
	pause := revalidateRetry
	for {
		var retry *time.Timer
		var retryC <-chan time.Time
		if err := r.revalidate(ctx, st); err != nil {
			retry = time.NewTimer(pause)
			retryC = retry.C
			pause = min(2*pause, revalidateMaxRetry)
		} else {
			pause = revalidateRetry
		}
		select {
		case <-ctx.Done():
		case <-r.wake:
		case <-retryC:
		}
		if retry != nil {
			retry.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// revalidate looks up every pending digest and caches the result as a
// fresh lookup. It returns the store's error when the store is
// unreachable (the rest stays pending); a digest that cannot be read for
// another reason is dropped from pending (it is looked up again when
// presented). An invalidation meanwhile restarts it with the new pending
// set.
func (r *registry) revalidate(ctx context.Context, st store.Store) error {
	for {
		r.mu.RLock()
		gen := r.gen
		sums := make([]digest, 0, len(r.pending))
		for sum := range r.pending {
			sums = append(sums, sum)
		}
		r.mu.RUnlock()
		if len(sums) == 0 {
			return nil
		}
		restart := false
		for _, sum := range sums {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fctx, cancel := context.WithTimeout(ctx, revalidateTimeout)
			// A miss is cached only when final: one read from a store that
			// lost its data would answer a valid key 401 (see reseed.go).
			e, err := r.fetchVerified(fctx, st, sum, time.Now())
			cancel()
			if err == nil && e.found {
				e.use = r.uses.slot(e.key.ID) // its last use is recorded as lookup's are
			}
			if errors.Is(err, store.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
				return err
			}
			r.mu.Lock()
			if r.gen != gen {
				restart = true
			} else if _, ok := r.pending[sum]; ok {
				delete(r.pending, sum)
				if _, cached := r.entries[sum]; err == nil && !cached && len(r.entries) < registryMaxEntries {
					r.entries[sum] = e
				}
			}
			r.mu.Unlock()
			if restart {
				break
			}
		}
		if !restart {
			return nil
		}
	}
}
