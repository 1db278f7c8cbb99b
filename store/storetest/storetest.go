// Package storetest is the behavioural contract suite every store.Store
// implementation runs. It checks what a user of the store would notice:
// first-writer-wins key secrets, customer and key bookkeeping, exact rate
// budgets under concurrency, and change notifications.
//
// Times given to the store are whole seconds in UTC and compared with
// time.Time.Equal, so an implementation may keep them at any precision down
// to the second. Times the store chooses itself (a zero CreatedAt, a
// revocation time) are only required to be within a minute of the test's
// wall clock, so a store may use its own clock (e.g. the Redis server's).
package storetest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// Timeout bounds every wait for an asynchronous effect (a change
// notification, Watch returning). It is a failure bound, not a delay: tests
// proceed as soon as the effect is observed.
const Timeout = 5 * time.Second

// settle is how long a watcher must stay silent before a step starts, so a
// late notification for an earlier step is not mistaken for the next one.
const settle = 150 * time.Millisecond

// base is an arbitrary whole-second UTC instant used for caller-chosen times.
var base = time.Date(2025, time.March, 14, 9, 26, 53, 0, time.UTC)

// Run runs the contract suite. open must return a fresh, empty store and
// register its own cleanup (closing it, removing its data); it is called
// once or more per subtest.
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("KeySecret", func(t *testing.T) { testKeySecret(t, open) })
	t.Run("Customers", func(t *testing.T) { testCustomers(t, open) })
	t.Run("UpsertConfigCustomer", func(t *testing.T) { testUpsert(t, open) })
	t.Run("Keys", func(t *testing.T) { testKeys(t, open) })
	t.Run("KeyLifecycle", func(t *testing.T) { testKeyLifecycle(t, open) })
	t.Run("Admit", func(t *testing.T) { testAdmit(t, open) })
	t.Run("Watch", func(t *testing.T) { testWatch(t, open) })
}

// RunShared runs the checks for stores shared by several instances. open
// must return two handles on one fresh, empty shared store (as two Caddy
// instances would hold) and register cleanup for both. It checks that both
// handles agree on the key secret, see each other's writes, spend one rate
// budget, and that a change made through a reaches Watch on b.
func RunShared(t *testing.T, open func(t *testing.T) (a, b store.Store)) {
	t.Run("KeySecretAgrees", func(t *testing.T) {
		a, b := open(t)
		handles := []store.Store{a, b}
		secrets := make([][]byte, 32)
		var wg sync.WaitGroup
		for i := range secrets {
			wg.Go(func() {
				s, err := handles[i%2].KeySecret(t.Context(), fmt.Appendf(nil, "candidate-secret-%02d", i))
				if err != nil {
					t.Errorf("KeySecret: %v", err)
				}
				secrets[i] = s
			})
		}
		wg.Wait()
		for i, s := range secrets {
			if string(s) != string(secrets[0]) {
				t.Fatalf("handles disagree on the key secret: call 0 got %q, call %d got %q", secrets[0], i, s)
			}
		}
	})

	t.Run("WritesVisible", func(t *testing.T) {
		a, b := open(t)
		ctx := t.Context()
		c := customer("acme", "free")
		mustCreate(t, a, c)
		got, err := b.GetCustomer(ctx, "acme")
		if err != nil {
			t.Fatalf("GetCustomer via b after CreateCustomer via a: %v", err)
		}
		checkCustomer(t, "via b", got, c)

		if _, err := b.SetTier(ctx, "acme", "pro"); err != nil {
			t.Fatalf("SetTier via b: %v", err)
		}
		if got := mustGet(t, a, "acme"); got.Tier != "pro" {
			t.Errorf("tier via a after SetTier via b = %q, want pro", got.Tier)
		}

		k := key("acme", 1)
		mustPut(t, a, k)
		gotK, err := b.KeyByHash(ctx, k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash via b after PutKey via a: %v", err)
		}
		checkKey(t, "via b", gotK, k)
		if _, err := b.RevokeKey(ctx, k.ID); err != nil {
			t.Fatalf("RevokeKey via b: %v", err)
		}
		if gotK, err := a.KeyByHash(ctx, k.Hash); err != nil || gotK.Active() {
			t.Errorf("KeyByHash via a after RevokeKey via b = %+v, %v; want a revoked key", gotK, err)
		}
	})

	t.Run("AdmitSharesBudget", func(t *testing.T) {
		a, b := open(t)
		allowed := admitConcurrently(t, []store.Store{a, b}, "shared-subject", hourly(100, 100), 1, 200)
		if allowed != 100 {
			t.Errorf("allowed %d of 200 requests through two handles on a 100/hour burst 100 budget, want exactly 100", allowed)
		}
	})

	t.Run("KeyLifecycleShared", func(t *testing.T) { testKeyLifecycleShared(t, open) })

	t.Run("WatchAcrossHandles", func(t *testing.T) {
		a, b := open(t)
		watchSteps(t, a, b)
	})
}

