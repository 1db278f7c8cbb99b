package module

import (
	"context"
	"encoding/hex"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

// TestLocalShareBound runs n instances' local fallbacks side by side, each
// asked for a unit every 5 ms of an outage, and checks the README's
// bound: together they admit at most n·⌊B/n⌋ + n·⌊D/Tₙ⌋ units (for a
// customer fresh at the outage's start), and a customer Redis last saw
// spent gets only the refill. One instance alone behaves as the tier's own
// limiter.
func TestLocalShareBound(t *testing.T) {
	p := limiter.Policy{Limit: 100, Period: time.Minute}
	const start = int64(1_800_000_000_000_000)
	for _, n := range []int64{1, 2, 3, 7, 100, 150} {
		for _, spent := range []bool{false, true} {
			tn := (n*p.Period.Microseconds()-1)/p.Limit + 1
			d := int64(20 * time.Second / time.Microsecond)
			seenTAT, seenInterval := int64(0), int64(0)
			want := n*max(1, p.Limit/n) + n*(d/tn)
			if spent {
				// Redis's last word: the burst is spent.
				seenTAT, seenInterval = start+p.Limit*p.Interval(), p.Interval()
				want = n * (d/tn + 1)
			}
			admitted := int64(0)
			for range n {
				l := limiter.NewLocal()
				for now := start; now <= start+d; now += 5000 {
					share, floor := localShare(p, n, 1, seenTAT, seenInterval, now)
					if l.AdmitFrom("c", share, 1, now, floor).Allowed {
						admitted++
					}
				}
			}
			if admitted > want {
				t.Errorf("n=%d spent=%v: %d units admitted over %v, want at most %d", n, spent, admitted, time.Duration(d)*time.Microsecond, want)
			}
			if n == 1 && !spent && admitted != p.Limit+d/p.Interval() {
				// (Every 5 ms is finer than the 600 ms interval: the
				// bucket never refills unused.)
				t.Errorf("one instance admitted %d, want the tier's own %d", admitted, p.Limit+d/p.Interval())
			}
			if bound := p.Limit + d*p.Limit/p.Period.Microseconds() + n - 1; !spent && admitted > bound {
				t.Errorf("n=%d: %d admitted, beyond one burst and the rate (%d)", n, admitted, bound)
			}
		}
	}
}

// TestLocalShareExpensiveRequest checks that a request costing more than
// an instance's share of the burst (but no more than the burst) is not
// locked out: it passes on a full local bucket.
func TestLocalShareExpensiveRequest(t *testing.T) {
	p := limiter.Policy{Limit: 100, Period: time.Minute}
	const now = int64(1_800_000_000_000_000)
	l := limiter.NewLocal()
	share, floor := localShare(p, 3, 50, 0, 0, now)
	if d := l.AdmitFrom("c", share, 50, now, floor); !d.Allowed {
		t.Fatalf("a 50-unit request on a full share of 33: %+v", d)
	}
	share, floor = localShare(p, 3, 50, 0, 0, now)
	if d := l.AdmitFrom("c", share, 50, now, floor); d.Allowed {
		t.Fatalf("a second 50-unit request at once: %+v, want denied", d)
	}
	if share, _ := localShare(p, 3, 101, 0, 0, now); share.BurstUnits() >= 101 {
		t.Errorf("a request above the whole burst got burst %d", share.BurstUnits())
	}
}

// countingStore counts key lookups of a real store.
type countingStore struct {
	store.Store
	lookups atomic.Int64
	gate    chan struct{} // when set, lookups wait for it to close
}

func (c *countingStore) KeyByHash(ctx context.Context, hash string) (store.Key, error) {
	c.lookups.Add(1)
	if c.gate != nil {
		<-c.gate
	}
	return c.Store.KeyByHash(ctx, hash)
}

// TestConcurrentLookupsCollapse checks that concurrent lookups of one
// uncached key make one store call, that they all get its answer, and
// that a lookup starting after an invalidation does not take the answer
// of one started before it.
func TestConcurrentLookupsCollapse(t *testing.T) {
	bs, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = bs.Close() })
	ctx := context.Background()
	if err := bs.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	var sum digest
	sum[0] = 1
	hash := hex.EncodeToString(sum[:])
	if _, err := bs.PutKey(ctx, store.Key{ID: "k1", Hash: hash, CustomerID: "acme"}); err != nil {
		t.Fatal(err)
	}
	st := &countingStore{Store: bs, gate: make(chan struct{})}
	r := newRegistry()

	// n concurrent lookups while the first is held in the store: the
	// others join it (or, arriving after it, find the cached answer).
	const n = 200
	var wg sync.WaitGroup
	found := atomic.Int64{}
	for range n {
		wg.Go(func() {
			e, err := r.lookup(ctx, st, sum, time.Now())
			if err == nil && e.found && e.customer.ID == "acme" {
				found.Add(1)
			}
		})
	}
	waitUntil(t, 5*time.Second, "the first lookup reaches the store", func() bool { return st.lookups.Load() > 0 })
	close(st.gate)
	wg.Wait()
	if got := st.lookups.Load(); got != 1 {
		t.Errorf("%d concurrent lookups of one key made %d store calls, want 1", n, got)
	}
	if found.Load() != n {
		t.Errorf("%d of %d concurrent lookups found the key", found.Load(), n)
	}

	// A lookup held in the store, then an invalidation: a lookup after it
	// makes its own store call instead of joining the older one.
	r.invalidate()
	st.lookups.Store(0)
	st.gate = make(chan struct{})
	for range 2 {
		wg.Go(func() {
			if e, err := r.lookup(ctx, st, sum, time.Now()); err != nil || !e.found {
				t.Errorf("lookup: %+v, %v", e, err)
			}
		})
		waitUntil(t, 5*time.Second, "the lookup reaches the store", func() bool { return st.lookups.Load() > 0 })
		r.invalidate()
	}
	waitUntil(t, 5*time.Second, "the lookup after the invalidation reaches the store", func() bool { return st.lookups.Load() == 2 })
	close(st.gate)
	wg.Wait()
}

// TestDegradedAdmissionIsTheStores checks that the decision made while the
// store is unreachable (on_store_error local) is the stores' own: a
// request that costs nothing is admitted over a block quota, as both stores
// admit it, and one that does not fit is refused.
func TestDegradedAdmissionIsTheStores(t *testing.T) {
	a := &App{shared: &shared{local: limiter.NewLocal()}}
	tr := &tierRuntime{onStoreError: storeErrorLocal}
	q := store.Quota{PeriodID: "20261101T000000Z", HourID: "20261101T000000Z", Mode: store.QuotaBlock, Included: 5}
	a.shared.usage.add("c", q.PeriodID, 7) // over the quota (a reported cost, a lowered quota)
	out, err := a.reserveDegraded(store.Reservation{Subject: "c", Cost: 0, Quota: q}, tr)
	if err != nil || !out.Allowed || out.QuotaExceeded {
		t.Errorf("a free request over a block quota during an outage: %+v, %v; want admitted, as the stores admit it", out, err)
	}
	out, err = a.reserveDegraded(store.Reservation{Subject: "c", Cost: 1, Quota: q}, tr)
	if err != nil || out.Allowed || !out.QuotaExceeded || out.Used != 7 {
		t.Errorf("a paid request over a block quota during an outage: %+v, %v; want refused, quota exceeded, used 7", out, err)
	}
}
