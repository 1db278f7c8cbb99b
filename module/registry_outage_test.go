package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// unreachableStore is a real store whose key and customer lookups fail
// with store.ErrUnavailable while down is set. The embedded store cannot
// be made unreachable for real, and this test needs the outage to start at
// an exact point; the two-instance test below stops a real Redis.
type unreachableStore struct {
	store.Store
	down atomic.Bool
}

var errTestOutage = fmt.Errorf("%w: test outage", store.ErrUnavailable)

func (s *unreachableStore) KeyByHash(ctx context.Context, hash string) (store.Key, error) {
	if s.down.Load() {
		return store.Key{}, errTestOutage
	}
	return s.Store.KeyByHash(ctx, hash)
}

func (s *unreachableStore) GetCustomer(ctx context.Context, id string) (store.Customer, error) {
	if s.down.Load() {
		return store.Customer{}, errTestOutage
	}
	return s.Store.GetCustomer(ctx, id)
}

// TestRegistryOutageAfterInvalidation: once a key is revoked or a tier
// changed, the key cache never serves the lookup from before during an
// outage; the lookups read again since are served.
func TestRegistryOutageAfterInvalidation(t *testing.T) {
	stores := map[string]func(t *testing.T) store.Store{
		"embedded": func(t *testing.T) store.Store {
			s, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
		"redis": func(t *testing.T) store.Store {
			s, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: redisTestPrefix(t)})
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
	}
	for name, open := range stores {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			inner := open(t)
			t.Cleanup(func() { inner.Close() })
			st := &unreachableStore{Store: inner}
			hasher := apikey.NewHasher([]byte("registry-test-secret-0123"))
			keys := map[string]string{}
			for _, c := range []string{"revoked", "moved", "other"} {
				if err := st.CreateCustomer(ctx, store.Customer{ID: c, Tier: "pro"}); err != nil {
					t.Fatal(err)
				}
				key := apikey.Generate()
				hash := hasher.Hash(key)
				if _, err := st.PutKey(ctx, store.Key{ID: apikey.ID(hash), Hash: hash, CustomerID: c, CreatedAt: time.Now()}); err != nil {
					t.Fatal(err)
				}
				keys[c] = key
			}
			reg := newRegistry()
			look := func(c string) (regEntry, error) {
				return reg.lookup(ctx, st, hasher.Sum(keys[c]), time.Now())
			}
			for c := range keys {
				if e, err := look(c); err != nil || !e.found {
					t.Fatalf("%s before: %+v, %v", c, e, err)
				}
			}
			if _, err := st.RevokeKey(ctx, apikey.ID(hasher.Hash(keys["revoked"]))); err != nil {
				t.Fatal(err)
			}
			if _, err := st.SetTier(ctx, "moved", "free"); err != nil {
				t.Fatal(err)
			}

			// The outage starts before the lookups are read again: none of
			// the old ones is served (503, never the old answer).
			reg.invalidate()
			st.down.Store(true)
			for c := range keys {
				if e, err := look(c); err == nil {
					t.Errorf("%s during an outage right after an invalidation: served %+v; want an error (503)", c, e)
				}
			}
			if err := reg.revalidate(ctx, st); err == nil {
				t.Error("revalidate while the store is unreachable: no error")
			}

			// Read again once the store answers: served during the next
			// outage as they are now.
			st.down.Store(false)
			if err := reg.revalidate(ctx, st); err != nil {
				t.Fatal(err)
			}
			st.down.Store(true)
			if e, err := look("revoked"); err != nil || e.found {
				t.Errorf("revoked key during an outage: %+v, %v; want not found (401)", e, err)
			}
			if e, err := look("moved"); err != nil || !e.found || e.customer.Tier != "free" {
				t.Errorf("moved customer during an outage: %+v, %v; want tier free", e, err)
			}
			if e, err := look("other"); err != nil || !e.found || e.customer.Tier != "pro" {
				t.Errorf("unaffected customer during an outage: %+v, %v; want served", e, err)
			}
		})
	}
}

