package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// openCluster opens a Store on cluster c under a fresh prefix.
func openCluster(t testing.TB, c *rediscluster.Cluster, prefix string) *Store {
	t.Helper()
	return openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: contractTimeout})
}

var clusterPrefixes atomic.Int64

func clusterPrefix() string { return fmt.Sprintf("amc%d:", clusterPrefixes.Add(1)) }

// TestClusterContract runs the store contract suites against a 3-master
// Redis Cluster with a replica each.
func TestClusterContract(t *testing.T) {
	c := rediscluster.Start(t, 3, 1)
	one := func(t *testing.T) store.Store { return openCluster(t, c, clusterPrefix()) }
	two := func(t *testing.T) (store.Store, store.Store) {
		p := clusterPrefix()
		return openCluster(t, c, p), openCluster(t, c, p)
	}
	t.Run("Store", func(t *testing.T) { storetest.Run(t, one) })
	t.Run("Shared", func(t *testing.T) { storetest.RunShared(t, two) })
	t.Run("Meter", func(t *testing.T) { storetest.RunMeter(t, one) })
	t.Run("MeterShared", func(t *testing.T) { storetest.RunMeterShared(t, two) })
	t.Run("Records", func(t *testing.T) { storetest.RunRecords(t, one) })
	t.Run("RecordsShared", func(t *testing.T) { storetest.RunRecordsShared(t, two) })
}

// blockQuota is a block quota of included units in the current month.
func blockQuota(included int64) store.Quota {
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	return store.Quota{
		Mode: store.QuotaBlock, Included: included, PeriodID: p.ID(), PeriodEnd: p.End,
		HourID: metering.TimeID(time.Now().UTC().Truncate(time.Hour)), Thresholds: []int{50, 100},
	}
}

// subjectsOnEveryMaster returns n subjects whose slots cover every master
// of c (n ≥ 3), checked against the cluster itself.
func subjectsOnEveryMaster(t *testing.T, c *rediscluster.Cluster, prefix string, n int) []string {
	t.Helper()
	owners := map[int]int{}
	var subjects []string
	for i := 0; len(subjects) < n || len(owners) < 3; i++ {
		sub := fmt.Sprintf("cust-%d", i)
		m, err := c.MasterFor(t.Context(), prefix+"{"+sub+"}:x")
		if err != nil {
			t.Fatal(err)
		}
		if len(subjects) >= n && owners[m.Port] > 0 {
			continue
		}
		owners[m.Port]++
		subjects = append(subjects, sub)
	}
	return subjects
}

