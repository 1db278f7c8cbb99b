package module

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
)

// TestMigrateStoreCommand runs `caddy api-monetize migrate-store` through
// the registered command from the test Redis into the test cluster: the
// customer and its usage are in the cluster, and a second run is up to
// date. Missing flags are refused.
func TestMigrateStoreCommand(t *testing.T) {
	c := sharedCluster(t)
	prefix := redisTestPrefix(t)
	toPrefix := "mig" + prefix
	ctx := context.Background()
	from, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer from.Close()
	seedCustomer := store.Customer{ID: "acme", Tier: "pro", CreatedAt: time.Now().UTC().Truncate(time.Second)}
	if err := from.CreateCustomer(ctx, seedCustomer); err != nil {
		t.Fatal(err)
	}
	seedHour(t, from, "acme", 0, 42)

	args := []string{"migrate-store", "--from", testRedisURL, "--to", c.URL(), "--prefix", prefix, "--to-prefix", toPrefix}
	out, err := stripeSync(t, args...)
	if err != nil || !strings.Contains(out, "copied 1 customers") {
		t.Fatalf("migrate-store: %v\n%s", err, out)
	}
	to, err := redisstore.New(redisstore.Options{URL: c.URL(), Cluster: true, KeyPrefix: toPrefix})
	if err != nil {
		t.Fatal(err)
	}
	defer to.Close()
	if got, err := to.GetCustomer(ctx, "acme"); err != nil || got.Tier != "pro" {
		t.Fatalf("customer in the cluster: %+v, %v", got, err)
	}
	p := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	if u, err := to.Usage(ctx, "acme", p.ID()); err != nil || u.Billed != 42 {
		t.Fatalf("usage in the cluster: %+v, %v; want 42 billed units", u, err)
	}
	if out, err := stripeSync(t, args...); err != nil || !strings.Contains(out, "up to date") {
		t.Fatalf("second run: %v\n%s", err, out)
	}
	if _, err := stripeSync(t, "migrate-store", "--from", testRedisURL); err == nil || !strings.Contains(err.Error(), "--to") {
		t.Fatalf("without --to: %v", err)
	}
}