func testKeySecret(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("FirstWriterWins", func(t *testing.T) {
		s := open(t)
		first, err := s.KeySecret(t.Context(), []byte("first-candidate-secret"))
		if err != nil {
			t.Fatalf("KeySecret: %v", err)
		}
		if string(first) != "first-candidate-secret" {
			t.Fatalf("first KeySecret = %q, want the candidate", first)
		}
		again, err := s.KeySecret(t.Context(), []byte("second-candidate-secret"))
		if err != nil {
			t.Fatalf("KeySecret: %v", err)
		}
		if string(again) != "first-candidate-secret" {
			t.Errorf("second KeySecret = %q, want the first candidate", again)
		}
	})
	t.Run("ConcurrentCallersAgree", func(t *testing.T) {
		s := open(t)
		candidates := make([]string, 50)
		secrets := make([][]byte, len(candidates))
		for i := range candidates {
			candidates[i] = fmt.Sprintf("candidate-secret-%02d", i)
		}
		var wg sync.WaitGroup
		for i := range candidates {
			wg.Go(func() {
				sec, err := s.KeySecret(t.Context(), []byte(candidates[i]))
				if err != nil {
					t.Errorf("KeySecret: %v", err)
				}
				secrets[i] = sec
			})
		}
		wg.Wait()
		if !slices.Contains(candidates, string(secrets[0])) {
			t.Fatalf("KeySecret returned %q, which no caller offered", secrets[0])
		}
		for i, sec := range secrets {
			if string(sec) != string(secrets[0]) {
				t.Fatalf("concurrent callers disagree: call 0 got %q, call %d got %q", secrets[0], i, sec)
			}
		}
		later, err := s.KeySecret(t.Context(), []byte("late-candidate-secret"))
		if err != nil || string(later) != string(secrets[0]) {
			t.Errorf("later KeySecret = %q, %v; want %q", later, err, secrets[0])
		}
	})
}

