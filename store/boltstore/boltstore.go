// Package boltstore is the embedded store.Store: customers, API key hashes
// and the key secret live in one bbolt file, for a single Caddy process.
//
// Rate-limit state is kept in memory only (a limiter.Local on the wall
// clock), so budgets start full after a restart. Metering (store.Meter) is
// kept in memory, logged ahead to a write-ahead log next to the file and
// checkpointed into it; see meter.go. Change notifications reach
// watchers in the same process. bbolt holds an exclusive lock on the file:
// a process must open a path only once (share the *Store), and a second
// process opening it gets an error after the lock timeout instead of
// hanging.
package boltstore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// DefaultLockTimeout is how long Open waits for the file lock by default.
const DefaultLockTimeout = time.Second

// Bucket names. Values are JSON except in the index buckets.
var (
	// customers: customer id -> store.Customer.
	bucketCustomers = []byte("customers")
	// keys: key hash -> store.Key.
	bucketKeys = []byte("keys")
	// keyIDs: key id -> key hash.
	bucketKeyIDs = []byte("key_ids")
	// customerKeys: one nested bucket per customer id, holding the hashes
	// of its keys (empty values).
	bucketCustomerKeys = []byte("customer_keys")
	// meta: fixed names -> raw values.
	bucketMeta = []byte("meta")

	metaKeySecret = []byte("key_secret")
)

// Store is a store.Store on a bbolt file. It is safe for concurrent use.
type Store struct {
	db    *bolt.DB
	rates *limiter.Local
	meter *meter
	// leases are the store.Records leases (see records.go).
	leases leaseTable

	mu        sync.Mutex
	watchers  map[chan struct{}]struct{}
	closed    chan struct{}
	closeOnce sync.Once
}

var _ store.Store = (*Store)(nil)

// Option configures Open.
type Option func(*options)

type options struct {
	lockTimeout   time.Duration
	flushInterval time.Duration
	onFlushError  func(error)
	// clock replaces time.Now for metering, in tests.
	clock func() time.Time
	// segmentSize is the size write-ahead log segments are mapped with
	// (segmentSize by default), 0 to write them with write(2); tests set it.
	segmentSize int
}

// WithLockTimeout sets how long Open waits for another process to release
// the file lock before failing (DefaultLockTimeout by default). It must be
// positive.
func WithLockTimeout(d time.Duration) Option {
	return func(o *options) { o.lockTimeout = d }
}

// Open opens (or creates) the store file at path. Missing parent
// directories are created with mode 0700 and a new file with mode 0600.
// Open replays the metering write-ahead log and starts a goroutine that
// checkpoints it until Close.
func Open(path string, opts ...Option) (*Store, error) {
	o := options{lockTimeout: DefaultLockTimeout, flushInterval: DefaultFlushInterval, segmentSize: segmentSize}
	for _, opt := range opts {
		opt(&o)
	}
	if o.lockTimeout <= 0 {
		return nil, fmt.Errorf("boltstore: lock timeout must be positive, got %v", o.lockTimeout)
	}
	if o.flushInterval <= 0 {
		return nil, fmt.Errorf("boltstore: flush interval must be positive, got %v", o.flushInterval)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("boltstore: %w", err)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: o.lockTimeout})
	if errors.Is(err, bolt.ErrTimeout) {
		return nil, fmt.Errorf("boltstore: %s is locked by another process or already open in this one (waited %v)", path, o.lockTimeout)
	}
	if err != nil {
		return nil, fmt.Errorf("boltstore: open %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, name := range [][]byte{bucketCustomers, bucketKeys, bucketKeyIDs, bucketCustomerKeys, bucketMeta, bucketKeyLastUsed} {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("boltstore: initialise %s: %w", path, err)
	}
	rates := limiter.NewLocal()
	m, err := openMeter(db, path, rates, o)
	if err != nil {
		_ = db.Close()
		return nil, err
	}
	return &Store{
		db:       db,
		rates:    rates,
		meter:    m,
		watchers: make(map[chan struct{}]struct{}),
		closed:   make(chan struct{}),
	}, nil
}

// KeySecret implements store.Store.
func (s *Store) KeySecret(_ context.Context, candidate []byte) ([]byte, error) {
	var secret []byte
	err := s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketMeta)
		if v := b.Get(metaKeySecret); v != nil {
			secret = bytes.Clone(v)
			return nil
		}
		if len(candidate) == 0 {
			return errors.New("boltstore: empty key secret candidate")
		}
		secret = bytes.Clone(candidate)
		return b.Put(metaKeySecret, secret)
	})
	if err != nil {
		return nil, err
	}
	return secret, nil
}

