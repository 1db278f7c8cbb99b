package module

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
	"github.com/apimonetize/caddy-api-monetize/store/spool"
)

// sharedPool holds one shared value per configured store, so the store
// client, the key cache and in-process rate-limit state survive config
// reloads: the new config's app finds the value the old one used.
var sharedPool = caddy.NewUsagePool()

// opener opens a store.
type opener func() (store.Store, error)

// storeConfig selects and tunes a store.
type storeConfig struct {
	redisURL, redisPrefix string
	// redisCluster makes redisURL a Redis Cluster's seed URL.
	redisCluster bool
	// waitReplicas is redisstore.Options.WaitReplicas.
	waitReplicas  int
	path          string
	timeout       time.Duration
	flushInterval time.Duration
}

// storeOpener returns the pool key identifying a store configuration and a
// function that opens it.
func storeOpener(c storeConfig, logger *zap.Logger) (string, opener) {
	if c.redisURL != "" {
		// The key leaves the timeout out: the spool directory may be open
		// once per process, so a reload that changes store_timeout keeps
		// the open client (the new timeout applies at the next start; so
		// does redis_wait_replicas).
		kind := "redis|"
		if c.redisCluster {
			kind = "redis-cluster|"
		}
		return kind + c.redisURL + "|" + c.redisPrefix, func() (store.Store, error) {
			return redisstore.New(redisstore.Options{
				URL: c.redisURL, Cluster: c.redisCluster, KeyPrefix: c.redisPrefix, OpTimeout: c.timeout,
				WaitReplicas: c.waitReplicas,
			})
		}
	}
	// One process may open a bbolt file once: the key is the path alone, so
	// a reload that changes store_flush_interval keeps the open store (the
	// new interval applies at the next start).
	return "bolt|" + c.path, func() (store.Store, error) {
		opts := []boltstore.Option{boltstore.WithFlushErrorHandler(func(err error) {
			logger.Error("writing metered usage into the store file failed; it stays in the write-ahead log and is retried", zap.Error(err))
		})}
		if c.flushInterval > 0 {
			opts = append(opts, boltstore.WithFlushInterval(c.flushInterval))
		}
		return boltstore.Open(c.path, opts...)
	}
}

// shared is the per-process state behind one store configuration.
type shared struct {
	openFn   opener
	openMu   sync.Mutex
	st       atomic.Pointer[storeBox]
	registry *registry
	// local decides rate limits in process when the store is unavailable
	// and a tier's on_store_error is "local".
	local *limiter.Local
	// usage is the last period usage seen per customer, for quota
	// decisions while the store is unavailable.
	usage usageCache
	// spoolDir is where usage is kept while a shared store is unreachable
	// (empty for the embedded store); spool is open once started.
	spoolDir string
	spool    atomic.Pointer[spool.Spool]
	// mem keeps usage the embedded store could not write, for replay
	// (nil for a shared store, which has the spool).
	mem *memBuffer
	// memLogged is when (Unix ns) keeping usage in mem was last logged.
	memLogged atomic.Int64
	logger    *zap.Logger
	// origin identifies this process's reservations and numbers them (see
	// store.Reservation.Origin). It is replaced by a fresh one when usage
	// was spooled (originStale), so live reservations never advance the
	// replay window of the origin whose records are still to be replayed.
	origin      atomic.Pointer[originSeqs]
	originStale atomic.Bool
	// instanceID identifies this process in the store's instance
	// heartbeats, and instances is how many instances the store last
	// counted (see heartbeatLoop).
	instanceID string
	instances  atomic.Int64
	// remote is set for a store reached over the network (Redis), whose
	// calls are bounded by the request's store deadline.
	remote bool

	secretMu sync.Mutex
	hasher   atomic.Pointer[apikey.Hasher]
	// secret is the key secret hasher was made from (guarded by secretMu).
	secret []byte
	// seed tracks the store's seed marker (see reseed.go).
	seed seedState

	watchOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

type storeBox struct{ store.Store }

func newShared(open opener, spoolDir string) *shared {
	s := &shared{
		openFn: open, spoolDir: spoolDir, registry: newRegistry(), local: limiter.NewLocal(),
		logger: zap.NewNop(), seed: newSeedState(), instanceID: hex.EncodeToString(newSecret()[:8]),
		remote: spoolDir != "", // only a shared store has a spool
	}
	s.registry.seed = s
	if spoolDir == "" {
		s.mem = newMemBuffer(memBufferMax)
	}
	s.origin.Store(newOrigin())
	return s
}

// originSeqs is an origin id and the sequence numbers issued under it.
type originSeqs struct {
	id  string
	seq seqs
}

func newOrigin() *originSeqs { return &originSeqs{id: hex.EncodeToString(newSecret()[:8])} }

// liveOrigin returns the origin for a reservation sent to the store,
// switching to a fresh one after usage was spooled.
func (s *shared) liveOrigin() *originSeqs {
	if s.originStale.Load() && s.originStale.CompareAndSwap(true, false) {
		s.origin.Store(newOrigin())
	}
	return s.origin.Load()
}

// open returns the store, opening it on first use.
func (s *shared) open() (store.Store, error) {
	if b := s.st.Load(); b != nil {
		return b.Store, nil
	}
	s.openMu.Lock()
	defer s.openMu.Unlock()
	if b := s.st.Load(); b != nil {
		return b.Store, nil
	}
	st, err := s.openFn()
	if err != nil {
		return nil, fmt.Errorf("opening the api_monetize store: %w", err)
	}
	s.st.Store(&storeBox{st})
	return st, nil
}

// start opens the store and starts the change watcher that keeps every
// process's key cache fresh. Only the first call starts it; it runs until
// the last config using this store is gone.
func (s *shared) start(logger *zap.Logger) error {
	st, err := s.open()
	if err != nil {
		return err
	}
	var err2 error
	s.watchOnce.Do(func() {
		s.logger = logger
		var sp *spool.Spool
		if s.spoolDir != "" {
			if sp, err2 = spool.Open(s.spoolDir); err2 != nil {
				err2 = fmt.Errorf("opening the usage spool: %w", err2)
				return
			}
			s.spool.Store(sp)
		}
		ctx, cancel := context.WithCancel(context.Background())
		s.cancel = cancel
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer recoverLog(logger)
			watch := func() error { return st.Watch(ctx, s.registry.invalidate) }
			if w, ok := st.(store.ResyncWatcher); ok {
				watch = func() error { return w.WatchChanges(ctx, s.registry.invalidate, s.registry.resync) }
			}
			if err := watch(); err != nil && ctx.Err() == nil {
				logger.Error("watching the store for changes stopped", zap.Error(err))
			}
		}()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer recoverLog(logger)
			s.registry.revalidateLoop(ctx, st)
		}()
		if hb, ok := st.(instanceCounter); ok {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer recoverLog(logger)
				s.heartbeatLoop(ctx, hb)
			}()
		}
		var buf replayer // a nil *Spool or *memBuffer would make it non-nil
		switch {
		case sp != nil:
			buf = sp
		case s.mem != nil:
			buf = s.mem
		}
		if buf != nil {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer recoverLog(logger)
				s.replayLoop(ctx, buf, st)
			}()
		}
	})
	return err2
}