func testCustomers(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("CreateThenGet", func(t *testing.T) {
		s := open(t)
		c := customer("acme", "pro")
		mustCreate(t, s, c)
		checkCustomer(t, "GetCustomer", mustGet(t, s, "acme"), c)
	})
	t.Run("CreateFillsCreatedAt", func(t *testing.T) {
		s := open(t)
		c := customer("acme", "pro")
		c.CreatedAt = time.Time{}
		mustCreate(t, s, c)
		checkNear(t, "CreatedAt of a customer created without one", mustGet(t, s, "acme").CreatedAt)
	})
	t.Run("CreateDuplicateFails", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		if err := s.CreateCustomer(t.Context(), customer("acme", "pro")); err == nil {
			t.Fatal("second CreateCustomer with the same id succeeded")
		}
		if got := mustGet(t, s, "acme"); got.Tier != "free" {
			t.Errorf("failed duplicate CreateCustomer changed the tier to %q", got.Tier)
		}
	})
	t.Run("ConcurrentCreateOneWins", func(t *testing.T) {
		s := open(t)
		errs := make([]error, 20)
		var wg sync.WaitGroup
		for i := range errs {
			wg.Go(func() {
				errs[i] = s.CreateCustomer(t.Context(), customer("acme", fmt.Sprintf("tier-%02d", i)))
			})
		}
		wg.Wait()
		winners := 0
		winnerTier := ""
		for i, err := range errs {
			if err == nil {
				winners++
				winnerTier = fmt.Sprintf("tier-%02d", i)
			}
		}
		if winners != 1 {
			t.Fatalf("%d of %d concurrent CreateCustomer calls for one id succeeded, want exactly 1", winners, len(errs))
		}
		if got := mustGet(t, s, "acme"); got.Tier != winnerTier {
			t.Errorf("stored tier %q, but the successful CreateCustomer wrote %q", got.Tier, winnerTier)
		}
	})
	t.Run("GetMissing", func(t *testing.T) {
		s := open(t)
		if _, err := s.GetCustomer(t.Context(), "nobody"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("GetCustomer(missing) error = %v, want ErrNotFound", err)
		}
	})
	t.Run("ListOrderedByID", func(t *testing.T) {
		s := open(t)
		list, err := s.ListCustomers(t.Context())
		if err != nil || len(list) != 0 {
			t.Fatalf("ListCustomers on an empty store = %v, %v; want none", list, err)
		}
		for _, id := range []string{"zeta", "alpha", "mid", "alpha2", "Beta"} {
			mustCreate(t, s, customer(id, "free"))
		}
		list, err = s.ListCustomers(t.Context())
		if err != nil {
			t.Fatalf("ListCustomers: %v", err)
		}
		var ids []string
		for _, c := range list {
			ids = append(ids, c.ID)
		}
		if want := []string{"Beta", "alpha", "alpha2", "mid", "zeta"}; !slices.Equal(ids, want) {
			t.Fatalf("ListCustomers ids = %q, want %q", ids, want)
		}
		checkCustomer(t, "listed", list[3], customer("mid", "free"))
	})
	t.Run("SetTier", func(t *testing.T) {
		s := open(t)
		c := customer("acme", "free")
		c.ConfigTier = "free"
		mustCreate(t, s, c)
		got, err := s.SetTier(t.Context(), "acme", "pro")
		if err != nil {
			t.Fatalf("SetTier: %v", err)
		}
		want := c
		want.Tier = "pro"
		checkCustomer(t, "SetTier result", got, want)
		checkCustomer(t, "GetCustomer after SetTier", mustGet(t, s, "acme"), want)
	})
	t.Run("SetTierMissing", func(t *testing.T) {
		s := open(t)
		if _, err := s.SetTier(t.Context(), "nobody", "pro"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("SetTier(missing) error = %v, want ErrNotFound", err)
		}
		if _, err := s.GetCustomer(t.Context(), "nobody"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("SetTier(missing) created the customer: GetCustomer error = %v", err)
		}
	})
}

func testUpsert(t *testing.T, open func(t *testing.T) store.Store) {
	configured := func(tier string) store.Customer {
		c := customer("acme", tier)
		c.ConfigTier = tier
		return c
	}
	upsert := func(t *testing.T, s store.Store, c store.Customer) store.Customer {
		t.Helper()
		got, err := s.UpsertConfigCustomer(t.Context(), c)
		if err != nil {
			t.Fatalf("UpsertConfigCustomer: %v", err)
		}
		checkCustomer(t, "GetCustomer after UpsertConfigCustomer", mustGet(t, s, c.ID), got)
		return got
	}

	t.Run("NewIsCreatedAsGiven", func(t *testing.T) {
		s := open(t)
		c := configured("free")
		checkCustomer(t, "UpsertConfigCustomer result", upsert(t, s, c), c)
	})
	t.Run("NewFillsCreatedAt", func(t *testing.T) {
		s := open(t)
		c := configured("free")
		c.CreatedAt = time.Time{}
		checkNear(t, "CreatedAt of a new config customer", upsert(t, s, c).CreatedAt)
	})
	t.Run("SameConfigTierKeepsRuntimeTier", func(t *testing.T) {
		s := open(t)
		upsert(t, s, configured("free"))
		if _, err := s.SetTier(t.Context(), "acme", "pro"); err != nil {
			t.Fatalf("SetTier: %v", err)
		}
		got := upsert(t, s, configured("free"))
		if got.Tier != "pro" || got.ConfigTier != "free" {
			t.Errorf("after reload with the same config tier: Tier %q ConfigTier %q, want pro (runtime change kept) and free", got.Tier, got.ConfigTier)
		}
	})
	t.Run("ChangedConfigTierReplacesTier", func(t *testing.T) {
		s := open(t)
		upsert(t, s, configured("free"))
		if _, err := s.SetTier(t.Context(), "acme", "pro"); err != nil {
			t.Fatalf("SetTier: %v", err)
		}
		got := upsert(t, s, configured("business"))
		if got.Tier != "business" || got.ConfigTier != "business" {
			t.Errorf("after the config changed the tier: Tier %q ConfigTier %q, want business and business", got.Tier, got.ConfigTier)
		}
	})
	t.Run("AdminCreatedThenConfigured", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "pro")) // no ConfigTier
		got := upsert(t, s, configured("free"))
		if got.Tier != "free" || got.ConfigTier != "free" {
			t.Errorf("config declaring a tier for an admin-created customer: Tier %q ConfigTier %q, want free and free", got.Tier, got.ConfigTier)
		}
	})
	t.Run("ContactFieldsUpdated", func(t *testing.T) {
		s := open(t)
		upsert(t, s, configured("free"))
		c := configured("free")
		c.Email = "billing@acme.example"
		c.StripeCustomerID = "cus_NEW"
		got := upsert(t, s, c)
		if got.Email != c.Email || got.StripeCustomerID != c.StripeCustomerID {
			t.Errorf("contact fields after update: Email %q Stripe %q, want %q %q", got.Email, got.StripeCustomerID, c.Email, c.StripeCustomerID)
		}
	})
	t.Run("CreatedAtKept", func(t *testing.T) {
		s := open(t)
		upsert(t, s, configured("free"))
		c := configured("free")
		c.CreatedAt = base.Add(time.Hour)
		if got := upsert(t, s, c); !got.CreatedAt.Equal(base) {
			t.Errorf("CreatedAt after update = %v, want the original %v", got.CreatedAt, base)
		}
	})
	t.Run("AnchorKeptWhenZero", func(t *testing.T) {
		s := open(t)
		upsert(t, s, configured("free"))
		c := configured("free")
		c.Anchor = time.Time{}
		if got := upsert(t, s, c); !got.Anchor.Equal(configured("free").Anchor) {
			t.Errorf("Anchor after update without one = %v, want the original %v", got.Anchor, configured("free").Anchor)
		}
		c.Anchor = base.AddDate(0, 2, 0)
		if got := upsert(t, s, c); !got.Anchor.Equal(c.Anchor) {
			t.Errorf("Anchor after update with one = %v, want %v", got.Anchor, c.Anchor)
		}
	})
}

