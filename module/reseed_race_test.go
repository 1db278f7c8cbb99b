package module

import (
	"context"
	"encoding/binary"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// Key lookups racing a Redis data loss and the re-seed that follows it,
// step by step: a store wrapper holds a lookup right after it read the
// empty store, while the re-seed runs. TestRedisDataLossReseedsAtOnce
// shows the same under load, by chance; these show each interleaving on
// every run.

const reseedRaceKey = "reseed-race-key-0123456789abcdef"

// pausingStore is a real Redis store whose next key lookup, once armed,
// reads the store and then waits for gate before answering.
type pausingStore struct {
	*redisstore.Store
	armed chan struct{} // holds a token while the next lookup is to pause
	read  chan struct{} // closed once the paused lookup has read the store
	gate  chan struct{} // the paused lookup answers once it is closed
}

// arm makes the next key lookup pause after its read.
func (p *pausingStore) arm() {
	p.read, p.gate = make(chan struct{}), make(chan struct{})
	p.armed <- struct{}{}
}

func (p *pausingStore) KeyByHash(ctx context.Context, hash string) (store.Key, error) {
	k, err := p.Store.KeyByHash(ctx, hash)
	select {
	case <-p.armed:
		close(p.read)
		<-p.gate
	default:
	}
	return k, err
}

// reseedInstance is one Caddy instance's app and shared state on the Redis
// prefix, with the configured customer acme and its key reseedRaceKey,
// synced once.
type reseedInstance struct {
	app *App
	st  *pausingStore
	sum digest
}

func newReseedInstance(t *testing.T, prefix string) *reseedInstance {
	t.Helper()
	rs, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rs.Close() })
	ps := &pausingStore{Store: rs, armed: make(chan struct{}, 1)}
	hasher := apikey.NewHasher([]byte("reseed-race-test-secret-0123456"))
	s := newShared(func() (store.Store, error) { return ps, nil }, "")
	app := &App{
		shared: s, keyHasher: hasher, logger: zap.NewNop(),
		Customers: []CustomerConfig{{ID: "acme", Tier: "pro"}},
		Keys:      []KeyConfig{{Key: reseedRaceKey, Customer: "acme"}},
	}
	if err := app.syncConfig(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &reseedInstance{app: app, st: ps, sum: hasher.Sum(reseedRaceKey)}
}

// lookup looks the configured key up as a request would.
func (in *reseedInstance) lookup() (regEntry, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return in.app.shared.registry.lookup(ctx, in.st, in.sum, time.Now())
}

// pausedLookup starts a lookup of the configured key that holds its
// answer after reading the store, and returns once it has read it; the
// returned function releases it and returns its outcome.
func (in *reseedInstance) pausedLookup(t *testing.T) func() (regEntry, error) {
	t.Helper()
	in.st.arm()
	type result struct {
		e   regEntry
		err error
	}
	done := make(chan result, 1)
	go func() {
		e, err := in.lookup()
		done <- result{e, err}
	}()
	select {
	case <-in.st.read:
	case <-time.After(10 * time.Second):
		t.Fatal("the lookup did not reach the store")
	}
	return func() (regEntry, error) {
		close(in.st.gate)
		r := <-done
		return r.e, r.err
	}
}

// loseRedisData deletes everything under prefix, as a Redis restarted
// without persistence (or flushed) has lost it.
func loseRedisData(t *testing.T, prefix string) {
	t.Helper()
	opts, err := redis.ParseURL(testRedisURL)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	if err := deleteRedisPrefix(context.Background(), rdb, prefix); err != nil {
		t.Fatal(err)
	}
}

// locksOut reports whether a lookup's outcome refuses a valid key with
// 401: no error, and no key found.
func locksOut(e regEntry, err error) bool { return err == nil && !e.found }

// TestMissDuringReseedIsNotFinal: a lookup that read the empty store just
// before this instance stored the configured keys again, and answers
// after the re-seed completed (a fresh marker check, the loss no longer
// flagged), must not answer 401: its read says nothing about the store
// as re-seeded. Whether the loss was already noticed when the lookup
// started or not, it finds the key.
func TestMissDuringReseedIsNotFinal(t *testing.T) {
	for _, noticed := range []bool{false, true} {
		name := "loss not noticed yet"
		if noticed {
			name = "loss noticed"
		}
		t.Run(name, func(t *testing.T) {
			prefix := redisTestPrefix(t)
			in := newReseedInstance(t, prefix)
			if e, err := in.lookup(); err != nil || !e.found {
				t.Fatalf("before the loss: %+v, %v", e, err)
			}
			in.app.shared.registry.invalidate() // e.g. a change notification: the cached lookup is read again
			loseRedisData(t, prefix)
			if noticed {
				if lost, err := in.app.shared.checkSeed(context.Background(), in.st); err != nil || !lost {
					t.Fatalf("checkSeed after the loss = %v, %v; want lost", lost, err)
				}
			}

			answer := in.pausedLookup(t)                                    // read the empty store
			if err := in.app.syncConfig(context.Background()); err != nil { // the re-seed
				t.Fatal(err)
			}
			e, err := answer()
			if locksOut(e, err) {
				t.Fatal("a valid key read during the re-seed was answered as unknown (401) after it completed")
			}
			if err != nil || !e.found {
				t.Errorf("lookup straddling the re-seed: %+v, %v; want the key (the store is complete again)", e, err)
			}
			if e, err := in.lookup(); err != nil || !e.found {
				t.Errorf("next lookup: %+v, %v; want the key", e, err)
			}
		})
	}
}

