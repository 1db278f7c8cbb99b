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
// redisstore.Store.SeedMarker): every configuration sync claims it, and
// the token seen by the last complete sync is remembered. The marker is
// checked every seedCheckInterval by each app's resync loop, and when a
// key lookup finds nothing (a valid key missing from a store that lost its
// data must not answer 401). A marker gone or changed makes the next
// lookups behave as during an outage (the last lookup seen is served, an
// unknown key gets 503) and wakes the resync loop, which stores the
// configured customers and keys, and the key secret this process holds,
// again at once.

// seedMarker is implemented by the stores that can lose their data while
// Caddy runs (redisstore).
type seedMarker interface {
	SeedMarker(ctx context.Context) (string, error)
	ClaimSeedMarker(ctx context.Context, token string) (string, error)
}

const (
	// seedCheckInterval is how often each app checks the seed marker.
	seedCheckInterval = time.Second
	// seedMissRecheck is how long a confirmed marker is trusted by key
	// lookups that find nothing; within it, a miss costs no store call.
	seedMissRecheck = 100 * time.Millisecond
)

// errDataLost is returned by key lookups that found nothing in a store that
// lost its data and was not seeded again yet.
var errDataLost = fmt.Errorf("%w: the store lost its data; the configured customers and keys are being stored again", store.ErrUnavailable)

// seedState is a shared store's seed-marker state.
type seedState struct {
	// token is the marker token of the last complete configuration sync;
	// nil before the first one.
	token atomic.Pointer[string]
	// lost is set when the marker was found gone or changed, until the
	// next complete sync.
	lost atomic.Bool
	// checkedAt is when (Unix ns) the marker was last found as expected.
	checkedAt atomic.Int64
	// checkMu makes concurrent misses share one marker check.
	checkMu sync.Mutex
	// kick wakes a resync loop when the marker is found gone.
	kick chan struct{}
	// persistenceOnce makes the persistence check run once per store.
	persistenceOnce sync.Once
}

func newSeedState() seedState { return seedState{kick: make(chan struct{}, 1)} }

// checkSeed reads the marker and reports whether the store lost its data
// since the last complete sync. It reports false for stores without a
// marker and before the first sync.
func (s *shared) checkSeed(ctx context.Context, st store.Store) (lost bool, err error) {
	m, ok := st.(seedMarker)
	want := s.seed.token.Load()
	if !ok || want == nil {
		return false, nil
	}
	got, err := m.SeedMarker(ctx)
	if err != nil {
		return false, err
	}
	if got != *want {
		if !s.seed.lost.Swap(true) {
			s.logger.Warn("the store lost its data (its seed marker is gone): storing the configured customers and keys again now")
		}
		select {
		case s.seed.kick <- struct{}{}:
		default:
		}
		return true, nil
	}
	s.seed.checkedAt.Store(time.Now().UnixNano())
	return false, nil
}

// verifyMiss is called when a key lookup found no active key: it returns
// errDataLost when the store lost its data since the last sync (checking
// the marker unless it was confirmed within seedMissRecheck), so that the
// lookup is treated as one during an outage rather than as an unknown key.
func (s *shared) verifyMiss(ctx context.Context, st store.Store) error {
	if _, ok := st.(seedMarker); !ok || s.seed.token.Load() == nil {
		return nil
	}
	if s.seed.lost.Load() {
		return errDataLost
	}
	s.seed.checkMu.Lock()
	defer s.seed.checkMu.Unlock()
	if s.seed.lost.Load() {
		return errDataLost
	}
	if time.Now().UnixNano()-s.seed.checkedAt.Load() < int64(seedMissRecheck) {
		return nil
	}
	lost, err := s.checkSeed(ctx, st)
	switch {
	case lost:
		return errDataLost
	case errors.Is(err, store.ErrUnavailable):
		return err
	}
	return nil
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
	prev := s.seed.token.Swap(&token)
	s.seed.checkedAt.Store(time.Now().UnixNano())
	if s.seed.lost.Swap(false) || (prev != nil && *prev != token) {
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