func testKeys(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("PutThenLookUp", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		k := key("acme", 1)
		checkKey(t, "PutKey result", mustPut(t, s, k), k)
		got, err := s.KeyByHash(t.Context(), k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash: %v", err)
		}
		checkKey(t, "KeyByHash", got, k)
		if !got.Active() {
			t.Error("a new key is not active")
		}
	})
	t.Run("PutFillsCreatedAt", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		k := key("acme", 1)
		k.CreatedAt = time.Time{}
		checkNear(t, "PutKey result CreatedAt", mustPut(t, s, k).CreatedAt)
		got, err := s.KeyByHash(t.Context(), k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash: %v", err)
		}
		checkNear(t, "stored CreatedAt", got.CreatedAt)
	})
	t.Run("KeyByHashMissing", func(t *testing.T) {
		s := open(t)
		if _, err := s.KeyByHash(t.Context(), hash(99)); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("KeyByHash(missing) error = %v, want ErrNotFound", err)
		}
	})
	t.Run("PutExistingMovesOwnerKeepsCreatedAt", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		mustCreate(t, s, customer("globex", "free"))
		k := key("acme", 1)
		mustPut(t, s, k)
		moved := k
		moved.CustomerID = "globex"
		moved.CreatedAt = base.Add(time.Hour)
		want := k
		want.CustomerID = "globex"
		checkKey(t, "PutKey of an existing hash", mustPut(t, s, moved), want)
		got, err := s.KeyByHash(t.Context(), k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash: %v", err)
		}
		checkKey(t, "KeyByHash after owner change", got, want)
		checkKeyIDs(t, s, "acme")
		checkKeyIDs(t, s, "globex", k.ID)
	})
	t.Run("ListKeysOrderedByCreation", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		mustCreate(t, s, customer("globex", "free"))
		mustCreate(t, s, customer("initech", "free"))
		// first, second and third in creation order; neither their hashes,
		// their ids nor the order they are stored in follow it.
		first, second, third := key("acme", 2), key("acme", 3), key("acme", 1)
		first.CreatedAt, second.CreatedAt, third.CreatedAt = base.Add(time.Second), base.Add(2*time.Second), base.Add(3*time.Second)
		first.ID, second.ID, third.ID = "key_c", "key_a", "key_b"
		for _, k := range []store.Key{second, third, key("globex", 4), first} {
			mustPut(t, s, k)
		}
		keys, err := s.ListKeys(t.Context(), "acme")
		if err != nil {
			t.Fatalf("ListKeys: %v", err)
		}
		if len(keys) != 3 {
			t.Fatalf("ListKeys returned %d keys, want 3: %+v", len(keys), keys)
		}
		for i, want := range []store.Key{first, second, third} {
			checkKey(t, fmt.Sprintf("ListKeys[%d]", i), keys[i], want)
		}
		checkKeyIDs(t, s, "initech")
	})
	t.Run("ConcurrentPutsAllListed", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		const n = 40
		var wg sync.WaitGroup
		want := make([]string, n)
		for i := range n {
			k := key("acme", i)
			want[i] = k.ID
			wg.Go(func() {
				if _, err := s.PutKey(t.Context(), k); err != nil {
					t.Errorf("PutKey: %v", err)
				}
			})
		}
		wg.Wait()
		keys, err := s.ListKeys(t.Context(), "acme")
		if err != nil {
			t.Fatalf("ListKeys: %v", err)
		}
		var got []string
		for _, k := range keys {
			got = append(got, k.ID)
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("after %d concurrent PutKey calls ListKeys has %d keys: %q", n, len(got), got)
		}
	})
	t.Run("Revoke", func(t *testing.T) {
		s := open(t)
		ctx := t.Context()
		mustCreate(t, s, customer("acme", "free"))
		k, other := key("acme", 1), key("acme", 2)
		mustPut(t, s, k)
		mustPut(t, s, other)

		revoked, err := s.RevokeKey(ctx, k.ID)
		if err != nil {
			t.Fatalf("RevokeKey: %v", err)
		}
		if revoked.Active() || revoked.Hash != k.Hash {
			t.Fatalf("RevokeKey returned %+v, want the revoked key", revoked)
		}
		checkNear(t, "RevokedAt", revoked.RevokedAt)
		if got, err := s.KeyByHash(ctx, k.Hash); err != nil || !got.RevokedAt.Equal(revoked.RevokedAt) {
			t.Errorf("KeyByHash after revoke = %+v, %v; want RevokedAt %v", got, err, revoked.RevokedAt)
		}
		if got, err := s.KeyByHash(ctx, other.Hash); err != nil || !got.Active() {
			t.Errorf("revoking one key affected another: %+v, %v", got, err)
		}
		keys, err := s.ListKeys(ctx, "acme")
		if err != nil || len(keys) != 2 || keys[0].Active() || !keys[1].Active() {
			t.Errorf("ListKeys after revoke = %+v, %v; want the revoked key then the active one", keys, err)
		}

		again, err := s.RevokeKey(ctx, k.ID)
		if err != nil || !again.RevokedAt.Equal(revoked.RevokedAt) {
			t.Errorf("second RevokeKey = %+v, %v; want the first revocation time %v kept", again, err, revoked.RevokedAt)
		}

		put := mustPut(t, s, k)
		if put.Active() || !put.RevokedAt.Equal(revoked.RevokedAt) {
			t.Errorf("PutKey of a revoked key's hash returned %+v; want it still revoked at %v", put, revoked.RevokedAt)
		}
		if got, err := s.KeyByHash(ctx, k.Hash); err != nil || got.Active() || !got.RevokedAt.Equal(revoked.RevokedAt) {
			t.Errorf("KeyByHash after re-putting a revoked key = %+v, %v; want still revoked at %v", got, err, revoked.RevokedAt)
		}
	})
	t.Run("RevokeMissing", func(t *testing.T) {
		s := open(t)
		if _, err := s.RevokeKey(t.Context(), "key_missing"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("RevokeKey(missing) error = %v, want ErrNotFound", err)
		}
	})
}