// TestMissDuringOtherInstanceReseedIsNotFinal: instance a reads the empty
// store while instance b stores the configuration again (b claimed the
// marker first): a must not answer 401 for it.
func TestMissDuringOtherInstanceReseedIsNotFinal(t *testing.T) {
	prefix := redisTestPrefix(t)
	a, b := newReseedInstance(t, prefix), newReseedInstance(t, prefix)
	loseRedisData(t, prefix)
	answer := a.pausedLookup(t)
	if err := b.app.syncConfig(context.Background()); err != nil {
		t.Fatal(err)
	}
	e, err := answer()
	if locksOut(e, err) {
		t.Fatal("instance a answered a valid key read before b's re-seed as unknown (401)")
	}
	if err := a.app.syncConfig(context.Background()); err != nil { // a's resync loop, woken by the loss
		t.Fatal(err)
	}
	if e, err := a.lookup(); err != nil || !e.found {
		t.Errorf("a after its own sync: %+v, %v; want the key", e, err)
	}
}

// TestRevalidationAfterDataLossCachesNoMiss: the background revalidation
// of cached lookups (after the watcher re-subscribed to the restarted
// Redis, or after a change notification of the other instance's re-seed)
// reads the empty store: it must not cache that miss, which every request
// would then get as 401 without the marker ever being checked.
func TestRevalidationAfterDataLossCachesNoMiss(t *testing.T) {
	for _, how := range []string{"resync", "invalidate"} {
		t.Run(how, func(t *testing.T) {
			prefix := redisTestPrefix(t)
			in := newReseedInstance(t, prefix)
			r := in.app.shared.registry
			if e, err := in.lookup(); err != nil || !e.found {
				t.Fatalf("before the loss: %+v, %v", e, err)
			}
			loseRedisData(t, prefix)
			if how == "resync" {
				r.resync()
			} else {
				r.invalidate()
			}
			_ = r.revalidate(context.Background(), in.st) // as revalidateLoop would, woken by the above
			for i := range 3 {
				if e, err := in.lookup(); locksOut(e, err) {
					t.Fatalf("lookup %d after the revalidation: answered as unknown (401)", i)
				}
			}
			if err := in.app.syncConfig(context.Background()); err != nil {
				t.Fatal(err)
			}
			if e, err := in.lookup(); err != nil || !e.found {
				t.Errorf("after the re-seed: %+v, %v; want the key", e, err)
			}
		})
	}
}

// TestMarkerCheckBeforeLookupDoesNotVouchForIt: a marker check that found
// the store intact just before the data was lost must not make a lookup
// of the empty store final; the check has to come after the lookup read.
func TestMarkerCheckBeforeLookupDoesNotVouchForIt(t *testing.T) {
	prefix := redisTestPrefix(t)
	in := newReseedInstance(t, prefix)
	if lost, err := in.app.shared.checkSeed(context.Background(), in.st); err != nil || lost {
		t.Fatalf("checkSeed before the loss = %v, %v; want intact", lost, err)
	}
	loseRedisData(t, prefix)
	e, err := in.lookup()
	if locksOut(e, err) {
		t.Fatal("a lookup of the empty store right after a marker check answered a valid key as unknown (401)")
	}
	if !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("lookup of the empty store: %+v, %v; want store.ErrUnavailable (503)", e, err)
	}
}

// TestUnknownKeyMissIsFinal: with the store intact, an unknown key is a
// miss (401), whether its lookup leads a flight or not.
func TestUnknownKeyMissIsFinal(t *testing.T) {
	prefix := redisTestPrefix(t)
	in := newReseedInstance(t, prefix)
	unknown := apikey.NewHasher([]byte("another-secret-0123456789abcdef")).Sum(reseedRaceKey)
	for i := range 2 {
		e, err := in.app.shared.registry.lookup(context.Background(), in.st, unknown, time.Now())
		if err != nil || e.found {
			t.Fatalf("unknown key, lookup %d: %+v, %v; want a miss", i, e, err)
		}
	}
}

// BenchmarkUnknownKeyLookupRedis: lookups of keys that are in no store
// (each a new one: no negative cache), sequential and concurrent, each
// confirmed final by a marker read made after it.
func BenchmarkUnknownKeyLookupRedis(b *testing.B) {
	prefix := redisTestPrefix(b)
	rs, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { rs.Close() })
	s := newShared(func() (store.Store, error) { return rs, nil }, "")
	app := &App{shared: s, keyHasher: apikey.NewHasher([]byte("reseed-race-test-secret-0123456")), logger: zap.NewNop(),
		Customers: []CustomerConfig{{ID: "acme", Tier: "pro"}}, Keys: []KeyConfig{{Key: reseedRaceKey, Customer: "acme"}}}
	if err := app.syncConfig(context.Background()); err != nil {
		b.Fatal(err)
	}
	var n atomic.Uint64
	unknown := func() digest {
		var sum digest
		binary.BigEndian.PutUint64(sum[:], n.Add(1))
		return sum
	}
	look := func(b *testing.B) {
		e, err := s.registry.lookup(context.Background(), rs, unknown(), time.Now())
		if err != nil || e.found {
			b.Fatalf("unknown key: %+v, %v", e, err)
		}
	}
	b.Run("sequential", func(b *testing.B) {
		for b.Loop() {
			look(b)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(8)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				look(b)
			}
		})
	})
}