// TestRevokedKeyAcrossInstancesDuringOutage: a key revoked and a tier
// changed through one instance's admin API are not served by another
// instance while Redis is stalled (SIGSTOP) right after.
func TestRevokedKeyAcrossInstancesDuringOutage(t *testing.T) {
	port := freePort(t)
	startRedis(t, port)
	redisURL := fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	cfg := testConfig{
		storeLine: "redis " + redisURL + "\n\t\tredis_prefix revoke-test:",
		extra:     "admin_api read_write",
	}
	newTester(t, cfg) // instance B, in this process
	instanceA := startCaddy(t, "a", func(adminPort, httpPort int) string {
		return strings.NewReplacer(
			"admin localhost:"+strconv.Itoa(testAdminPort), "admin localhost:"+strconv.Itoa(adminPort),
			"http_port "+strconv.Itoa(testHTTPPort), "http_port "+strconv.Itoa(httpPort),
			":"+strconv.Itoa(testHTTPPort)+" {", ":"+strconv.Itoa(httpPort)+" {",
		).Replace(cfg.String())
	})

	// B caches the three keys.
	for _, c := range []struct{ path, key string }{{"/v1/basic/x", freeKey}, {"/v1/x", proKey}, {"/v1/x", entKey}} {
		if r := call(t, c.path, c.key); r.status != http.StatusOK {
			t.Fatalf("%s before: %d %s", c.path, r.status, r.body)
		}
	}

	// A revokes the free key and moves acme from pro to free.
	adminA := func(method, path, body string) response {
		h := http.Header{}
		if body != "" {
			h.Set("Content-Type", "application/json")
		}
		return do(t, method, instanceA.adminBase+path, h, body)
	}
	r := adminA(http.MethodGet, "/api_monetize/customers/hobbyist/keys", "")
	var listed []struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal([]byte(r.body), &listed); err != nil || len(listed) != 1 {
		t.Fatalf("hobbyist's keys on A: %d %s", r.status, r.body)
	}
	id := listed[0].ID
	if r := adminA(http.MethodDelete, "/api_monetize/keys/"+id, ""); r.status != http.StatusOK {
		t.Fatalf("revoke on A: %d %s", r.status, r.body)
	}
	if r := adminA(http.MethodPut, "/api_monetize/customers/acme/tier", `{"tier":"free"}`); r.status != http.StatusOK {
		t.Fatalf("tier change on A: %d %s", r.status, r.body)
	}
	instanceA.kill(t) // its own view of the outage is not under test

	// B learns of both changes through Redis and reads its lookups again.
	app, err := caddy.ActiveContext().App("api_monetize")
	if err != nil {
		t.Fatal(err)
	}
	b := app.(*App)
	hasher, err := b.hasher(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	reg := b.shared.registry
	known := func() bool {
		reg.mu.RLock()
		defer reg.mu.RUnlock()
		free, pro, ent := reg.entries[hasher.Sum(freeKey)], reg.entries[hasher.Sum(proKey)], reg.entries[hasher.Sum(entKey)]
		return len(reg.pending) == 0 && !free.found && !free.expires.IsZero() &&
			pro.found && pro.customer.Tier == "free" && ent.found
	}
	if !eventually(10*time.Second, known, func(ok bool) bool { return ok }) {
		reg.mu.RLock()
		free, pro, ent := reg.entries[hasher.Sum(freeKey)], reg.entries[hasher.Sum(proKey)], reg.entries[hasher.Sum(entKey)]
		t.Fatalf("B did not read the changed keys again within 10s: generation %d, %d pending; free found %v (expires %v), pro found %v tier %q, enterprise found %v",
			reg.gen, len(reg.pending), free.found, free.expires, pro.found, pro.customer.Tier, ent.found)
		reg.mu.RUnlock()
	}

	// Redis stalls.
	stopRedis(t, port)
	if r := call(t, "/v1/basic/x", freeKey); r.status != http.StatusUnauthorized {
		t.Errorf("revoked key on B during the outage: %d %s; want 401", r.status, r.body)
	}
	if r := call(t, "/v1/x", proKey); r.status != http.StatusForbidden || !strings.Contains(r.body, `"tier":"free"`) {
		t.Errorf("moved customer on a pro endpoint on B during the outage: %d %s; want 403 on tier free", r.status, r.body)
	}
	if r := call(t, "/v1/x", entKey); r.status != http.StatusOK {
		t.Errorf("unaffected customer on B during the outage: %d %s; want 200 (on_store_error local)", r.status, r.body)
	}
}

// stopRedis stalls the redis-server on port with SIGSTOP (it keeps its
// connections and answers nothing) until the test ends.
func stopRedis(t *testing.T, port int) {
	t.Helper()
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port)})
	defer rdb.Close()
	info, err := rdb.Info(context.Background(), "server").Result()
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "process_id:"); ok {
			pid, _ = strconv.Atoi(v)
		}
	}
	if pid <= 0 {
		t.Fatalf("no process_id in INFO server")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
}

// TestRegistryInvalidationSkipsUnknownKeys: the negative cache (unknown
// keys, which a scanner controls) is not read again after an invalidation.
func TestRegistryInvalidationSkipsUnknownKeys(t *testing.T) {
	ctx := context.Background()
	st, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	reg := newRegistry()
	hasher := apikey.NewHasher([]byte("registry-test-secret-0123"))
	for i := range 100 {
		if e, err := reg.lookup(ctx, st, hasher.Sum(fmt.Sprintf("unknown-key-%d", i)), time.Now()); err != nil || e.found {
			t.Fatalf("unknown key: %+v, %v", e, err)
		}
	}
	reg.invalidate()
	reg.mu.RLock()
	defer reg.mu.RUnlock()
	if len(reg.pending) != 0 {
		t.Errorf("%d unknown keys to read again after an invalidation; want none", len(reg.pending))
	}
}

// TestRegistryResync: after the store connection is re-established (no
// change known), the cached lookups keep serving during an outage until
// they are read again, and then serve what the store says.
func TestRegistryResync(t *testing.T) {
	ctx := context.Background()
	inner, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inner.Close() })
	st := &unreachableStore{Store: inner}
	hasher := apikey.NewHasher([]byte("registry-test-secret-0123"))
	if err := st.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	key := apikey.Generate()
	hash := hasher.Hash(key)
	if _, err := st.PutKey(ctx, store.Key{ID: apikey.ID(hash), Hash: hash, CustomerID: "acme", CreatedAt: time.Now()}); err != nil {
		t.Fatal(err)
	}
	reg := newRegistry()
	look := func() (regEntry, error) { return reg.lookup(ctx, st, hasher.Sum(key), time.Now()) }
	if e, err := look(); err != nil || !e.found {
		t.Fatalf("before: %+v, %v", e, err)
	}
	reg.resync()
	st.down.Store(true)
	if e, err := look(); err != nil || !e.found {
		t.Errorf("a cached key during an outage right after a reconnection: %+v, %v; want served", e, err)
	}
	st.down.Store(false)
	if _, err := st.RevokeKey(ctx, apikey.ID(hash)); err != nil {
		t.Fatal(err)
	}
	reg.resync()
	if err := reg.revalidate(ctx, st); err != nil {
		t.Fatal(err)
	}
	st.down.Store(true)
	if e, err := look(); err != nil || e.found {
		t.Errorf("a key revoked before the read after a reconnection, during an outage: %+v, %v; want not found", e, err)
	}
}