func testAdmit(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("ExactBudgetUnderConcurrencyCost1", func(t *testing.T) {
		s := open(t)
		if got := admitConcurrently(t, []store.Store{s}, "acme", hourly(100, 100), 1, 200); got != 100 {
			t.Errorf("allowed %d of 200 concurrent cost-1 requests on 100/hour burst 100, want exactly 100", got)
		}
	})
	t.Run("ExactBudgetUnderConcurrencyCost5", func(t *testing.T) {
		s := open(t)
		if got := admitConcurrently(t, []store.Store{s}, "acme", hourly(100, 100), 5, 200); got != 20 {
			t.Errorf("allowed %d of 200 concurrent cost-5 requests on 100/hour burst 100, want exactly 20", got)
		}
	})
	t.Run("RemainingDecreasesExactly", func(t *testing.T) {
		s := open(t)
		p := hourly(10, 10)
		admitWant(t, s, "acme", p, 1, true, 9)
		admitWant(t, s, "acme", p, 2, true, 7)
		admitWant(t, s, "acme", p, 4, true, 3)
		admitWant(t, s, "acme", p, 3, true, 0)
		d := admitWant(t, s, "acme", p, 1, false, 0)
		// One unit is restored every 6 minutes.
		if d.RetryAfter <= 0 || d.RetryAfter > 6*time.Minute {
			t.Errorf("RetryAfter with an empty bucket = %v, want in (0, 6m]", d.RetryAfter)
		}
	})
	t.Run("DeniedConsumesNothing", func(t *testing.T) {
		s := open(t)
		p := hourly(10, 10)
		admitWant(t, s, "acme", p, 8, true, 2)
		for range 5 {
			d := admitWant(t, s, "acme", p, 5, false, 2)
			if d.RetryAfter <= 0 || d.RetryAfter > 18*time.Minute || d.CostExceedsBurst {
				t.Errorf("denied cost 5 with 2 left: RetryAfter %v CostExceedsBurst %v, want RetryAfter in (0, 18m] and false", d.RetryAfter, d.CostExceedsBurst)
			}
		}
		admitWant(t, s, "acme", p, 2, true, 0)
	})
	t.Run("CostZeroReportsWithoutConsuming", func(t *testing.T) {
		s := open(t)
		p := hourly(10, 10)
		d := admitWant(t, s, "acme", p, 0, true, 10)
		if d.ResetAfter != 0 {
			t.Errorf("ResetAfter of an untouched subject = %v, want 0", d.ResetAfter)
		}
		admitWant(t, s, "acme", p, 3, true, 7)
		for range 5 {
			admitWant(t, s, "acme", p, 0, true, 7)
		}
		admitWant(t, s, "acme", p, 7, true, 0)
		admitWant(t, s, "acme", p, 0, true, 0)
	})
	t.Run("ResetAfterFullBurst", func(t *testing.T) {
		s := open(t)
		d := admitWant(t, s, "acme", hourly(10, 10), 10, true, 0)
		if d.ResetAfter <= 59*time.Minute || d.ResetAfter > time.Hour {
			t.Errorf("ResetAfter after spending the whole 10/hour burst = %v, want just under 1h", d.ResetAfter)
		}
	})
	t.Run("BurstSmallerThanLimit", func(t *testing.T) {
		s := open(t)
		p := hourly(100, 5)
		admitWant(t, s, "acme", p, 5, true, 0)
		admitWant(t, s, "acme", p, 1, false, 0)
	})
	t.Run("CostExceedingBurst", func(t *testing.T) {
		s := open(t)
		p := hourly(10, 10)
		d := admitWant(t, s, "acme", p, 11, false, 10)
		if !d.CostExceedsBurst {
			t.Error("cost 11 on burst 10: CostExceedsBurst is false")
		}
		admitWant(t, s, "acme", p, 10, true, 0)
	})
	t.Run("SubjectsIndependent", func(t *testing.T) {
		s := open(t)
		p := hourly(10, 10)
		admitWant(t, s, "acme", p, 10, true, 0)
		admitWant(t, s, "acme", p, 1, false, 0)
		admitWant(t, s, "globex", p, 1, true, 9)
		admitWant(t, s, "acme", p, 1, false, 0)
	})
	t.Run("RateChangeCarriesOverUnits", func(t *testing.T) {
		// A tier change keeps the units spent, not the time owed: 4 units
		// under 10/hour are 4 units under 20/hour and under 100/hour.
		s := open(t)
		admitWant(t, s, "acme", hourly(10, 10), 4, true, 6)
		admitWant(t, s, "acme", hourly(20, 20), 1, true, 15)
		admitWant(t, s, "acme", hourly(100, 100), 1, true, 94)
		// A downgrade keeps them too, capped at a full burst.
		admitWant(t, s, "acme", hourly(5, 5), 0, true, 0)
		admitWant(t, s, "acme", hourly(5, 5), 1, false, 0)
	})
}

