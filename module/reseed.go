package module

import (
	"bytes"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// Data loss in a shared store (a Redis restarted without persistence, or
// flushed) is noticed through the store's seed marker (see
// redisstore.Store.SeedMarker): every configuration sync claims it before
// storing the configured customers and keys, and adopts its token once
// they are stored (a sync that finds the marker changed meanwhile runs
// again). So while the marker carries the token this process adopted, its
// configured customers and keys are in the store.
//
// The marker is checked every seedCheckInterval by each app's resync loop,
// and when a key lookup finds nothing: a valid key missing from a store
// that lost its data must not answer 401. Such a miss is final only when
// the lookup started after this process's last complete sync (its read
// came after the configured keys were stored) and a marker check sent
// after the lookup's read found the token of that sync (no loss before the
// read). Concurrent misses share one such check. A marker gone or changed
// makes the next lookups behave as during an outage (the last lookup seen
// is served, an unknown key gets 503) and wakes the resync loop, which
// stores the configured customers and keys, and the key secret this
// process holds, again at once.

// seedMarker is implemented by the stores that can lose their data while
// Caddy runs (redisstore).
type seedMarker interface {
	SeedMarker(ctx context.Context) (string, error)
	ClaimSeedMarker(ctx context.Context, token string) (string, error)
}

// seedCheckInterval is how often each app checks the seed marker.
const seedCheckInterval = time.Second

// errDataLost is returned by key lookups that found nothing in a store that
// lost its data and was not seeded again yet.
var errDataLost = fmt.Errorf("%w: the store lost its data; the configured customers and keys are being stored again", store.ErrUnavailable)

// errSeedChanged is returned for a lookup that found nothing but started
// before the last complete sync: its read may predate the configured keys
// being stored again, so it says nothing; the lookup is made again.
var errSeedChanged = fmt.Errorf("%w: the configuration was stored again during the key lookup", store.ErrUnavailable)

// seedView is what this process knows of the store's seed marker. A view
// is never modified: a change stores a new one, so a lookup can tell
// whether anything changed since it started by comparing pointers.
type seedView struct {
	// token is the marker token of the last complete configuration sync.
	token string
	// lost is set when the marker was found gone or changed since.
	lost bool
}

// seedCheck is a marker check that found the marker as view expects.
type seedCheck struct {
	view *seedView
	// ticket orders the check after the lookups that ended before it was
	// sent (see seedState.tickets).
	ticket uint64
}

// seedState is a shared store's seed-marker state.
type seedState struct {
	// view is the current view; nil before the first complete sync.
	view atomic.Pointer[seedView]
	// tickets counts the marker checks sent: a check whose ticket is
	// above the count a lookup read once its store read was answered was
	// sent after that read.
	tickets atomic.Uint64
	// confirmed is the latest check that found the marker as expected.
	confirmed atomic.Pointer[seedCheck]
	// checking serializes marker checks (a one-slot semaphore, so that a
	// lookup waits for it no longer than its deadline), so concurrent
	// misses share one; views change only while it is held.
	checking chan struct{}
	// kick wakes a resync loop when the marker is found gone.
	kick chan struct{}
	// persistenceOnce makes the persistence check run once per store.
	persistenceOnce sync.Once
}

func newSeedState() seedState {
	return seedState{kick: make(chan struct{}, 1), checking: make(chan struct{}, 1)}
}

// lockChecks takes the marker-check slot, or returns ctx's error.
func (s *seedState) lockChecks(ctx context.Context) error {
	select {
	case s.checking <- struct{}{}:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("%w: waiting for a seed marker check: %w", store.ErrUnavailable, ctx.Err())
	}
}

func (s *seedState) unlockChecks() { <-s.checking }

// checkSeed reads the marker and reports whether the store lost its data
// since the last complete sync. It reports false for stores without a
// marker and before the first sync.
func (s *shared) checkSeed(ctx context.Context, st store.Store) (lost bool, err error) {
	if err := s.seed.lockChecks(ctx); err != nil {
		return false, err
	}
	defer s.seed.unlockChecks()
	v, err := s.checkSeedLocked(ctx, st)
	return v != nil && v.lost, err
}

// checkSeedLocked reads the marker and returns the view it leaves: nil for
// stores without a marker and before the first sync (no check made), the
// view checked when the marker is as expected, a lost view when it is
// not. The caller holds the check slot (lockChecks).
func (s *shared) checkSeedLocked(ctx context.Context, st store.Store) (*seedView, error) {
	m, ok := st.(seedMarker)
	v := s.seed.view.Load()
	if !ok || v == nil {
		return nil, nil
	}
	if v.lost {
		return v, nil
	}
	ticket := s.seed.tickets.Add(1)
	got, err := m.SeedMarker(ctx)
	if err != nil {
		return v, err
	}
	if got == v.token {
		s.seed.confirmed.Store(&seedCheck{view: v, ticket: ticket})
		return v, nil
	}
	lost := &seedView{token: v.token, lost: true}
	s.seed.view.Store(lost)
	s.logger.Warn("the store lost its data (its seed marker is gone): storing the configured customers and keys again now")
	select {
	case s.seed.kick <- struct{}{}:
	default:
	}
	return lost, nil
}

// lookupStarts returns the seed view a key lookup starts in; the lookup
// passes it to verifyMiss if it finds nothing.
func (s *shared) lookupStarts() *seedView { return s.seed.view.Load() }

// verifyMiss is called right after a key lookup that started in view
// found no active key: it returns nil when the miss is final, errDataLost
// when the store lost its data since the last sync (the lookup is treated
// as one during an outage rather than as an unknown key), errSeedChanged
// when a sync completed since the lookup started (the lookup is to be
// made again), or the store's error when the marker cannot be read.
func (s *shared) verifyMiss(ctx context.Context, st store.Store, view *seedView) error {
	// Read before anything else: every check with a higher ticket is sent
	// after the lookup's read was answered.
	after := s.seed.tickets.Load()
	if _, ok := st.(seedMarker); !ok {
		return nil
	}
	if view == nil { // before the first sync: nothing to check against
		if s.seed.view.Load() != nil {
			return errSeedChanged // the first sync completed during the lookup
		}
		return nil
	}
	if final, err := s.missFinal(view, after); final || err != nil {
		return err
	}
	if err := s.seed.lockChecks(ctx); err != nil {
		return err
	}
	defer s.seed.unlockChecks()
	if final, err := s.missFinal(view, after); final || err != nil {
		return err // a check sent after our read, while we waited
	}
	if _, err := s.checkSeedLocked(ctx, st); err != nil {
		if errors.Is(err, store.ErrUnavailable) {
			return err
		}
		return fmt.Errorf("%w: checking the seed marker: %w", store.ErrUnavailable, err)
	}
	if final, err := s.missFinal(view, after); final || err != nil {
		return err
	}
	return errDataLost // not reached: the check either confirmed view or changed it
}

// missFinal reports whether a miss of a lookup that started in view, and
// whose read was answered when tickets was after, is final: the view is
// unchanged and a check sent after the read confirmed it. It returns
// errDataLost or errSeedChanged when the view changed.
func (s *shared) missFinal(view *seedView, after uint64) (bool, error) {
	cur := s.seed.view.Load()
	switch {
	case cur.lost:
		return false, errDataLost
	case cur != view:
		return false, errSeedChanged
	}
	c := s.seed.confirmed.Load()
	return c != nil && c.view == view && c.ticket > after, nil
}

// claimSeed claims the store's seed marker before a configuration sync and
// returns its token ("" for stores without one).
func (s *shared) claimSeed(ctx context.Context, st store.Store) (string, error) {
	m, ok := st.(seedMarker)
	if !ok {
		return "", nil
	}
	return m.ClaimSeedMarker(ctx, hex.EncodeToString(newSecret()[:16]))
}

// confirmSeed completes a configuration sync that claimed token: the
// marker must still carry it (else the store lost its data during the
// sync, which must run again). Cached lookups made while the data was
// missing are dropped.
func (s *shared) confirmSeed(ctx context.Context, st store.Store, token string) error {
	m, ok := st.(seedMarker)
	if !ok {
		return nil
	}
	got, err := m.SeedMarker(ctx)
	if err != nil {
		return err
	}
	if got != token {
		return errors.New("the store lost its data while the configuration was being stored; storing it again")
	}
	if err := s.seed.lockChecks(ctx); err != nil {
		return err
	}
	prev := s.seed.view.Load()
	changed := prev == nil || prev.lost || prev.token != token
	if changed {
		s.seed.view.Store(&seedView{token: token})
	}
	s.seed.unlockChecks()
	if changed && prev != nil {
		s.registry.invalidate()
		s.logger.Info("stored the configured customers and keys again after the store lost its data")
	}
	return nil
}

// reassertSecret writes the generated key secret this process holds back
// into the store, so that a store that lost it does not let the next
// instance generate another one. If another instance stored a different
// secret first, this process adopts it (keys hashed under the old one
// stop working; the configured keys are stored again under the new one by
// the sync that called this). It does nothing before a secret is held.
func (s *shared) reassertSecret(ctx context.Context, st store.Store) error {
	s.secretMu.Lock()
	defer s.secretMu.Unlock()
	if s.secret == nil {
		return nil
	}
	got, err := st.KeySecret(ctx, s.secret)
	if err != nil {
		return fmt.Errorf("writing the key secret back: %w", err)
	}
	if !bytes.Equal(got, s.secret) {
		s.logger.Warn("the key secret in the store differs from the one this instance held (the store lost its data and another instance generated a new one); adopting it: keys issued through the admin API under the old secret no longer work")
		s.secret = got
		s.hasher.Store(apikey.NewHasher(got))
	}
	return nil
}

// warnPersistence logs, once per store, a warning when the shared store is
// a Redis that keeps nothing on disk: its counters are billing data.
func (s *shared) warnPersistence(ctx context.Context, st store.Store, logger *zap.Logger) {
	rs, ok := st.(*redisstore.Store)
	if !ok {
		return
	}
	s.seed.persistenceOnce.Do(func() {
		p, err := rs.Persistence(ctx)
		switch {
		case err != nil:
			logger.Info("could not ask Redis whether it persists its data", zap.Error(err))
		case !p.Known:
			logger.Info("Redis refuses CONFIG GET and reports no append-only file: make sure it persists its data (its counters are billing data)")
		case !p.AOF && !p.RDB:
			logger.Warn("Redis persists nothing (no append-only file, no snapshots): a restart loses every usage counter, quota, rate state and unreported hour, and the customers and keys created through the admin API; turn on appendonly")
		case !p.AOF:
			logger.Info("Redis persists by snapshots only: a restart loses the usage since the last snapshot; appendonly is safer for billing data")
		}
	})
}