// storedHasher hashes keys with the key secret kept in the store,
// generating the secret on first use.
func (s *shared) storedHasher(ctx context.Context) (*apikey.Hasher, error) {
	if h := s.hasher.Load(); h != nil {
		return h, nil
	}
	s.secretMu.Lock()
	defer s.secretMu.Unlock()
	if h := s.hasher.Load(); h != nil {
		return h, nil
	}
	st, err := s.open()
	if err != nil {
		return nil, err
	}
	secret, err := st.KeySecret(ctx, newSecret())
	if err != nil {
		return nil, fmt.Errorf("reading the key secret from the store: %w", err)
	}
	h := apikey.NewHasher(secret)
	s.secret = secret
	s.hasher.Store(h)
	return h, nil
}

// Destruct stops the watcher and closes the store when the last config
// using it is unloaded.
func (s *shared) Destruct() error {
	if s.cancel != nil {
		s.cancel()
	}
	s.wg.Wait()
	s.dropMemBuffer()
	var errs []error
	if sp := s.spool.Load(); sp != nil {
		errs = append(errs, sp.Close())
	}
	if b := s.st.Load(); b != nil {
		errs = append(errs, b.Close())
	}
	return errors.Join(errs...)
}

var _ caddy.Destructor = (*shared)(nil)

// keep holds usage that could not be written to the store for replay: in
// the spool (shared store), or in memory (embedded store, see memBuffer).
// When the spool or the buffer is full, the usage is lost: counted and
// logged.
func (s *shared) keep(rec spool.Record) {
	m := getMetrics()
	sp := s.spool.Load()
	if sp != nil {
		err := sp.Append(rec)
		if err == nil {
			s.originStale.Store(true)
			m.spooled.Inc()
			return
		}
		logStoreError(s.logger, "spool", err)
	}
	if s.mem != nil {
		kept := s.mem.Append(rec)
		if kept {
			m.spooled.Inc()
		} else {
			m.lostUsage.Inc()
		}
		s.logMemBuffer(kept)
		return
	}
	m.lostUsage.Inc()
}

// replayInterval is how often spooled usage is replayed while some waits.
const replayInterval = 500 * time.Millisecond

// replayer holds usage records for replay: a *spool.Spool or a *memBuffer.
type replayer interface {
	Pending() bool
	Replay(ctx context.Context, m store.Meter) (int, error)
}

// replayLoop replays spooled usage into the store until ctx is done.
func (s *shared) replayLoop(ctx context.Context, sp replayer, m store.Meter) {
	t := time.NewTicker(replayInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !sp.Pending() {
			continue
		}
		// Live reservations use a fresh origin meanwhile (see
		// originStale), so replay runs alongside them.
		n, err := sp.Replay(ctx, m)
		if n > 0 {
			getMetrics().replayed.Add(float64(n))
		}
		switch {
		case err == nil:
			s.logger.Info("replayed usage kept while the store was unavailable", zap.Int("records", n))
		case ctx.Err() == nil:
			logStoreError(s.logger, "replay", err)
		}
	}
}