func testWatch(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("SameStore", func(t *testing.T) {
		s := open(t)
		watchSteps(t, s, s)
	})
	t.Run("ReturnsWhenContextDone", func(t *testing.T) {
		s := open(t)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- s.Watch(ctx, func() {}) }()
		cancel()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("Watch returned %v after its context was cancelled, want nil or context.Canceled", err)
			}
		case <-time.After(Timeout):
			t.Fatalf("Watch did not return within %v after its context was cancelled", Timeout)
		}
	})
}

// watchSteps mutates through w (writer) and checks that a Watch on r
// (reader) is told after each kind of change.
func watchSteps(t *testing.T, w, r store.Store) {
	ctx := t.Context()
	mustCreate(t, w, customer("sync", "sync-a"))
	k := key("acme", 1)
	watched := startWatch(t, r)

	// Watch has no readiness signal (a shared store may need a round trip
	// to subscribe), so change something until a notification arrives.
	tiers := []string{"sync-b", "sync-a"}
	deadline := time.After(Timeout)
	for i := 0; ; i++ {
		if _, err := w.SetTier(ctx, "sync", tiers[i%2]); err != nil {
			t.Fatalf("SetTier: %v", err)
		}
		select {
		case <-watched:
		case <-time.After(100 * time.Millisecond):
			continue
		case <-deadline:
			t.Fatalf("Watch saw no change within %v of repeated SetTier calls", Timeout)
		}
		break
	}
	quiet(watched)

	steps := []struct {
		name string
		do   func() error
	}{
		{"CreateCustomer", func() error { return w.CreateCustomer(ctx, customer("acme", "free")) }},
		{"SetTier", func() error { _, err := w.SetTier(ctx, "acme", "pro"); return err }},
		{"UpsertConfigCustomer", func() error {
			c := customer("acme", "business")
			c.ConfigTier = "business"
			_, err := w.UpsertConfigCustomer(ctx, c)
			return err
		}},
		{"PutKey", func() error { _, err := w.PutKey(ctx, k); return err }},
		{"UpdateKey", func() error { name := "n"; _, err := w.UpdateKey(ctx, k.ID, store.KeyChange{Name: &name}); return err }},
		{"RevokeKey", func() error { _, err := w.RevokeKey(ctx, k.ID); return err }},
	}
	for _, step := range steps {
		if err := step.do(); err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		select {
		case <-watched:
		case <-time.After(Timeout):
			t.Fatalf("onChange was not called within %v after %s", Timeout, step.name)
		}
		quiet(watched)
	}
}

