package module

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"maps"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// registry caches key lookups (key digest -> key and customer) so that an
// allowed request does not need a store round trip to authenticate. Every
// change to customers or keys, seen through Store.Watch or made by this
// process, empties it; entries also expire, as a backstop.
//
// While the store cannot be reached, the last lookup of a key is served
// even when expired, so that callers known a moment ago are not refused
// during an outage; but only lookups made since the last invalidation,
// which reflect every change up to it. The lookups cached before an
// invalidation (a revoked key, a customer's old tier) are never served
// again: they wait in pending until the background revalidation
// (revalidateLoop) has read them again from the store. A resync (the store
// connection was re-established: changes may have been missed, none is
// known) empties the cache too but keeps serving its lookups during an
// outage until they are read again, as the outage may have hidden changes
// just as well.
type registry struct {
	mu      sync.RWMutex
	entries map[digest]regEntry
	// stale holds the entries pushed out of entries when it was full, or
	// by a resync, since the last invalidation: served only when the store
	// cannot be reached.
	stale map[digest]regEntry
	// pending holds the digests to read again: cached before the last
	// invalidation (never served) or resync (served from stale meanwhile).
	pending map[digest]struct{}
	gen     uint64
	// wake tells revalidateLoop that pending has new digests.
	wake chan struct{}
	// seed, when set, vouches for lookups that found no active key (see
	// reseed.go): a miss it does not confirm is not an unknown key.
	seed missVerifier
	// uses are the keys' last uses, for the store (see keyUses).
	uses *keyUses
	// inflight collapses concurrent lookups of one key.
	inflight flights
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
	// use records the key's uses; set when found.
	use *keyUse
}

const (
	registryTTL         = time.Minute
	registryNegativeTTL = 5 * time.Second
	registryMaxEntries  = 100_000
	registryMaxNegative = 10_000
)

func newRegistry() *registry {
	return &registry{entries: make(map[digest]regEntry), pending: make(map[digest]struct{}), wake: make(chan struct{}, 1), uses: newKeyUses()}
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

	e, err := r.inflight.do(ctx, sum, gen, func(ctx context.Context) (regEntry, error) {
		// A flight that ended between our cache read and this flight's
		// start kept its answer before it ended: use it, no second call.
		r.mu.RLock()
		c, ok := r.entries[sum]
		ok = ok && r.gen == gen && now.Before(c.expires)
		r.mu.RUnlock()
		if ok {
			return c, nil
		}
		e, err := r.fetchVerified(ctx, st, sum, now)
		if errors.Is(err, errSeedChanged) {
			// The configuration was stored again during the lookup: read
			// it as it is now.
			e, err = r.fetchVerified(ctx, st, sum, now)
		}
		if err == nil {
			if e.found {
				e.use = r.uses.slot(e.key.ID)
			}
			r.keep(sum, gen, e) // before the flight ends: no gap for a second call
		}
		return e, err
	})
	noteStoreError(ctx, err)
	if errors.Is(err, store.ErrUnavailable) {
		if last, ok := r.last(sum); ok {
			return last, nil
		}
	}
	if err != nil {
		return regEntry{}, err
	}

	r.keep(sum, gen, e)
	return e, nil
}

// missVerifier tells a final miss from one the store's data loss, or a
// sync during the lookup, may explain (implemented by shared).
type missVerifier interface {
	// lookupStarts is called before a lookup reads the store; its result
	// is passed to verifyMiss if the lookup finds no active key.
	lookupStarts() *seedView
	// verifyMiss is called right after such a lookup: nil when the miss
	// is final, else an error wrapping store.ErrUnavailable.
	verifyMiss(ctx context.Context, st store.Store, since *seedView) error
}

// fetchVerified is fetch, with a miss confirmed by r.seed.
func (r *registry) fetchVerified(ctx context.Context, st store.Store, sum digest, now time.Time) (regEntry, error) {
	var since *seedView
	if r.seed != nil {
		since = r.seed.lookupStarts()
	}
	e, err := fetch(ctx, st, hex.EncodeToString(sum[:]), now)
	if err == nil && !e.found && r.seed != nil {
		err = r.seed.verifyMiss(ctx, st, since)
	}
	return e, err
}

// keep caches e for sum, looked up in generation gen, unless the registry
// was invalidated meanwhile.
func (r *registry) keep(sum digest, gen uint64, e regEntry) {
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
		delete(r.pending, sum)
	}
	r.mu.Unlock()
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
// entry with found false. An expired key is found: the entry carries its
// expiry, which authenticate enforces at the exact instant.
func fetch(ctx context.Context, st store.Store, hash string, now time.Time) (regEntry, error) {
	notFound := regEntry{expires: now.Add(registryNegativeTTL)}
	k, err := st.KeyByHash(ctx, hash)
	if err == nil && !k.Active() {
		notFound.key = k // a revoked key: read again after invalidations
		return notFound, nil
	}
	if errors.Is(err, store.ErrNotFound) {
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

// last returns the last lookup of sum seen since the last invalidation,
// expired or not, for use while the store is unreachable.
func (r *registry) last(sum digest) (regEntry, bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if e, ok := r.entries[sum]; ok {
		return e, true
	}
	e, ok := r.stale[sum]
	return e, ok
}

// invalidate forgets every cached lookup, from the cache and from the
// outage fallback alike, and has them read again in the background (see
// revalidateLoop).
func (r *registry) invalidate() {
	r.mu.Lock()
	r.gen++
	for _, m := range []map[digest]regEntry{r.entries, r.stale} {
		for sum, e := range m {
			if len(r.pending) >= registryMaxEntries {
				break
			}
			if e.known() {
				r.pending[sum] = struct{}{}
			}
		}
	}
	if len(r.entries) > 0 {
		r.entries = make(map[digest]regEntry)
		r.negatives = 0
	}
	r.stale = nil
	r.wakeRevalidation()
	r.mu.Unlock()
}

// resync empties the cache after the store connection was re-established,
// keeping its lookups as the outage fallback until they are read again.
func (r *registry) resync() {
	r.mu.Lock()
	r.gen++
	for sum, e := range r.entries {
		if len(r.pending) >= registryMaxEntries {
			break
		}
		if e.known() {
			r.pending[sum] = struct{}{}
		}
	}
	// A fallback kept by an earlier resync and not read again yet stays
	// (up to registryMaxEntries).
	if len(r.entries) > 0 {
		if r.stale == nil || len(r.stale) >= registryMaxEntries {
			r.stale = r.entries
		} else {
			maps.Copy(r.stale, r.entries)
		}
		r.entries = make(map[digest]regEntry)
	}
	r.wakeRevalidation()
	r.mu.Unlock()
}

// known reports whether e is worth reading again after an invalidation: a
// key that exists, active or revoked. Unknown keys are not: a scanner's
// keys must not turn each invalidation into as many store lookups.
func (e regEntry) known() bool { return e.found || e.key.ID != "" }

// wakeRevalidation tells revalidateLoop when pending is not empty. The
// caller holds mu.
func (r *registry) wakeRevalidation() {
	if len(r.pending) > 0 {
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
}
