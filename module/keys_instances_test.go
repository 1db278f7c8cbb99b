package module

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

// lifecycleCaddyfile is the shared configuration of the multi-instance
// tests with changes through the admin API allowed.
func lifecycleCaddyfile(prefix string) func(adminPort, httpPort int) string {
	shared := sharedCaddyfile(prefix)
	return func(adminPort, httpPort int) string {
		return strings.Replace(shared(adminPort, httpPort), "key_secret ", "admin_api read_write\n\t\tkey_secret ", 1)
	}
}

// TestKeyRollAcrossInstances rolls a key on one Caddy process while
// another has it cached: during the overlap both keys work on both, and
// from the old key's expiry on both answer the expired problem.
func TestKeyRollAcrossInstances(t *testing.T) {
	prefix := redisTestPrefix(t)
	a := launchCaddy(t, "caddy-a", lifecycleCaddyfile(prefix))
	b := launchCaddy(t, "caddy-b", lifecycleCaddyfile(prefix))
	a.waitServing(t)
	b.waitServing(t)
	get := func(p *caddyProcess, key string) response {
		return do(t, http.MethodGet, p.base+"/v1/items", http.Header{"X-Api-Key": {key}}, "")
	}
	old := decodeKey(t, do(t, http.MethodPost, a.adminBase+"/api_monetize/customers/alpha/keys", nil, `{"name":"ci"}`), http.StatusCreated)
	for _, p := range []*caddyProcess{a, b} { // both cache the old key
		if r := get(p, old.Key); r.status != http.StatusOK {
			t.Fatalf("%s: old key before the roll: %d %s", p.name, r.status, r.body)
		}
	}
	const overlap = 8 * time.Second
	rolled := decodeKey(t, do(t, http.MethodPost, b.adminBase+"/api_monetize/keys/"+old.ID+"/roll", nil, `{"overlap":"8s"}`), http.StatusCreated)
	oldNow := decodeKey(t, do(t, http.MethodGet, a.adminBase+"/api_monetize/keys/"+old.ID, nil, ""), http.StatusOK)
	if oldNow.ExpiresAt == nil || time.Until(*oldNow.ExpiresAt) > overlap {
		t.Fatalf("old key after the roll: %+v", oldNow)
	}
	until := *oldNow.ExpiresAt
	for _, p := range []*caddyProcess{a, b} {
		for name, key := range map[string]string{"old": old.Key, "new": rolled.Key} {
			r := get(p, key)
			if time.Now().After(until) {
				t.Fatalf("the machine took longer than the %v overlap to send the first requests", overlap)
			}
			if r.status != http.StatusOK {
				t.Errorf("%s: %s key during the overlap: %d %s", p.name, name, r.status, r.body)
			}
		}
	}
	// Expiry is enforced at its instant on each instance: wait for it (a
	// known instant, not a guess), then ask at once.
	time.Sleep(time.Until(until))
	for _, p := range []*caddyProcess{a, b} {
		wantExpired(t, get(p, old.Key), until)
		if r := get(p, rolled.Key); r.status != http.StatusOK {
			t.Errorf("%s: new key after the overlap: %d %s", p.name, r.status, r.body)
		}
	}
}

// touchCounter counts the last-use writes made through it.
type touchCounter struct {
	store.Store
	mu     sync.Mutex
	writes map[string][]time.Time // key id -> clock at each write
}

func (c *touchCounter) TouchKeys(ctx context.Context, uses map[string]time.Time) error {
	c.mu.Lock()
	if c.writes == nil {
		c.writes = make(map[string][]time.Time)
	}
	for id := range uses {
		c.writes[id] = append(c.writes[id], clockNow())
	}
	c.mu.Unlock()
	return c.Store.TouchKeys(ctx, uses)
}

// TestKeyLastUseUnderLoad serves requests from several goroutines on one
// (embedded) or two (Redis) instances while a frozen clock walks through
// five minutes and the last-use flush runs as often as it can: each
// instance writes each key at most once per minute, and the stored
// last_used_at is the second of the last request.
func TestKeyLastUseUnderLoad(t *testing.T) {
	t.Run("embedded", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "store.db")
		testKeyLastUseUnderLoad(t, func(app *App) { app.StorePath = path })
	})
	t.Run("redis", func(t *testing.T) {
		prefix := redisTestPrefix(t)
		timeout := caddy.Duration(2 * time.Second)
		testKeyLastUseUnderLoad(t,
			func(app *App) { app.Redis, app.RedisPrefix, app.StoreTimeout = testRedisURL, prefix, timeout },
			// The same Redis spelled differently: a second instance with
			// its own key cache and last-use map.
			func(app *App) {
				app.Redis, app.RedisPrefix, app.StoreTimeout = "redis://localhost:6379/0", prefix, timeout
			})
	})
}