// TestClusterExactness: three store handles (three Caddy instances)
// reserve concurrently against block quotas of customers spread over all
// three masters; each customer is admitted exactly its quota, its usage
// agrees, and each master ran the scripts of its own customers (one
// pipelined client per master).
func TestClusterExactness(t *testing.T) {
	c := rediscluster.Start(t, 3, 1)
	prefix := clusterPrefix()
	handles := []*Store{openCluster(t, c, prefix), openCluster(t, c, prefix), openCluster(t, c, prefix)}
	subjects := subjectsOnEveryMaster(t, c, prefix, 6)
	const included, perSubject = 40, 100
	q := blockQuota(included)
	var admitted sync.Map
	var wg sync.WaitGroup
	for h, s := range handles {
		for _, sub := range subjects {
			wg.Go(func() {
				n := int64(0)
				for i := range perSubject / len(handles) {
					out, err := s.Reserve(t.Context(), store.Reservation{
						Subject: sub, Cost: 1, Quota: q, Origin: fmt.Sprintf("h%d", h), Seq: int64(i + 1),
					})
					if err != nil {
						t.Errorf("Reserve %s: %v", sub, err)
						return
					}
					if out.Allowed {
						n++
					}
				}
				v, _ := admitted.LoadOrStore(sub, new(atomic.Int64))
				v.(*atomic.Int64).Add(n)
			})
		}
	}
	wg.Wait()
	for _, sub := range subjects {
		v, _ := admitted.Load(sub)
		if got := v.(*atomic.Int64).Load(); got != included {
			t.Errorf("%s: admitted %d, want exactly %d", sub, got, included)
		}
		u, err := handles[0].Usage(t.Context(), sub, q.PeriodID)
		if err != nil {
			t.Fatal(err)
		}
		if u.Counters.Billed != included || u.Counters.Requests != included {
			t.Errorf("%s: usage %+v, want %d billed in %d requests", sub, u.Counters, included, included)
		}
	}
	for _, s := range handles {
		s.cluster.mu.RLock()
		n := len(s.cluster.shards)
		s.cluster.mu.RUnlock()
		if n != 3 {
			t.Errorf("a handle has script clients for %d masters, want 3", n)
		}
	}
	// Every customer crossed 50% and 100%: the events are listed through
	// the bucketed index.
	events, err := handles[1].ThresholdEvents(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 2*len(subjects) {
		t.Errorf("%d threshold events, want %d (two per customer): %+v", len(events), 2*len(subjects), events)
	}
}

// TestClusterOutboxReconcile: an outbox whose index entry was lost (the
// index write after the script failed) is found by the next
// reconciliation, which a new process runs at its first listing.
func TestClusterOutboxReconcile(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	a := openCluster(t, c, prefix)
	q := blockQuota(2)
	for i := range 2 {
		if _, err := a.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "a", Seq: int64(i + 1)}); err != nil {
			t.Fatal(err)
		}
	}
	raw := c.Client()
	if err := raw.Del(t.Context(), a.outboxBucketKey(outboxBucket("acme"))).Err(); err != nil {
		t.Fatal(err)
	}
	b := openCluster(t, c, prefix)
	events, err := b.ThresholdEvents(t.Context(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(events) != 2 || events[0].Subject != "acme" {
		t.Fatalf("after losing the index entry, a new process lists %+v, want acme's two events", events)
	}
	if n, _ := raw.Exists(t.Context(), a.outboxBucketKey(outboxBucket("acme"))).Result(); n != 1 {
		t.Errorf("the reconciliation did not restore the index entry")
	}
}

// TestClusterLayout pins the cluster key layout: a customer's metering keys
// on its own slot; the catalogue, records, leases, the seed marker and the
// instances set in buckets (see buckets.go); and nothing written under the
// single-node keys.
func TestClusterLayout(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	s := openCluster(t, c, prefix)
	if err := s.CreateCustomer(t.Context(), store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.KeySecret(t.Context(), []byte("secret-candidate")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.ClaimSeedMarker(t.Context(), "token"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 1, Quota: blockQuota(1)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutKey(t.Context(), store.Key{ID: "k1", Hash: "h1", CustomerID: "acme"}); err != nil {
		t.Fatal(err)
	}
	if err := s.TouchKeys(t.Context(), map[string]time.Time{"k1": time.Now()}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutRecord(t.Context(), store.Record{Kind: "sent", ID: "acme|2026-12", Data: []byte("x")}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := s.TryLease(t.Context(), "report", "me", time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Heartbeat(t.Context(), "inst1", time.Minute); err != nil {
		t.Fatal(err)
	}
	raw := c.Client()
	var keys []string
	var mu sync.Mutex
	err := raw.ForEachMaster(t.Context(), func(ctx context.Context, m *redis.Client) error {
		got, err := m.Keys(ctx, prefix+"*").Result()
		mu.Lock()
		keys = append(keys, got...)
		mu.Unlock()
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	b := func(x string) string { return prefix + bucketTag(bucketOf(x)) }
	want := []string{
		b("acme") + "cust:acme", b("acme") + "customers", b("acme") + "custkeys:acme",
		b("h1") + "key:h1", b("k1") + "keyid:k1", b("k1") + "keyused",
		prefix + bucketTag(0) + "secret",
		b("acme") + "rec:sent:acme|2026-12", b("acme") + "recidx:sent",
		b("report") + "lease:report", b("inst1") + "instances",
		prefix + "{acme}:u:" + blockQuota(1).PeriodID, prefix + "{acme}:outbox",
		prefix + "{ob:" + fmt.Sprint(outboxBucket("acme")) + "}:outbox:subjects",
	}
	for n := range buckets {
		want = append(want, prefix+bucketTag(n)+"seeded")
	}
	for _, want := range want {
		found := false
		for _, k := range keys {
			found = found || k == want
		}
		if !found {
			t.Errorf("key %s missing; keys: %v", want, keys)
		}
	}
	for _, k := range keys {
		if !strings.HasPrefix(k, prefix+"{") {
			t.Errorf("the key %s, without a hash tag, was written in a cluster", k)
		}
	}
	// The buckets spread over every master.
	masters := map[*rediscluster.Node]bool{}
	for n := range buckets {
		m, err := c.MasterFor(t.Context(), prefix+bucketTag(n)+"x")
		if err != nil {
			t.Fatal(err)
		}
		masters[m] = true
	}
	if len(masters) != 3 {
		t.Errorf("the %d buckets are on %d masters, want 3", buckets, len(masters))
	}
}

// TestClusterFailover kills a master while three handles reserve for
// customers on every master, lets its replica take over, and checks that
// no unit was counted twice: for every customer, the usage stored is at
// most the reservations admitted plus those whose outcome was unknown (an
// error after the call may have run). It reports what the failover lost
// (admitted reservations missing from the usage: writes the replica had
// not received) and checks that the customers of the other masters were
// served throughout, and the failed-over ones again within seconds.
func TestClusterFailover(t *testing.T) {
	c := rediscluster.Start(t, 3, 1)
	prefix := clusterPrefix()
	handles := []*Store{}
	for range 3 {
		handles = append(handles, openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: 200 * time.Millisecond}))
	}
	subjects := subjectsOnEveryMaster(t, c, prefix, 6)
	victim, err := c.MasterFor(t.Context(), prefix+"{"+subjects[0]+"}:x")
	if err != nil {
		t.Fatal(err)
	}
	onVictim := map[string]bool{}
	for _, sub := range subjects {
		m, _ := c.MasterFor(t.Context(), prefix+"{"+sub+"}:x")
		onVictim[sub] = m == victim
	}
	q := blockQuota(1 << 40) // never refused for quota
	type tally struct{ ok, unknown, failedOther atomic.Int64 }
	tallies := map[string]*tally{}
	for _, sub := range subjects {
		tallies[sub] = &tally{}
	}
	// healed is set once the cluster reports ok again; recovered once a
	// reservation for a customer of the killed master, begun after that,
	// succeeded.
	var healed, recovered atomic.Bool
	var lastErr atomic.Value
	var otherErrs sync.Map
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for h, s := range handles {
		for _, sub := range subjects {
			wg.Go(func() {
				tl := tallies[sub]
				for ctx.Err() == nil {
					// A steady load that leaves CPU to the tests of other
					// packages running meanwhile (CI runs them in parallel).
					time.Sleep(time.Millisecond)
					after := healed.Load()
					out, err := s.Reserve(ctx, store.Reservation{Subject: sub, Cost: 1, Quota: q})
					switch {
					case err == nil && out.Allowed:
						tl.ok.Add(1)
						if after && onVictim[sub] {
							recovered.Store(true)
						}
					case err == nil:
						t.Errorf("%s refused: %+v", sub, out)
					case ctx.Err() != nil:
						tl.unknown.Add(1)
					default:
						if !errors.Is(err, store.ErrUnavailable) {
							t.Errorf("handle %d, %s: error not marked unavailable: %v", h, sub, err)
						}
						tl.unknown.Add(1) // it may have run
						if healed.Load() && onVictim[sub] {
							lastErr.Store(err.Error())
						}
						if !onVictim[sub] {
							tl.failedOther.Add(1)
							otherErrs.LoadOrStore(err.Error(), true)
						}
						time.Sleep(5 * time.Millisecond)
					}
				}
			})
		}
	}
	time.Sleep(500 * time.Millisecond)
	victim.Kill()
	start := time.Now()
	wctx, wcancel := context.WithTimeout(t.Context(), 30*time.Second)
	err = c.WaitFailover(wctx, victim, prefix+"{"+subjects[0]+"}:x")
	wcancel()
	if err != nil {
		t.Fatalf("the cluster did not recover from the master's death: %v", err)
	}
	t.Logf("failover: the cluster is ok again %v after the kill", time.Since(start).Round(time.Millisecond))
	healed.Store(true)
	for !recovered.Load() && time.Since(start) < 30*time.Second {
		time.Sleep(20 * time.Millisecond)
	}
	took := time.Since(start)
	time.Sleep(300 * time.Millisecond)
	stop()
	wg.Wait()
	if !recovered.Load() {
		t.Fatalf("the failed-over customers were not served again within 30s; last error: %v", lastErr.Load())
	}
	t.Logf("failover: customers of the killed master served again %v after the kill", took.Round(time.Millisecond))
	var lost int64
	for _, sub := range subjects {
		tl := tallies[sub]
		var u store.PeriodUsage
		for i := 0; ; i++ {
			// A read may first meet go-redis's stale map (reloaded every 2s).
			if u, err = handles[0].Usage(t.Context(), sub, q.PeriodID); err == nil || i == 50 {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		ok, unknown := tl.ok.Load(), tl.unknown.Load()
		if u.Counters.Billed > ok+unknown {
			t.Errorf("%s: %d units stored, but only %d admitted and %d unknown: counted twice", sub, u.Counters.Billed, ok, unknown)
		}
		if u.Counters.Billed < ok {
			lost += ok - u.Counters.Billed
		}
		if !onVictim[sub] && u.Counters.Billed < ok {
			t.Errorf("%s (on a surviving master): %d admitted, only %d stored", sub, ok, u.Counters.Billed)
		}
		if n := tl.failedOther.Load(); n > 0 {
			t.Errorf("%s (surviving master): %d calls failed during the failover", sub, n)
		}
		t.Logf("%s (killed master: %v): admitted %d, unknown %d, stored %d", sub, onVictim[sub], ok, unknown, u.Counters.Billed)
	}
	otherErrs.Range(func(k, _ any) bool { t.Logf("surviving master error: %v", k); return true })
	t.Logf("failover lost %d admitted units (acknowledged writes the replica had not received)", lost)
}

// TestClusterRejectsBracedPrefix: a prefix with a brace would change the
// hash tags.
func TestClusterRejectsBracedPrefix(t *testing.T) {
	_, err := New(Options{URL: "redis://127.0.0.1:7000", Cluster: true, KeyPrefix: "a{b}:"})
	if err == nil || !strings.Contains(err.Error(), "'{'") {
		t.Fatalf("New with a braced prefix: %v, want an error", err)
	}
}

// TestClusterResharding moves the slot of a busy customer to another
// master, as redis-cli --cluster reshard does (MIGRATE of 10 keys at a
// time), while three handles reserve for it, some requests with an
// idempotency key of their own (so the slot holds many keys). The calls
// follow the redirections (ASK during the move, MOVED after it) and retry
// TRYAGAIN (the customer's keys split between the masters: Redis refuses
// multi-key scripts then, and the script does not run); a call still
// refused at its deadline fails as unavailable within OpTimeout. No unit
// is counted twice or lost: the usage stored is what was admitted.
func TestClusterResharding(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	const opTimeout = 500 * time.Millisecond
	handles := []*Store{}
	for range 3 {
		handles = append(handles, openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: opTimeout}))
	}
	const sub = "acme"
	q := blockQuota(1 << 40)
	var ok, failed, slow atomic.Int64
	var seq atomic.Int64
	ctx, stop := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	for _, s := range handles {
		for range 4 {
			wg.Go(func() {
				for ctx.Err() == nil {
					time.Sleep(200 * time.Microsecond) // see TestClusterFailover
					r := store.Reservation{Subject: sub, Cost: 1, Quota: q}
					if n := seq.Add(1); n%4 == 0 {
						r.IdempotencyKey, r.IdempotencyFingerprint = fmt.Sprintf("req-%d", n), "fp"
						r.IdempotencyRepeats, r.IdempotencyWindow = 1, time.Minute
					}
					began := time.Now()
					out, err := s.Reserve(ctx, r)
					switch {
					case err == nil && out.Allowed && !out.Duplicate:
						ok.Add(1)
					case ctx.Err() != nil:
						// cancelled at the end: it may have run (below)
					case err != nil && errors.Is(err, store.ErrUnavailable):
						failed.Add(1)
						if time.Since(began) > opTimeout+200*time.Millisecond {
							slow.Add(1)
						}
					default:
						t.Errorf("Reserve: %+v, %v", out, err)
					}
				}
			})
		}
	}
	time.Sleep(300 * time.Millisecond)
	slot, err := c.Slot(t.Context(), prefix+"{"+sub+"}:x")
	if err != nil {
		t.Fatal(err)
	}
	from, err := c.MasterFor(t.Context(), prefix+"{"+sub+"}:x")
	if err != nil {
		t.Fatal(err)
	}
	var to *rediscluster.Node
	for _, m := range c.Masters(t.Context()) {
		if m != from {
			to = m
			break
		}
	}
	start := time.Now()
	before := ok.Load()
	if err := c.MoveSlot(t.Context(), slot, to, 10, 0); err != nil {
		t.Fatalf("moving the slot: %v", err)
	}
	took := time.Since(start)
	during := ok.Load() - before
	time.Sleep(300 * time.Millisecond)
	stop()
	wg.Wait()
	if m, _ := c.MasterFor(t.Context(), prefix+"{"+sub+"}:x"); m != to {
		t.Fatalf("the slot did not move")
	}
	var redirects, retries int64
	for _, s := range handles {
		redirects += s.cluster.redirects.Load()
		retries += s.cluster.retries.Load()
	}
	t.Logf("moved slot %d (%d reservations admitted before) in %v: %d admitted meanwhile, %d failed as unavailable; %d redirections followed, %d TRYAGAIN retried",
		slot, before, took.Round(time.Millisecond), during, failed.Load(), redirects, retries)
	if redirects == 0 {
		t.Errorf("no redirection followed: the handles' maps were never stale?")
	}
	if n := slow.Load(); n > 0 {
		t.Errorf("%d failed calls took longer than OpTimeout", n)
	}
	u, err := handles[0].Usage(t.Context(), sub, q.PeriodID)
	if err != nil {
		t.Fatal(err)
	}
	// Calls cancelled at the end may have run: at most one per worker.
	if u.Counters.Billed < ok.Load() || u.Counters.Billed > ok.Load()+12 {
		t.Errorf("stored %d units, admitted %d: counted twice or lost", u.Counters.Billed, ok.Load())
	}
	if after := ok.Load() - before - during; after == 0 {
		t.Errorf("nothing admitted after the move")
	}
}

// TestClusterSeedMarkerWithCatalogue: a master that loses its data (and
// with it its buckets' customers and keys) loses the seed marker with it,
// so the instances notice and store them again (module/reseed.go). The
// master here is not bucket 0's, whose copy survives: the claim after the
// loss still installs a new token, so that every instance that adopted the
// old one sees the loss (a claim restoring the old token would let an
// instance confirm a key lookup that missed during the loss).
func TestClusterSeedMarkerWithCatalogue(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	s := openCluster(t, c, prefix)
	ctx := t.Context()
	first, err := c.MasterFor(ctx, s.seedKey(0))
	if err != nil {
		t.Fatal(err)
	}
	// A customer on another master than bucket 0's.
	var id string
	var node *rediscluster.Node
	for i := 0; node == nil; i++ {
		id = fmt.Sprint("acme-", i)
		m, err := c.MasterFor(ctx, s.custKey(id))
		if err != nil {
			t.Fatal(err)
		}
		if m != first {
			node = m
		}
	}
	if err := s.CreateCustomer(ctx, store.Customer{ID: id, Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	if got, err := s.ClaimSeedMarker(ctx, "token"); err != nil || got != "token" {
		t.Fatalf("ClaimSeedMarker = %q, %v", got, err)
	}
	if got, err := s.ClaimSeedMarker(ctx, "other"); err != nil || got != "token" {
		t.Fatalf("a second ClaimSeedMarker = %q, %v; want the first claim's token", got, err)
	}
	cl := redis.NewClient(&redis.Options{Addr: node.Addr()})
	defer cl.Close()
	if err := cl.FlushAll(ctx).Err(); err != nil { // a private cluster
		t.Fatal(err)
	}
	if _, err := s.GetCustomer(ctx, id); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("after the customer's master lost its data, GetCustomer: %v, want not found", err)
	}
	if got, err := s.SeedMarker(ctx); err != nil || got != "" {
		t.Fatalf("after a master lost its data, the seed marker is %q (%v), want gone", got, err)
	}
	got, err := s.ClaimSeedMarker(ctx, "token2")
	if err != nil || got != "token2" {
		t.Fatalf("the claim after the loss = %q, %v; want the new token", got, err)
	}
	if now, err := s.SeedMarker(ctx); err != nil || now != "token2" {
		t.Fatalf("after the new claim, the seed marker is %q (%v)", now, err)
	}
}

// TestClusterStuckMigrationKeepsMasterServing: while a customer's slot
// stays split (a migration begun and not finished, so Redis answers its
// multi-key scripts TRYAGAIN), that customer's calls fail as unavailable
// within OpTimeout, and the master's other customers are still served:
// TRYAGAIN is an answer, so the master's breaker stays closed.
func TestClusterStuckMigrationKeepsMasterServing(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	const opTimeout = 50 * time.Millisecond
	s := openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: opTimeout, BreakerFailures: 2})
	q := blockQuota(1 << 40)
	key := func(sub string) string { return prefix + "{" + sub + "}:x" }
	master, err := c.MasterFor(t.Context(), key("acme"))
	if err != nil {
		t.Fatal(err)
	}
	// Another customer on the same master, in another slot.
	other := ""
	for i := 0; other == ""; i++ {
		sub := fmt.Sprint("neighbour-", i)
		m, err := c.MasterFor(t.Context(), key(sub))
		if err != nil {
			t.Fatal(err)
		}
		a, _ := c.Slot(t.Context(), key(sub))
		b, _ := c.Slot(t.Context(), key("acme"))
		if m == master && a != b {
			other = sub
		}
	}
	for _, sub := range []string{"acme", other} {
		if _, err := s.Reserve(t.Context(), store.Reservation{Subject: sub, Cost: 1, Quota: q}); err != nil {
			t.Fatal(err)
		}
	}
	slot, err := c.Slot(t.Context(), key("acme"))
	if err != nil {
		t.Fatal(err)
	}
	var to *rediscluster.Node
	for _, m := range c.Masters(t.Context()) {
		if m != master {
			to = m
		}
	}
	from, err := c.BeginMigration(t.Context(), slot, to)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.CancelMigration(context.Background(), slot, from, to) }()
	for i := range 5 {
		began := time.Now()
		_, err := s.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 1, Quota: q})
		if !errors.Is(err, store.ErrUnavailable) || !strings.Contains(err.Error(), "TRYAGAIN") {
			t.Fatalf("reservation %d for the customer whose slot is split: %v, want unavailable (TRYAGAIN)", i, err)
		}
		if took := time.Since(began); took > opTimeout+100*time.Millisecond {
			t.Errorf("reservation %d took %v, OpTimeout is %v", i, took, opTimeout)
		}
	}
	if _, err := s.Reserve(t.Context(), store.Reservation{Subject: other, Cost: 1, Quota: q}); err != nil {
		t.Fatalf("the master's other customer after 5 TRYAGAIN failures: %v", err)
	}
}

// TestClusterWaitReplicas: with WaitReplicas 1, a reservation is answered
// only once the replica of its master has it: read from the replica right
// after each answer, the counters already include it. (Without WAIT the
// same reads find the replica behind now and then; logged for comparison.)
func TestClusterWaitReplicas(t *testing.T) {
	c := rediscluster.Start(t, 3, 1)
	for _, wait := range []int{1, 0} {
		prefix := clusterPrefix()
		s := openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: time.Second, WaitReplicas: wait})
		q := blockQuota(1 << 40)
		master, err := c.MasterFor(t.Context(), prefix+"{acme}:x")
		if err != nil {
			t.Fatal(err)
		}
		replica := c.ReplicaOf(t.Context(), master)
		if replica == nil {
			t.Fatal("the master has no replica")
		}
		rc := redis.NewClient(&redis.Options{Addr: replica.Addr(), OnConnect: func(ctx context.Context, cn *redis.Conn) error {
			return cn.ReadOnly(ctx).Err()
		}})
		behind, unreported := 0, 0
		const n = 300
		for i := range n {
			before := s.Unreplicated()
			if _, err := s.Reserve(t.Context(), store.Reservation{Subject: "acme", Cost: 1, Quota: q}); err != nil {
				t.Fatal(err)
			}
			v, err := rc.HGet(t.Context(), s.periodKey("acme", q.PeriodID), "c").Result()
			if err != nil && !errors.Is(err, redis.Nil) {
				t.Fatal(err)
			}
			if got, ok := packedInts(v, 5); !ok || got[0] != int64(i+1) {
				behind++
				// A WAIT that timed out (a loaded machine) is counted by the
				// store; a reservation behind without that is a broken promise.
				if s.Unreplicated() == before {
					unreported++
				}
			}
		}
		_ = rc.Close()
		if wait > 0 {
			if unreported > 0 {
				t.Errorf("with WAIT 1: the replica lacked %d of %d answered reservations, %d of them in pipelines not counted as unreplicated", behind, n, unreported)
			}
			t.Logf("with WAIT 1: %d of %d behind, all in the %d pipelines counted as unreplicated", behind, n, s.Unreplicated())
		} else {
			t.Logf("without WAIT: the replica lacked %d of %d answered reservations when read right after", behind, n)
		}
	}
}

// TestClusterDeadMasterCatalogueUnavailable: a catalogue read whose master
// is dead (killed, no replica to take over) fails as unavailable, so the
// tier's on_store_error applies; it is not "busy" (local saturation), and
// it fails within OpTimeout.
func TestClusterDeadMasterCatalogueUnavailable(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	prefix := clusterPrefix()
	const opTimeout = 200 * time.Millisecond
	s := openStore(t, Options{URL: c.URL(), Cluster: true, KeyPrefix: prefix, OpTimeout: opTimeout})
	if err := s.CreateCustomer(t.Context(), store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatal(err)
	}
	node, err := c.MasterFor(t.Context(), s.custKey("acme"))
	if err != nil {
		t.Fatal(err)
	}
	node.Kill()
	for i := range 3 {
		began := time.Now()
		_, err := s.GetCustomer(t.Context(), "acme")
		if !errors.Is(err, store.ErrUnavailable) || errors.Is(err, store.ErrBusy) {
			t.Fatalf("read %d of a customer on a dead master: %v, want unavailable (not busy)", i, err)
		}
		if took := time.Since(began); took > opTimeout+200*time.Millisecond {
			t.Errorf("read %d took %v, OpTimeout is %v", i, took, opTimeout)
		}
	}
}

// TestClusterConcurrentSeedClaimsAgree: instances starting together on an
// empty cluster claim the seed marker at the same moment. A claim that
// finds another's copies half written must complete that claim, not read
// it as a data loss: every claim returns the same token, and the marker
// reads as that token afterwards (before, a later claim replaced the first
// one's token while it was writing its copies, so the first instance
// reported "the store lost its data" on a fresh start).
func TestClusterConcurrentSeedClaimsAgree(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	ctx := t.Context()
	for round := range 20 {
		prefix := clusterPrefix()
		const n = 4
		stores := make([]*Store, n)
		for i := range stores {
			stores[i] = openCluster(t, c, prefix)
		}
		got := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range stores {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				got[i], errs[i] = stores[i].ClaimSeedMarker(ctx, fmt.Sprintf("token-%d", i))
			}()
		}
		close(start)
		wg.Wait()
		for i := range stores {
			if errs[i] != nil {
				t.Fatalf("round %d: claim %d: %v", round, i, errs[i])
			}
			if got[i] != got[0] {
				t.Fatalf("round %d: concurrent claims returned different tokens %q", round, got)
			}
		}
		for i, s := range stores {
			if now, err := s.SeedMarker(ctx); err != nil || now != got[0] {
				t.Fatalf("round %d: after the claims, store %d reads the seed marker %q (%v), want %q", round, i, now, err, got[0])
			}
		}
	}
}
