package module

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// keyUseInterval is the least time between two writes of one key's last
// use to the store, and how often the flush loop runs. Tests shorten it,
// so it is atomic.
var keyUseInterval atomic.Int64

func init() { keyUseInterval.Store(int64(time.Minute)) }

// keyUses remembers when each key was last used, in memory, for the
// flush loop to write to the store: at most one write per key per
// keyUseInterval (per process), all due keys in one TouchKeys call, never
// on the request path. It lives in the shared state, so it survives
// reloads and the budget holds while an old and a new config both run.
type keyUses struct {
	mu    sync.Mutex
	slots map[string]*keyUse // by key id
}

// keyUse is one key's last use: used is written by requests (Unix
// seconds); flushed and written belong to the flush, under keyUses.mu.
type keyUse struct {
	used    atomic.Int64
	flushed int64
	written time.Time
}

func newKeyUses() *keyUses { return &keyUses{slots: make(map[string]*keyUse)} }

// slot returns the slot of a key, creating it. It is called when a lookup
// is cached, not per request.
func (u *keyUses) slot(keyID string) *keyUse {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := u.slots[keyID]
	if s == nil {
		s = new(keyUse)
		u.slots[keyID] = s
	}
	return s
}

// lastUse is the latest use of keyID this process has seen, written to
// the store or not yet; zero when none.
func (u *keyUses) lastUse(keyID string) time.Time {
	u.mu.Lock()
	s := u.slots[keyID]
	u.mu.Unlock()
	if s == nil || s.used.Load() == 0 {
		return time.Time{}
	}
	return time.Unix(s.used.Load(), 0).UTC()
}

// record notes a use at now: one atomic load per request, and a store
// only when the second changed. A lookup made without a slot (nil) records
// nothing.
func (s *keyUse) record(now time.Time) {
	if s == nil {
		return
	}
	sec := now.Unix()
	for {
		old := s.used.Load()
		if old >= sec || s.used.CompareAndSwap(old, sec) {
			return
		}
	}
}

// flush writes the last uses not yet written of keys whose last write is
// at least keyUseInterval old, in one store call. Keys unused for an hour
// and written are forgotten.
func (u *keyUses) flush(ctx context.Context, st store.Store, now time.Time) (int, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	interval := time.Duration(keyUseInterval.Load())
	due := make(map[string]time.Time)
	for id, s := range u.slots {
		used := s.used.Load()
		switch {
		case used > s.flushed && now.Sub(s.written) >= interval:
			due[id] = time.Unix(used, 0).UTC()
		case used != 0 && used == s.flushed && now.Sub(time.Unix(used, 0)) > time.Hour:
			// A lookup cached since (at most registryTTL old) would
			// have been used within the hour, so none holds this slot
			// but a stale one kept for a store outage; the next lookup
			// makes a new slot.
			delete(u.slots, id)
		}
	}
	if len(due) == 0 {
		return 0, nil
	}
	if err := st.TouchKeys(ctx, due); err != nil {
		return 0, err
	}
	for id, at := range due {
		s := u.slots[id]
		s.flushed, s.written = at.Unix(), now
	}
	return len(due), nil
}

// keyUseLoop writes last uses every keyUseInterval until ctx is done, and
// once more then (within the per-key budget).
func (a *App) keyUseLoop(ctx context.Context) {
	t := time.NewTicker(time.Duration(keyUseInterval.Load()))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			a.flushKeyUses(fctx)
			cancel()
			return
		case <-t.C:
			a.flushKeyUses(ctx)
		}
	}
}

// flushKeyUses writes the due last uses, logging a failure (they are
// written at the next flush).
func (a *App) flushKeyUses(ctx context.Context) {
	st, err := a.store()
	if err != nil {
		return
	}
	if _, err := a.shared.registry.uses.flush(ctx, st, clockNow()); err != nil && ctx.Err() == nil {
		logStoreError(a.logger, "last use", err)
	}
}