// startWatch runs s.Watch until the test ends and returns a channel that
// receives (coalesced) onChange calls. At cleanup it checks that Watch
// returns once its context is cancelled.
func startWatch(t *testing.T, s store.Store) <-chan struct{} {
	ctx, cancel := context.WithCancel(context.Background())
	changed := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- s.Watch(ctx, func() {
			select {
			case changed <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("Watch returned %v after its context was cancelled", err)
			}
		case <-time.After(Timeout):
			t.Errorf("Watch did not return within %v after its context was cancelled", Timeout)
		}
	})
	return changed
}

// quiet drains notifications until none has arrived for settle (or Timeout
// passes, for stores that notify continuously), so that the next step only
// counts notifications caused by itself.
func quiet(changed <-chan struct{}) {
	deadline := time.After(Timeout)
	for {
		select {
		case <-changed:
		case <-time.After(settle):
			return
		case <-deadline:
			return
		}
	}
}

// admitRate is a rate-limit decision alone: a reservation under p with a
// meter-only quota.
func admitRate(ctx context.Context, s store.Store, subject string, p limiter.Policy, cost int64) (limiter.Decision, error) {
	cur, _ := periods()
	out, err := s.Reserve(ctx, store.Reservation{Subject: subject, Rate: p, Cost: cost, Quota: quota(cur, store.QuotaMeter, 0)})
	return out.Rate, err
}

// admitConcurrently sends n concurrent admissions of cost for subject,
// spread over handles, and returns how many were allowed.
func admitConcurrently(t *testing.T, handles []store.Store, subject string, p limiter.Policy, cost int64, n int) int {
	t.Helper()
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		allowed int
	)
	start := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-start
			d, err := admitRate(t.Context(), handles[i%len(handles)], subject, p, cost)
			if err != nil {
				t.Errorf("Admit: %v", err)
				return
			}
			if d.Allowed {
				mu.Lock()
				allowed++
				mu.Unlock()
			}
		})
	}
	close(start)
	wg.Wait()
	return allowed
}

