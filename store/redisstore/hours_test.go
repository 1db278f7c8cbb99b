package redisstore

import (
	"context"
	"crypto/sha256"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifier"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// meteredIndexKey reports whether k, under a single Redis's prefix, is
// one of the indexes of metered subjects, which admitted metering calls
// write in the background (the tests that list a call's keys leave them
// out; TestHourIndexAndLateSubjects covers them).
func meteredIndexKey(prefix, k string) bool {
	return strings.HasPrefix(k, prefix+"active:") || k == prefix+"late"
}

// commandCalls sums the calls of INFO commandstats, leaving out the
// commands no store call makes (the test's own INFO, replication and
// cluster-map housekeeping).
func commandCalls(info string) int64 {
	var n int64
	for _, line := range strings.Split(info, "\n") {
		name, rest, ok := strings.Cut(strings.TrimPrefix(strings.TrimSpace(line), "cmdstat_"), ":calls=")
		if !ok || slices.Contains([]string{"info", "replconf", "ping", "cluster", "command", "hello", "client", "config"}, strings.Split(name, "|")[0]) {
			continue
		}
		v, _, _ := strings.Cut(rest, ",")
		c, _ := strconv.ParseInt(v, 10, 64)
		n += c
	}
	return n
}

// serverCommands counts the commands the servers behind addrs ran.
func serverCommands(t *testing.T, addrs []string) int64 {
	t.Helper()
	var n int64
	for _, a := range addrs {
		cl := redis.NewClient(&redis.Options{Addr: a})
		info, err := cl.Info(context.Background(), "commandstats").Result()
		_ = cl.Close()
		if err != nil {
			t.Fatal(err)
		}
		n += commandCalls(info)
	}
	return n
}

// reporterTickCommands stores idle customers (with a Stripe id and no
// usage) and three customers with usage, and counts the Redis commands of
// the reporter's first tick (a full pass) and of a tick after the next
// hour closed. It checks every hour reached Stripe once.
func reporterTickCommands(t *testing.T, st *Store, addrs []string, idle int) (full, next int64) {
	t.Helper()
	ctx := context.Background()
	double := stripedouble.New()
	t.Cleanup(double.Close)
	for i := range idle {
		if err := st.CreateCustomer(ctx, store.Customer{ID: fmt.Sprintf("idle-%04d", i), Tier: "pro", StripeCustomerID: fmt.Sprintf("cus_I%d", i), CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	active := []string{"act-a", "act-b", "act-c"}
	for _, id := range active {
		if err := st.CreateCustomer(ctx, store.Customer{ID: id, Tier: "pro", StripeCustomerID: "cus_" + id, CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
	}
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	h1 := time.Now().UTC().Truncate(time.Hour).Add(-4 * time.Hour)
	h2 := h1.Add(time.Hour)
	meter := func(h time.Time) {
		t.Helper()
		q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(h)}
		for _, id := range active {
			if _, err := st.Reserve(ctx, store.Reservation{Subject: id, Cost: 2, Quota: q}); err != nil {
				t.Fatal(err)
			}
		}
		// The index writes run in the background: wait until they landed.
		deadline := time.Now().Add(10 * time.Second)
		for {
			subs, err := st.HourSubjects(ctx, metering.TimeID(h))
			if err == nil && len(subs) == len(active) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("hour index of %s: %v, %v", metering.TimeID(h), subs, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	var now time.Time
	r := &stripereport.Reporter{
		Client: stripereport.NewClient("sk_test_123", double.URL, 5*time.Second), Store: st,
		Meter: "api_calls", Namespace: "test", SettleGrace: time.Minute, Holder: "h", LeaseTTL: time.Hour,
		Periods: func(store.Customer, time.Time) []string { return []string{p.ID()} },
		Retry:   stripereport.Retry{Attempts: 1},
		Now:     func() time.Time { return now },
	}
	tick := func(at time.Time) int64 {
		t.Helper()
		now = at
		before := serverCommands(t, addrs)
		res, err := r.Tick(ctx)
		after := serverCommands(t, addrs)
		if err != nil || res.Sent != len(active) {
			t.Fatalf("tick at %v: %+v, %v; want %d hours sent", at, res, err, len(active))
		}
		return after - before
	}
	meter(h1)
	full = tick(h1.Add(time.Hour + 2*time.Minute))
	meter(h2)
	next = tick(h2.Add(time.Hour + 2*time.Minute))
	if n := len(double.Events()); n != 2*len(active) {
		t.Fatalf("Stripe has %d events, want %d (one per customer and hour)", n, 2*len(active))
	}
	return full, next
}

// TestReporterTickCommandsIndependentOfIdleCustomers: once the reporter
// has its cursor, a tick's Redis commands do not grow with customers that
// have no usage. With 20 and with 2,000 idle customers, a tick after an
// hour closed runs the same number of commands (within a few of
// background noise), on a single Redis and on a cluster; the first tick,
// a full pass over every customer, grows with them.
func TestReporterTickCommandsIndependentOfIdleCustomers(t *testing.T) {
	run := func(t *testing.T, open func(t *testing.T) *Store, addrs []string) {
		full20, next20 := reporterTickCommands(t, open(t), addrs, 20)
		full2k, next2k := reporterTickCommands(t, open(t), addrs, 2000)
		t.Logf("Redis commands per tick: full pass %d (20 idle) and %d (2,000 idle); after an hour closed %d (20 idle) and %d (2,000 idle)", full20, full2k, next20, next2k)
		if full2k < full20+2000 {
			t.Fatalf("the full pass ran %d commands with 2,000 idle customers and %d with 20: it should read every customer", full2k, full20)
		}
		if next2k > next20+5 {
			t.Fatalf("a tick ran %d commands with 2,000 idle customers and %d with 20: it grows with idle customers", next2k, next20)
		}
	}
	t.Run("redis", func(t *testing.T) {
		// A private server: INFO commandstats counts every client's
		// commands, and other packages' tests use the shared Redis.
		srv := rediscluster.StartServer(t)
		run(t, func(t *testing.T) *Store {
			return openStore(t, Options{URL: "redis://" + srv.Addr(), KeyPrefix: newPrefix(t)})
		}, []string{srv.Addr()})
	})
	t.Run("cluster", func(t *testing.T) {
		c := rediscluster.Start(t, 3, 0)
		var addrs []string
		for _, m := range c.Masters(context.Background()) {
			addrs = append(addrs, m.Addr())
		}
		run(t, func(t *testing.T) *Store { return openCluster(t, c, clusterPrefix()) }, addrs)
	})
}

// TestHourIndexAndLateSubjects: a metering call indexes its subject in its
// hour; a call for an earlier hour than the current one also marks the
// subject late, and DoneLate removes it only at the version it read, so a
// late call made after the read is not forgotten.
func TestHourIndexAndLateSubjects(t *testing.T) {
	run := func(t *testing.T, st *Store) {
		ctx := context.Background()
		p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
		old := metering.TimeID(time.Now().UTC().Truncate(time.Hour).Add(-2 * time.Hour))
		reserve := func() {
			t.Helper()
			q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: old}
			if _, err := st.Reserve(ctx, store.Reservation{Subject: "late-sub", Cost: 1, Quota: q, Replay: true}); err != nil {
				t.Fatal(err)
			}
		}
		waitLate := func(after int64) store.LateSubject {
			t.Helper()
			deadline := time.Now().Add(10 * time.Second)
			for {
				late, err := st.LateSubjects(ctx)
				if err == nil && len(late) == 1 && late[0].Subject == "late-sub" && late[0].Version > after {
					return late[0]
				}
				if time.Now().After(deadline) {
					t.Fatalf("late subjects %v, %v; want late-sub past version %d", late, err, after)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		reserve()
		first := waitLate(0)
		if subs, err := st.HourSubjects(ctx, old); err != nil || !slices.Equal(subs, []string{"late-sub"}) {
			t.Fatalf("hour index of %s: %v, %v", old, subs, err)
		}
		reserve() // a late call after the reporter read first
		second := waitLate(first.Version)
		if err := st.DoneLate(ctx, []store.LateSubject{first}); err != nil {
			t.Fatal(err)
		}
		if late, err := st.LateSubjects(ctx); err != nil || len(late) != 1 || late[0] != second {
			t.Fatalf("after DoneLate of an older version: %v, %v; want %v kept", late, err, second)
		}
		if err := st.DoneLate(ctx, []store.LateSubject{second}); err != nil {
			t.Fatal(err)
		}
		if late, err := st.LateSubjects(ctx); err != nil || len(late) != 0 {
			t.Fatalf("after DoneLate: %v, %v", late, err)
		}
	}
	t.Run("redis", func(t *testing.T) { run(t, openStore(t, Options{KeyPrefix: newPrefix(t)})) })
	t.Run("cluster", func(t *testing.T) {
		run(t, openCluster(t, rediscluster.Start(t, 3, 0), clusterPrefix()))
	})
}

// notifierTickCommands stores idle customers, each with a key that
// expires in 30 days (outside every notice window), and two customers
// whose keys expire in 2 days, and counts the Redis commands of the
// notifier's first tick (a full key scan) and of its second (through the
// key expiry index). Each expiring key is announced once, to a webhook.
func notifierTickCommands(t *testing.T, st *Store, addrs []string, idle int) (full, next int64) {
	t.Helper()
	ctx := context.Background()
	var mu sync.Mutex
	got := map[string]int{}
	rcv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got[r.Header.Get("webhook-id")]++
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(rcv.Close)
	put := func(customer string, expires time.Time) {
		t.Helper()
		if err := st.CreateCustomer(ctx, store.Customer{ID: customer, Tier: "pro", CreatedAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
		hash := fmt.Sprintf("%x", sha256.Sum256([]byte(customer)))
		if _, err := st.PutKey(ctx, store.Key{ID: "k" + hash[:16], Hash: hash, CustomerID: customer, Prefix: "am_", ExpiresAt: expires.Truncate(time.Second)}); err != nil {
			t.Fatal(err)
		}
	}
	for i := range idle {
		put(fmt.Sprintf("idle-%04d", i), time.Now().Add(30*24*time.Hour))
	}
	put("soon-a", time.Now().Add(48*time.Hour))
	put("soon-b", time.Now().Add(50*time.Hour))
	ch := notifier.WebhookChannel(rcv.URL)
	n := &notifier.Notifier{
		Holder: "h", LeaseTTL: time.Hour,
		Webhooks: map[string]notify.Webhook{ch: {URL: rcv.URL, Key: []byte("0123456789abcdef0123456789abcdef")}}, Channels: []string{ch},
		Payload:        func(store.Customer, store.ThresholdEvent) []byte { return []byte(`{}`) },
		Retry:          notify.Retry{Base: time.Millisecond, Max: time.Millisecond, GiveUp: time.Hour},
		AttemptTimeout: 5 * time.Second, StopGrace: time.Second,
	}
	tick := func() int64 {
		before := serverCommands(t, addrs)
		n.Tick(ctx, st)
		return serverCommands(t, addrs) - before
	}
	full = tick()
	next = tick()
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 {
		t.Fatalf("webhook got %v; want the two expiring keys announced", got)
	}
	for id, c := range got {
		if c != 1 {
			t.Fatalf("webhook got %s %d times", id, c)
		}
	}
	return full, next
}

// TestNotifierTickCommandsIndependentOfIdleCustomers: once the notifier
// made its first full key scan, a tick's Redis commands (threshold
// outboxes, expiring keys, deliveries) do not grow with customers that
// have no events and no key about to expire.
func TestNotifierTickCommandsIndependentOfIdleCustomers(t *testing.T) {
	run := func(t *testing.T, open func(t *testing.T) *Store, addrs []string) {
		full20, next20 := notifierTickCommands(t, open(t), addrs, 20)
		full2k, next2k := notifierTickCommands(t, open(t), addrs, 2000)
		t.Logf("Redis commands per notifier tick: full key scan %d (20 idle) and %d (2,000 idle); next tick %d (20 idle) and %d (2,000 idle)", full20, full2k, next20, next2k)
		if full2k < full20+2000 {
			t.Fatalf("the full scan ran %d commands with 2,000 idle customers and %d with 20: it should read every customer", full2k, full20)
		}
		if next2k > next20+5 {
			t.Fatalf("a tick ran %d commands with 2,000 idle customers and %d with 20: it grows with idle customers", next2k, next20)
		}
	}
	t.Run("redis", func(t *testing.T) {
		// A private server: INFO commandstats counts every client's
		// commands, and other packages' tests use the shared Redis.
		srv := rediscluster.StartServer(t)
		run(t, func(t *testing.T) *Store {
			return openStore(t, Options{URL: "redis://" + srv.Addr(), KeyPrefix: newPrefix(t)})
		}, []string{srv.Addr()})
	})
	t.Run("cluster", func(t *testing.T) {
		c := rediscluster.Start(t, 3, 0)
		var addrs []string
		for _, m := range c.Masters(context.Background()) {
			addrs = append(addrs, m.Addr())
		}
		run(t, func(t *testing.T) *Store { return openCluster(t, c, clusterPrefix()) }, addrs)
	})
}

// TestKeyExpiryIndex: the key expiry index follows every write of a key
// (stored, expiry changed, revoked), and keys stored before the index
// existed are indexed by its first use.
func TestKeyExpiryIndex(t *testing.T) {
	run := func(t *testing.T, st *Store, raw func() redis.Cmdable) {
		ctx := context.Background()
		now := time.Now()
		expiring := func() []string {
			t.Helper()
			hs, err := st.KeysExpiring(ctx, now, now.Add(7*24*time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			slices.Sort(hs)
			return hs
		}
		key := func(customer string, expires time.Time) store.Key {
			t.Helper()
			if err := st.CreateCustomer(ctx, store.Customer{ID: customer, Tier: "pro", CreatedAt: now}); err != nil {
				t.Fatal(err)
			}
			hash := fmt.Sprintf("%x", sha256.Sum256([]byte(customer)))
			k, err := st.PutKey(ctx, store.Key{ID: "k" + hash[:16], Hash: hash, CustomerID: customer, Prefix: "am_", ExpiresAt: expires.Truncate(time.Second)})
			if err != nil {
				t.Fatal(err)
			}
			return k
		}
		// A key stored by a version without the index.
		old := key("old", now.Add(3*24*time.Hour))
		for _, b := range st.bucketList() {
			if err := raw().Del(ctx, st.keyExpKey(b)).Err(); err != nil {
				t.Fatal(err)
			}
		}
		a := key("a", now.Add(2*24*time.Hour))
		b := key("b", now.Add(30*24*time.Hour))
		want := []string{a.Hash, old.Hash}
		slices.Sort(want)
		if got := expiring(); !slices.Equal(got, want) {
			t.Fatalf("expiring %v, want %v (a, and the old key indexed at first use)", got, want)
		}
		soon := now.Add(24 * time.Hour).Truncate(time.Second)
		if _, err := st.UpdateKey(ctx, b.ID, store.KeyChange{ExpiresAt: &soon}); err != nil {
			t.Fatal(err)
		}
		if _, err := st.RevokeKey(ctx, a.ID); err != nil {
			t.Fatal(err)
		}
		want = []string{b.Hash, old.Hash}
		slices.Sort(want)
		if got := expiring(); !slices.Equal(got, want) {
			t.Fatalf("expiring %v, want %v (b shortened, a revoked)", got, want)
		}
	}
	t.Run("redis", func(t *testing.T) {
		raw := rawClient(t)
		run(t, openStore(t, Options{KeyPrefix: newPrefix(t)}), func() redis.Cmdable { return raw })
	})
	t.Run("cluster", func(t *testing.T) {
		c := rediscluster.Start(t, 3, 0)
		run(t, openCluster(t, c, clusterPrefix()), func() redis.Cmdable { return c.Client() })
	})
}
