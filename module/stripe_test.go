package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// stripeCaddyfile is a deployment reporting to the Stripe double; variant
// changes report_every so that loading it again is a real reload.
func stripeCaddyfile(prefix, apiBase string, variant int) string {
	return stripeCaddyfileOn("redis "+testRedisURL, prefix, apiBase, variant)
}

// stripeCaddyfileOn is stripeCaddyfile on the Redis store of storeLine
// (a redis or redis_cluster option).
func stripeCaddyfileOn(storeLine, prefix, apiBase string, variant int) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9382
	grace_period 1ns
	api_monetize {
		%s
		redis_prefix %s
		key_secret test-secret-0123456789
		stripe {
			secret_key sk_test_123
			meter api_calls
			report_every %dms
			settle_grace 1m
			webhook_secret whsec_test_secret
			past_due_grace 1h
			downgrade_to free
			api_base %s
		}
		tier free {
			rate 10/min
		}
		tier pro {
			price 49.00/month
			included 1000/month
			over_quota bill 0.002
			rate 100/min
		}
		customer acme tier pro stripe cus_ACME
		customer beta tier pro stripe cus_BETA
		customer nostripe tier pro
		key %s acme
	}
}

:%d {
	handle /stripe/webhook {
		api_monetize_stripe_webhook
	}
	handle {
		api_monetize
		respond "ok customer={http.api_monetize.customer} tier={http.api_monetize.tier}"
	}
}
`, testAdminPort, testHTTPPort, storeLine, prefix, 50+variant, apiBase, proKey, testHTTPPort)
}

// seedHour bills units in a past hour of the customer's current period,
// through the store as the handler would have.
func seedHour(t *testing.T, st store.Store, customer string, hoursAgo int, units int64) {
	t.Helper()
	now := time.Now()
	p := metering.PeriodRule{}.Period(now, time.Time{})
	hour := metering.HourStart(now).Add(-time.Duration(hoursAgo) * time.Hour)
	if hour.Before(p.Start) {
		p = metering.PeriodRule{}.Period(hour, time.Time{})
	}
	_, err := st.Reserve(context.Background(), store.Reservation{
		Subject: customer, Cost: units,
		Quota: store.Quota{PeriodID: p.ID(), PeriodEnd: p.End, HourID: metering.TimeID(hour)},
	})
	if err != nil {
		t.Fatal(err)
	}
}

func shortenStripeTimings(t *testing.T) {
	leaseEvery := stripeLeaseEvery.Swap(int64(20 * time.Millisecond))
	leaseTTL := stripeLeaseTTL.Swap(int64(time.Minute))
	t.Cleanup(func() {
		stripeLeaseEvery.Store(leaseEvery)
		stripeLeaseTTL.Store(leaseTTL)
	})
}

// TestStripeReportingAcrossReload reports past hours through a running
// Caddy, reloads it (the new app starts before the old one stops) with more
// hours to report and Stripe failing now and then, and checks that every
// hour reached Stripe exactly once with the ledger's exact units.
func TestStripeReportingAcrossReload(t *testing.T) {
	t.Run("redis", func(t *testing.T) {
		testStripeReportingAcrossReload(t, redisstore.Options{URL: testRedisURL}, "redis "+testRedisURL)
	})
	t.Run("redis cluster", func(t *testing.T) {
		c := sharedCluster(t)
		testStripeReportingAcrossReload(t, redisstore.Options{URL: c.URL(), Cluster: true}, "redis_cluster "+c.URL())
	})
}

// testStripeReportingAcrossReload is TestStripeReportingAcrossReload on
// the Redis store of o (the same as storeLine's).
func testStripeReportingAcrossReload(t *testing.T, o redisstore.Options, storeLine string) {
	shortenStripeTimings(t)
	double := stripedouble.New()
	defer double.Close()
	prefix := redisTestPrefix(t)
	o.KeyPrefix = prefix
	st, err := redisstore.New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	for h := 2; h <= 6; h++ {
		seedHour(t, st, "acme", h, int64(100*h+7))
		seedHour(t, st, "beta", h, int64(h))
		seedHour(t, st, "nostripe", h, 5)
	}
	double.Fail(stripedouble.RateLimit, stripedouble.ServerError)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(stripeCaddyfileOn(storeLine, prefix, double.URL, 0), "caddyfile")
	waitUntil(t, 20*time.Second, "10 hours reported", func() bool { return len(double.Events()) == 10 })

	// Reload while more hours wait and Stripe loses a response after
	// accepting the event.
	for h := 7; h <= 9; h++ {
		seedHour(t, st, "acme", h, int64(h))
	}
	double.Fail(stripedouble.AcceptThen500)
	tester.InitServer(stripeCaddyfileOn(storeLine, prefix, double.URL, 1), "caddyfile")
	waitUntil(t, 20*time.Second, "13 hours reported", func() bool { return len(double.Events()) == 13 })

	var recon reconciliationView
	waitUntil(t, 20*time.Second, "reconciliation shows every hour sent", func() bool {
		r := admin(t, http.MethodGet, "/api_monetize/stripe/reconciliation", "")
		if r.status != http.StatusOK {
			t.Fatalf("reconciliation: %d %s", r.status, r.body)
		}
		recon = reconciliationView{}
		if err := json.Unmarshal([]byte(r.body), &recon); err != nil {
			t.Fatal(err)
		}
		return recon.UnreportedUnits == 0 && len(recon.Hours) == 13
	})
	seen := map[string]bool{}
	var sum int64
	for _, e := range double.Events() {
		if seen[e.Identifier] {
			t.Fatalf("identifier %s sent twice", e.Identifier)
		}
		seen[e.Identifier] = true
		if e.Customer != "cus_ACME" && e.Customer != "cus_BETA" {
			t.Fatalf("event for %q", e.Customer)
		}
		sum += e.Value
	}
	var ledger int64
	for _, c := range []string{"acme", "beta"} {
		for _, row := range recon.Hours {
			if row.Customer == c {
				if row.State != stripereport.StateSent || row.ReportedUnits != row.LedgerUnits {
					t.Fatalf("row %+v", row)
				}
			}
		}
		u, err := st.Usage(context.Background(), c, metering.PeriodRule{}.Period(time.Now(), time.Time{}).ID())
		if err != nil {
			t.Fatal(err)
		}
		ledger += u.Billed
		prev := metering.PeriodRule{}.Period(time.Now(), time.Time{}).Start.Add(-time.Second)
		if u, err = st.Usage(context.Background(), c, metering.PeriodRule{}.Period(prev, time.Time{}).ID()); err == nil {
			ledger += u.Billed
		}
	}
	if sum != ledger || recon.LedgerUnits != ledger || recon.ReportedUnits != ledger {
		t.Fatalf("events sum to %d, the ledger to %d, the reconciliation to %d/%d", sum, ledger, recon.LedgerUnits, recon.ReportedUnits)
	}
}
