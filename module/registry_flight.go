package module

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// flights collapses concurrent lookups of the same uncached key into one
// store call: right after a start, a burst of requests with one key would
// otherwise make as many lookups as requests, exhaust the connection pool
// and be refused while the store is healthy.
type flights struct {
	mu sync.Mutex
	m  map[digest]*flight
}

// flight is one lookup in progress; e and err are set before done closes.
type flight struct {
	gen  uint64 // the registry generation it started in
	done chan struct{}
	e    regEntry
	err  error
}

// do returns fetch's result for sum, calling it once for all the callers
// that ask for sum in the same registry generation while it runs. A caller
// that joins a lookup started before the last invalidation starts its own,
// so no lookup that began before a change (a revoked key) answers a caller
// that came after it. fetch runs with the deadline of the caller that
// started it, but not its cancellation: the others wait for it (a caller
// cancelled meanwhile returns its error).
func (f *flights) do(ctx context.Context, sum digest, gen uint64, fetch func(context.Context) (regEntry, error)) (regEntry, error) {
	f.mu.Lock()
	if f.m == nil {
		f.m = make(map[digest]*flight)
	}
	fl, ok := f.m[sum]
	if !ok || fl.gen != gen {
		fl = &flight{gen: gen, done: make(chan struct{})}
		f.m[sum] = fl
		f.mu.Unlock()
		fctx := context.WithoutCancel(ctx)
		cancel := context.CancelFunc(func() {})
		if d, ok := ctx.Deadline(); ok {
			fctx, cancel = context.WithDeadline(fctx, d)
		}
		fl.e, fl.err = fetch(fctx)
		cancel()
		f.mu.Lock()
		if f.m[sum] == fl {
			delete(f.m, sum)
		}
		f.mu.Unlock()
		close(fl.done)
		return fl.e, fl.err
	}
	f.mu.Unlock()
	select {
	case <-fl.done:
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return regEntry{}, fmt.Errorf("waiting for a key lookup in flight: %w", ctx.Err())
		}
		// The lookup started earlier, so its deadline is no later than
		// ours: its outcome (a store failure or not) is ours too.
		<-fl.done
	}
	return fl.e, fl.err
}

// storeCtx is a request's context while it waits on the store: the
// request's one store deadline, and whether a store call of the request
// already failed for want of the store (not of this process's capacity).
// A request whose key lookup waited out the deadline on an unreachable
// store has no time left for its reservation, which then cannot be sent:
// that is the store's outage (on_store_error decides), not local
// saturation.
type storeCtx struct {
	context.Context
	storeFailed bool
}

type storeCtxKey struct{}

// Value returns c itself for storeCtxKey.
func (c *storeCtx) Value(key any) any {
	if key == (storeCtxKey{}) {
		return c
	}
	return c.Context.Value(key)
}

// noteStoreError marks ctx's request when err says the store itself was
// unreachable, slow or failing (ErrUnavailable but not ErrBusy).
func noteStoreError(ctx context.Context, err error) {
	if err == nil || errors.Is(err, store.ErrBusy) || !errors.Is(err, store.ErrUnavailable) {
		return
	}
	if c, ok := ctx.Value(storeCtxKey{}).(*storeCtx); ok {
		c.storeFailed = true
	}
}

// storeFailedBefore reports whether noteStoreError marked ctx's request.
func storeFailedBefore(ctx context.Context) bool {
	c, ok := ctx.Value(storeCtxKey{}).(*storeCtx)
	return ok && c.storeFailed
}

// storeContext returns the context of a request's store calls, started at
// now: one deadline, store_timeout away, for everything the request waits
// on the store together (key lookup and reservation), and its cancel. The
// embedded store never waits on a network and ignores contexts, so it gets
// the request's own. On a reload the new handlers may run before the new
// app started: the deadline then starts once it did (see waitReady).
func (a *App) storeContext(r *http.Request, now time.Time) (context.Context, context.CancelFunc) {
	if !a.shared.remote {
		return r.Context(), func() {}
	}
	select {
	case <-a.ready:
	default:
		a.waitReady(time.Second)
		now = time.Now()
	}
	ctx, cancel := context.WithDeadline(r.Context(), now.Add(a.timeout))
	return &storeCtx{Context: ctx}, cancel
}