// UpsertConfigCustomer implements store.Store.
func (s *Store) UpsertConfigCustomer(_ context.Context, c store.Customer) (store.Customer, error) {
	if c.ID == "" {
		return store.Customer{}, errors.New("boltstore: empty customer id")
	}
	changed := false
	err := s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketCustomers)
		old := b.Get([]byte(c.ID))
		if old == nil {
			if c.CreatedAt.IsZero() {
				c.CreatedAt = now()
			}
			changed = true
			return putJSON(b, c.ID, c)
		}
		var cur store.Customer
		if err := json.Unmarshal(old, &cur); err != nil {
			return decodeErr("customer", c.ID, err)
		}
		cur = cur.MergeConfig(c)
		c = cur
		v, err := json.Marshal(cur)
		if err != nil {
			return err
		}
		if bytes.Equal(v, old) {
			return nil // a reload that changes nothing writes nothing
		}
		changed = true
		return b.Put([]byte(c.ID), v)
	})
	if err != nil {
		return store.Customer{}, err
	}
	if changed {
		s.notify()
	}
	return c, nil
}

// CreateCustomer implements store.Store.
func (s *Store) CreateCustomer(_ context.Context, c store.Customer) error {
	if c.ID == "" {
		return errors.New("boltstore: empty customer id")
	}
	if c.CreatedAt.IsZero() {
		c.CreatedAt = now()
	}
	err := s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketCustomers)
		if b.Get([]byte(c.ID)) != nil {
			return fmt.Errorf("boltstore: customer %q already exists", c.ID)
		}
		return putJSON(b, c.ID, c)
	})
	if err != nil {
		return err
	}
	s.notify()
	return nil
}

// GetCustomer implements store.Store.
func (s *Store) GetCustomer(_ context.Context, id string) (store.Customer, error) {
	var c store.Customer
	err := s.view(func(tx *bolt.Tx) error {
		return getJSON(tx.Bucket(bucketCustomers), "customer", id, &c)
	})
	return c, err
}

// ListCustomers implements store.Store.
func (s *Store) ListCustomers(_ context.Context) ([]store.Customer, error) {
	var list []store.Customer
	err := s.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketCustomers).ForEach(func(k, v []byte) error {
			var c store.Customer
			if err := json.Unmarshal(v, &c); err != nil {
				return decodeErr("customer", string(k), err)
			}
			list = append(list, c)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return list, nil
}

// SetTier implements store.Store.
func (s *Store) SetTier(_ context.Context, id, tier string) (store.Customer, error) {
	var c store.Customer
	err := s.update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketCustomers)
		if err := getJSON(b, "customer", id, &c); err != nil {
			return err
		}
		c.Tier = tier
		return putJSON(b, id, c)
	})
	if err != nil {
		return store.Customer{}, err
	}
	s.notify()
	return c, nil
}

// PutKey implements store.Store.
func (s *Store) PutKey(_ context.Context, k store.Key) (store.Key, error) {
	if k.ID == "" || k.Hash == "" || k.CustomerID == "" {
		return store.Key{}, errors.New("boltstore: key needs an id, a hash and a customer id")
	}
	err := s.update(func(tx *bolt.Tx) error {
		keys, ids, owners := tx.Bucket(bucketKeys), tx.Bucket(bucketKeyIDs), tx.Bucket(bucketCustomerKeys)
		if h := ids.Get([]byte(k.ID)); h != nil && string(h) != k.Hash {
			return fmt.Errorf("boltstore: key id %q already belongs to another key", k.ID)
		}
		var old store.Key
		switch err := getJSON(keys, "key", k.Hash, &old); {
		case err == nil:
			k = k.MergeStored(old)
			if old.ID != k.ID {
				if err := ids.Delete([]byte(old.ID)); err != nil {
					return err
				}
			}
			if old.CustomerID != k.CustomerID {
				if ob := owners.Bucket([]byte(old.CustomerID)); ob != nil {
					if err := ob.Delete([]byte(k.Hash)); err != nil {
						return err
					}
				}
			}
		case errors.Is(err, store.ErrNotFound):
			if k.CreatedAt.IsZero() {
				k.CreatedAt = now()
			}
		default:
			return err
		}
		if err := putJSON(keys, k.Hash, k); err != nil {
			return err
		}
		if err := ids.Put([]byte(k.ID), []byte(k.Hash)); err != nil {
			return err
		}
		ob, err := owners.CreateBucketIfNotExists([]byte(k.CustomerID))
		if err != nil {
			return err
		}
		return ob.Put([]byte(k.Hash), []byte{})
	})
	if err != nil {
		return store.Key{}, err
	}
	s.notify()
	return k, nil
}