// admitWant admits cost for subject and checks Allowed and Remaining.
func admitWant(t *testing.T, s store.Store, subject string, p limiter.Policy, cost int64, allowed bool, remaining int64) limiter.Decision {
	t.Helper()
	d, err := admitRate(t.Context(), s, subject, p, cost)
	if err != nil {
		t.Fatalf("Admit(%s, cost %d): %v", subject, cost, err)
	}
	if d.Allowed != allowed || d.Remaining != remaining {
		t.Fatalf("Admit(%s, cost %d) = allowed %v remaining %d, want allowed %v remaining %d", subject, cost, d.Allowed, d.Remaining, allowed, remaining)
	}
	if d.Allowed && d.RetryAfter != 0 {
		t.Errorf("Admit(%s, cost %d) allowed with RetryAfter %v, want 0", subject, cost, d.RetryAfter)
	}
	return d
}

func hourly(limit, burst int64) limiter.Policy {
	return limiter.Policy{Limit: limit, Period: time.Hour, Burst: burst}
}

// customer returns a fully populated customer with caller-chosen times.
func customer(id, tier string) store.Customer {
	return store.Customer{
		ID:               id,
		Tier:             tier,
		StripeCustomerID: "cus_" + id,
		Email:            id + "@example.com",
		Anchor:           base.AddDate(0, 1, 0),
		CreatedAt:        base,
	}
}

// hash returns a distinct 64-hex-digit hash for n, shaped like the real ones.
func hash(n int) string { return fmt.Sprintf("%064x", 0xabc000+n) }

// key returns a key numbered n for customerID with a caller-chosen CreatedAt.
func key(customerID string, n int) store.Key {
	h := hash(n)
	return store.Key{
		ID:         "key_" + h[len(h)-12:],
		Hash:       h,
		CustomerID: customerID,
		Prefix:     fmt.Sprintf("am_live_%04d", n),
		CreatedAt:  base.Add(time.Duration(n) * time.Second),
	}
}

func mustCreate(t *testing.T, s store.Store, c store.Customer) {
	t.Helper()
	if err := s.CreateCustomer(t.Context(), c); err != nil {
		t.Fatalf("CreateCustomer(%s): %v", c.ID, err)
	}
}

func mustGet(t *testing.T, s store.Store, id string) store.Customer {
	t.Helper()
	c, err := s.GetCustomer(t.Context(), id)
	if err != nil {
		t.Fatalf("GetCustomer(%s): %v", id, err)
	}
	return c
}

func mustPut(t *testing.T, s store.Store, k store.Key) store.Key {
	t.Helper()
	got, err := s.PutKey(t.Context(), k)
	if err != nil {
		t.Fatalf("PutKey(%s): %v", k.ID, err)
	}
	return got
}

// checkKeyIDs checks the ids ListKeys returns for customerID, in order.
func checkKeyIDs(t *testing.T, s store.Store, customerID string, want ...string) {
	t.Helper()
	keys, err := s.ListKeys(t.Context(), customerID)
	if err != nil {
		t.Fatalf("ListKeys(%s): %v", customerID, err)
	}
	got := []string{}
	for _, k := range keys {
		got = append(got, k.ID)
	}
	if want == nil {
		want = []string{}
	}
	if !slices.Equal(got, want) {
		t.Errorf("ListKeys(%s) ids = %q, want %q", customerID, got, want)
	}
}

func checkCustomer(t *testing.T, what string, got, want store.Customer) {
	t.Helper()
	if got.ID != want.ID || got.Tier != want.Tier || got.ConfigTier != want.ConfigTier ||
		got.StripeCustomerID != want.StripeCustomerID || got.Email != want.Email ||
		!got.Anchor.Equal(want.Anchor) || !got.CreatedAt.Equal(want.CreatedAt) {
		t.Errorf("%s:\n got  %+v\n want %+v", what, got, want)
	}
}

func checkKey(t *testing.T, what string, got, want store.Key) {
	t.Helper()
	if got.ID != want.ID || got.Hash != want.Hash || got.CustomerID != want.CustomerID ||
		got.Prefix != want.Prefix || !got.CreatedAt.Equal(want.CreatedAt) || !got.RevokedAt.Equal(want.RevokedAt) {
		t.Errorf("%s:\n got  %+v\n want %+v", what, got, want)
	}
}

// checkNear checks that a store-chosen time is set and within a minute of
// the test's wall clock.
func checkNear(t *testing.T, what string, got time.Time) {
	t.Helper()
	if d := time.Since(got); got.IsZero() || d > time.Minute || d < -time.Minute {
		t.Errorf("%s = %v, want the current time (within a minute)", what, got)
	}
}
