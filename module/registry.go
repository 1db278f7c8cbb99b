package module

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// registry caches key lookups (key digest -> key and customer) so that an
// allowed request does not need a store round trip to authenticate. Every
// change to customers or keys, seen through Store.Watch or made by this
// process, empties it; entries also expire, as a backstop.
type registry struct {
	mu      sync.RWMutex
	entries map[digest]regEntry
	// stale holds the entries of before the last invalidation: served only
	// when the store cannot be reached, so that callers known a moment ago
	// are not refused during an outage (or right after it, while the
	// store's circuit breaker cools down).
	stale map[digest]regEntry
	gen   uint64
	// negatives counts the entries of unknown keys (found false), which
	// are bounded on their own (registryMaxNegative): a scan of distinct
	// unknown keys must not push the callers' keys out of the cache.
	negatives int
}

// digest is a key's HMAC-SHA256 (apikey.Hasher.Sum): the stored hash
// before hex encoding.
type digest = [sha256.Size]byte

// regEntry is a cached lookup. found is false for a hash with no active key,
// so unknown keys don't reach the store on every request.
type regEntry struct {
	key      store.Key
	customer store.Customer
	found    bool
	expires  time.Time
	// placeholders provides the request placeholders of this caller
	// (see Handler), built once per lookup so that a request only adds it
	// to its replacer.
	placeholders caddy.ReplacerFunc
}

const (
	registryTTL         = time.Minute
	registryNegativeTTL = 5 * time.Second
	registryMaxEntries  = 100_000
	registryMaxNegative = 10_000
)

func newRegistry() *registry {
	return &registry{entries: make(map[digest]regEntry)}
}

// lookup returns the active key with this digest and its customer. found
// is false when no active key has it.
func (r *registry) lookup(ctx context.Context, st store.Store, sum digest, now time.Time) (regEntry, error) {
	r.mu.RLock()
	e, ok := r.entries[sum]
	gen := r.gen
	r.mu.RUnlock()
	if ok && now.Before(e.expires) {
		return e, nil
	}

	e, err := fetch(ctx, st, hex.EncodeToString(sum[:]), now)
	if errors.Is(err, store.ErrUnavailable) {
		if last, ok := r.last(sum); ok {
			return last, nil
		}
	}
	if err != nil {
		return regEntry{}, err
	}

	r.mu.Lock()
	if r.gen == gen { // nothing changed while we were reading
		if old, ok := r.entries[sum]; ok && !old.found {
			r.negatives--
		}
		if !e.found {
			if r.negatives >= registryMaxNegative {
				r.dropNegatives()
			}
			r.negatives++
		}
		if len(r.entries) >= registryMaxEntries {
			r.stale, r.entries = r.entries, make(map[digest]regEntry)
			r.negatives = 0
			if !e.found {
				r.negatives = 1
			}
		}
		r.entries[sum] = e
	}
	r.mu.Unlock()
	return e, nil
}

// dropNegatives forgets every cached unknown key. The caller holds r.mu.
func (r *registry) dropNegatives() {
	for sum, e := range r.entries {
		if !e.found {
			delete(r.entries, sum)
		}
	}
	r.negatives = 0
}

// fetch looks hash up in the store: the active key and its customer, or an
// entry with found false.
func fetch(ctx context.Context, st store.Store, hash string, now time.Time) (regEntry, error) {
	notFound := regEntry{expires: now.Add(registryNegativeTTL)}
	k, err := st.KeyByHash(ctx, hash)
	if errors.Is(err, store.ErrNotFound) || (err == nil && !k.Active()) {
		return notFound, nil
	}
	if err != nil {
		return regEntry{}, err
	}
	c, err := st.GetCustomer(ctx, k.CustomerID)
	if errors.Is(err, store.ErrNotFound) {
		return notFound, nil
	}
	if err != nil {
		return regEntry{}, err
	}
	return regEntry{key: k, customer: c, found: true, expires: now.Add(registryTTL), placeholders: placeholders(c.ID, c.Tier, k.ID)}, nil
}

// placeholders provides {http.api_monetize.customer}, .tier and .key_id.
func placeholders(customerID, tier, keyID string) caddy.ReplacerFunc {
	var customerValue, tierValue, keyValue any = customerID, tier, keyID // boxed once
	return func(key string) (any, bool) {
		switch key {
		case "http.api_monetize.customer":
			return customerValue, true
		case "http.api_monetize.tier":
			return tierValue, true
		case "http.api_monetize.key_id":
			return keyValue, true
		}
		return nil, false
	}
}

// last returns the last lookup of sum seen, expired or invalidated, for
// use while the store is unreachable.
func (r *registry) last(sum digest) (regEntry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if e, ok := r.entries[sum]; ok {
		return e, true
	}
	e, ok := r.stale[sum]
	return e, ok
}

// invalidate forgets every cached lookup (keeping them as stale).
func (r *registry) invalidate() {
	r.mu.Lock()
	r.gen++
	if len(r.entries) > 0 {
		r.stale = r.entries
		r.entries = make(map[digest]regEntry)
		r.negatives = 0
	}
	r.mu.Unlock()
}