// KeyByHash implements store.Store.
func (s *Store) KeyByHash(_ context.Context, hash string) (store.Key, error) {
	var k store.Key
	err := s.view(func(tx *bolt.Tx) error {
		return getJSON(tx.Bucket(bucketKeys), "key", hash, &k)
	})
	return k, err
}

// ListKeys implements store.Store.
func (s *Store) ListKeys(_ context.Context, customerID string) ([]store.Key, error) {
	var list []store.Key
	err := s.view(func(tx *bolt.Tx) error {
		ob := tx.Bucket(bucketCustomerKeys).Bucket([]byte(customerID))
		if ob == nil {
			return nil
		}
		keys := tx.Bucket(bucketKeys)
		return ob.ForEach(func(h, _ []byte) error {
			var k store.Key
			if err := getJSON(keys, "key", string(h), &k); err != nil {
				return fmt.Errorf("boltstore: index of customer %q: %w", customerID, err)
			}
			k.LastUsedAt = lastUsed(tx, k.ID)
			list = append(list, k)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(list, func(a, b store.Key) int {
		if c := a.CreatedAt.Compare(b.CreatedAt); c != 0 {
			return c
		}
		return bytes.Compare([]byte(a.ID), []byte(b.ID))
	})
	return list, nil
}

// RevokeKey implements store.Store.
func (s *Store) RevokeKey(_ context.Context, keyID string) (store.Key, error) {
	var k store.Key
	changed := false
	err := s.update(func(tx *bolt.Tx) error {
		var err error
		if k, err = keyByID(tx, keyID); err != nil || !k.RevokedAt.IsZero() {
			return err
		}
		k.RevokedAt = now()
		changed = true
		return putJSON(tx.Bucket(bucketKeys), k.Hash, k)
	})
	if err != nil {
		return store.Key{}, err
	}
	if changed {
		s.notify()
	}
	return k, nil
}

// Watch implements store.Store: onChange runs after every change made
// through this Store, until ctx is done or the Store is closed. Changes made
// while onChange runs cause one more call.
func (s *Store) Watch(ctx context.Context, onChange func()) error {
	ch := make(chan struct{}, 1)
	s.mu.Lock()
	s.watchers[ch] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.watchers, ch)
		s.mu.Unlock()
	}()
	for {
		select {
		case <-ch:
			onChange()
		case <-ctx.Done():
			return nil
		case <-s.closed:
			return nil
		}
	}
}

// Close implements store.Store. It ends every Watch, checkpoints the
// metering state and closes the file. Closing again does nothing.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.closed)
		err = errors.Join(s.meter.close(), s.db.Close())
	})
	return err
}

// notify wakes every watcher; a watcher that has a wake-up pending keeps
// just one.
func (s *Store) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for ch := range s.watchers {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}

// update runs fn in a read-write transaction. Errors from fn are returned
// as they are; failures of bbolt itself (closed database, I/O errors on
// commit) wrap store.ErrUnavailable.
func (s *Store) update(fn func(*bolt.Tx) error) error {
	var fnErr error
	err := s.db.Update(func(tx *bolt.Tx) error {
		fnErr = fn(tx)
		return fnErr
	})
	return classify(err, fnErr)
}

// view runs fn in a read-only transaction; errors as for update.
func (s *Store) view(fn func(*bolt.Tx) error) error {
	var fnErr error
	err := s.db.View(func(tx *bolt.Tx) error {
		fnErr = fn(tx)
		return fnErr
	})
	return classify(err, fnErr)
}

func classify(err, fnErr error) error {
	switch {
	case fnErr != nil:
		return fnErr
	case err != nil:
		return fmt.Errorf("%w: boltstore: %w", store.ErrUnavailable, err)
	}
	return nil
}

func putJSON(b *bolt.Bucket, key string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), data)
}

// getJSON decodes the value under key, or returns an error wrapping
// store.ErrNotFound.
func getJSON(b *bolt.Bucket, kind, key string, v any) error {
	data := b.Get([]byte(key))
	if data == nil {
		return fmt.Errorf("boltstore: %s %q: %w", kind, key, store.ErrNotFound)
	}
	if err := json.Unmarshal(data, v); err != nil {
		return decodeErr(kind, key, err)
	}
	return nil
}

func decodeErr(kind, key string, err error) error {
	return fmt.Errorf("boltstore: corrupt %s %q: %w", kind, key, err)
}

// now is the time the store records for CreatedAt and RevokedAt: UTC,
// without a monotonic reading, so it equals what is read back.
func now() time.Time {
	return time.Now().UTC().Round(0)
}