func testKeyLastUseUnderLoad(t *testing.T, instances ...func(app *App)) {
	start := time.Now().UTC().Truncate(time.Second).Add(time.Second)
	freezeClock(t, start)
	var handlers []*Handler
	for _, line := range instances {
		h, stop := benchHandler(t, line)
		t.Cleanup(stop)
		handlers = append(handlers, h)
	}
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusOK)
		return nil
	})
	serve := func(h *Handler) {
		r := httptest.NewRequest(http.MethodGet, "/v1/items", nil)
		r.Header.Set("X-API-Key", "bench-key-0123456789abcdef")
		caddyhttp.NewTestReplacer(r)
		w := httptest.NewRecorder()
		if err := h.ServeHTTP(w, r, next); err != nil || w.Code != http.StatusOK {
			t.Errorf("status %d, err %v", w.Code, err)
		}
	}
	counters := make([]*touchCounter, len(handlers))
	for i, h := range handlers {
		st, err := h.app.store()
		if err != nil {
			t.Fatal(err)
		}
		counters[i] = &touchCounter{Store: st}
	}

	var stop atomic.Bool
	served := make([]atomic.Int64, len(handlers))
	var wg sync.WaitGroup
	for i := range 8 {
		n := i % len(handlers)
		wg.Go(func() {
			for !stop.Load() {
				serve(handlers[n])
				served[n].Add(1)
			}
		})
	}
	const steps = 300 // seconds of frozen clock
	for s := 0; s <= steps; s++ {
		freezeClock(t, start.Add(time.Duration(s)*time.Second))
		// Load at every second of the clock: each instance serves some
		// requests at this instant before the flushes run.
		for i := range served {
			for from := served[i].Load(); served[i].Load() < from+8; {
				runtime.Gosched()
			}
		}
		for range 3 {
			for i, h := range handlers {
				if _, err := h.app.shared.registry.uses.flush(t.Context(), counters[i], clockNow()); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	last := start.Add(steps * time.Second)
	serve(handlers[0]) // the last use, at the clock's last second
	freezeClock(t, last.Add(time.Minute))
	for i, h := range handlers {
		if _, err := h.app.shared.registry.uses.flush(t.Context(), counters[i], clockNow()); err != nil {
			t.Fatal(err)
		}
	}

	keyID := ""
	for i, c := range counters {
		if len(c.writes) != 1 {
			t.Fatalf("instance %d wrote the last use of %d keys, want 1: %v", i, len(c.writes), c.writes)
		}
		for id, times := range c.writes {
			keyID = id
			if len(times) > steps/60+2 {
				t.Errorf("instance %d: %d writes of one key's last use over %d s, want at most one a minute", i, len(times), steps)
			}
			for j := 1; j < len(times); j++ {
				if gap := times[j].Sub(times[j-1]); gap < time.Minute {
					t.Errorf("instance %d: two writes of one key's last use %v apart", i, gap)
				}
			}
		}
	}
	st, _ := handlers[0].app.store()
	k, err := st.KeyByID(t.Context(), keyID)
	if err != nil {
		t.Fatal(err)
	}
	if !k.LastUsedAt.Equal(last) {
		t.Errorf("stored last use %v, want %v (the last request's second)", k.LastUsedAt, last)
	}
}

// TestKeyLastUseWrittenOnStop: the app writes the last uses it holds when
// it stops (a shutdown, or the old config of a reload), so a use is not
// lost for want of a minute.
func TestKeyLastUseWrittenOnStop(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	at := time.Now().UTC().Truncate(time.Second).Add(-time.Hour)
	freezeClock(t, at)
	h, stop := benchHandler(t, func(app *App) { app.StorePath = path })
	r := httptest.NewRequest(http.MethodGet, "/v1/items", nil)
	r.Header.Set("X-API-Key", "bench-key-0123456789abcdef")
	caddyhttp.NewTestReplacer(r)
	w := httptest.NewRecorder()
	if err := h.ServeHTTP(w, r, caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error { return nil })); err != nil || w.Code != http.StatusOK {
		t.Fatalf("status %d, err %v", w.Code, err)
	}
	stop()
	st, err := boltstore.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	keys, err := st.ListKeys(t.Context(), "acme")
	if err != nil || len(keys) != 1 {
		t.Fatalf("ListKeys = %v, %v", keys, err)
	}
	if !keys[0].LastUsedAt.Equal(at) {
		t.Errorf("last use after stop = %v, want %v", keys[0].LastUsedAt, at)
	}
}
