package module

import (
	"context"
	"encoding/hex"
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
	path                  string
	timeout               time.Duration
	flushInterval         time.Duration
}

// storeOpener returns the pool key identifying a store configuration and a
// function that opens it.
func storeOpener(c storeConfig, logger *zap.Logger) (string, opener) {
	if c.redisURL != "" {
		return fmt.Sprintf("redis|%s|%s|%s", c.redisURL, c.redisPrefix, c.timeout), func() (store.Store, error) {
			return redisstore.New(redisstore.Options{URL: c.redisURL, KeyPrefix: c.redisPrefix, OpTimeout: c.timeout})
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
	// origin identifies this process in reservations; seq numbers them.
	origin string
	seq    seqs

	secretMu sync.Mutex
	hasher   atomic.Pointer[apikey.Hasher]

	watchOnce sync.Once
	cancel    context.CancelFunc
	wg        sync.WaitGroup
}

type storeBox struct{ store.Store }

func newShared(open opener) *shared {
	return &shared{openFn: open, registry: newRegistry(), local: limiter.NewLocal(), origin: hex.EncodeToString(newSecret()[:8])}
}

// nextSeq numbers the next reservation of subject by this process.
func (s *shared) nextSeq(subject string) int64 { return s.seq.next(subject) }

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
	s.watchOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		s.cancel = cancel
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer recoverLog(logger)
			if err := st.Watch(ctx, s.registry.invalidate); err != nil && ctx.Err() == nil {
				logger.Error("watching the store for changes stopped", zap.Error(err))
			}
		}()
	})
	return nil
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
	if b := s.st.Load(); b != nil {
		return b.Close()
	}
	return nil
}

var _ caddy.Destructor = (*shared)(nil)

// keep holds usage that could not be written to the store, for replay.
func (s *shared) keep(rec spoolRecord) {
	getMetrics().storeErrors.WithLabelValues("unspooled").Inc()
}

// replayPending reports whether kept usage waits for replay; the request
// path then stays off the store so replayed usage lands first.
func (s *shared) replayPending() bool { return false }
