package redisstore

import (
	"context"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestMigrateToCluster fills a single Redis through the store (customers,
// keys revoked, expiring and used, records, usage with an idempotency key
// and threshold events, the key secret), migrates it into a cluster, and
// reads everything back there; a second run copies nothing, and a run
// after the cluster took traffic leaves that traffic's usage alone.
func TestMigrateToCluster(t *testing.T) {
	c := rediscluster.Start(t, 3, 0)
	ctx := context.Background()
	from := openStore(t, Options{KeyPrefix: newPrefix(t)})
	to := openCluster(t, c, clusterPrefix())

	secret, err := from.KeySecret(ctx, []byte("source-secret-0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Truncate(time.Second)
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	q := store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(metering.HourStart(time.Now())),
		Mode: store.QuotaBill, Included: 10, Thresholds: []int{50}}
	subjects := []string{"acme", "beta", "gamma"}
	for i, id := range subjects {
		if err := from.CreateCustomer(ctx, store.Customer{ID: id, Tier: "pro", ConfigTier: "pro", Email: id + "@example.com", CreatedAt: now}); err != nil {
			t.Fatal(err)
		}
		k, err := from.PutKey(ctx, store.Key{ID: "key-" + id, Hash: "hash-" + id, CustomerID: id, Prefix: "am_", CreatedAt: now, ExpiresAt: now.Add(72 * time.Hour)})
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 {
			if _, err := from.RevokeKey(ctx, k.ID); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := from.Reserve(ctx, store.Reservation{Subject: id, Cost: int64(6 + i), Quota: q, IdempotencyKey: "idem-1", IdempotencyFingerprint: "GET /x", IdempotencyRepeats: 1}); err != nil {
			t.Fatal(err)
		}
		if _, err := from.PutRecord(ctx, store.Record{Kind: "notification", ID: id + "|ev|email", Data: []byte(`{"n":1}`), Expires: now.Add(time.Hour)}, false); err != nil {
			t.Fatal(err)
		}
	}
	if err := from.TouchKeys(ctx, map[string]time.Time{"key-acme": now.Add(-time.Minute)}); err != nil {
		t.Fatal(err)
	}
	if _, err := from.PutRecord(ctx, store.Record{Kind: "stripe_cursor", ID: "hours", Data: []byte(`{}`)}, false); err != nil {
		t.Fatal(err)
	}

	m, err := Migrate(ctx, from, to, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	if m.Customers != 3 || m.Keys != 3 || m.Records != 3 || m.CustomerKeys < 6 || !m.SecretCopied {
		t.Fatalf("migrated %+v; want 3 customers, 3 keys, 3 records (no cursor), the usage and the secret", m)
	}
	if got, err := to.KeySecret(ctx, []byte("another")); err != nil || string(got) != string(secret) {
		t.Fatalf("cluster key secret %q, %v", got, err)
	}
	same := func(what string, a, b any) {
		t.Helper()
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		if !reflect.DeepEqual(ja, jb) {
			t.Fatalf("%s: source %s, cluster %s", what, ja, jb)
		}
	}
	fc, _ := from.ListCustomers(ctx)
	tc, err := to.ListCustomers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	same("customers", fc, tc)
	for _, id := range subjects {
		fk, _ := from.ListKeys(ctx, id)
		tk, err := to.ListKeys(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		same("keys of "+id, fk, tk)
		if fk[0].LastUsedAt != tk[0].LastUsedAt {
			t.Fatalf("last use of %s: %v, cluster %v", id, fk[0].LastUsedAt, tk[0].LastUsedAt)
		}
		fu, _ := from.Usage(ctx, id, p.ID())
		tu, err := to.Usage(ctx, id, p.ID())
		if err != nil {
			t.Fatal(err)
		}
		same("usage of "+id, fu, tu)
		fe, _ := from.ThresholdEvents(ctx, id)
		te, err := to.ThresholdEvents(ctx, id)
		if err != nil || len(te) != 1 {
			t.Fatalf("threshold events of %s on the cluster: %v, %v", id, te, err)
		}
		same("threshold events of "+id, fe, te)
	}
	if recs, err := to.ListRecords(ctx, "notification", ""); err != nil || len(recs) != 3 {
		t.Fatalf("notification records on the cluster: %v, %v", recs, err)
	}
	if _, err := to.GetRecord(ctx, "stripe_cursor", "hours"); err == nil {
		t.Fatal("the Stripe cursor was copied: the cluster has no hour index of the hours before")
	}
	// The idempotency key came along: a client retry is a duplicate.
	out, err := to.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 6, Quota: q, IdempotencyKey: "idem-1", IdempotencyFingerprint: "GET /x", IdempotencyRepeats: 1})
	if err != nil || !out.Duplicate {
		t.Fatalf("retry on the cluster: %+v, %v; want a duplicate", out, err)
	}

	// Traffic on the cluster, then a second run: nothing copied, nothing
	// overwritten.
	if _, err := to.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 5, Quota: q}); err != nil {
		t.Fatal(err)
	}
	before, _ := to.Usage(ctx, "acme", p.ID())
	m, err = Migrate(ctx, from, to, t.Logf)
	if err != nil || m != (Migrated{SecretCopied: true}) {
		t.Fatalf("second run: %+v, %v; want nothing copied", m, err)
	}
	if after, _ := to.Usage(ctx, "acme", p.ID()); !reflect.DeepEqual(after, before) {
		t.Fatalf("the second run changed the cluster's usage: %+v, was %+v", after, before)
	}

	// A cluster with another key secret is refused.
	other := openCluster(t, c, clusterPrefix())
	if _, err := other.KeySecret(ctx, []byte("other-secret")); err != nil {
		t.Fatal(err)
	}
	if _, err := Migrate(ctx, from, other, nil); err == nil {
		t.Fatal("migrated into a cluster with another key secret")
	}
}
