package module

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// reportCaddyfile is stripeCaddyfile with the given report_every and
// admin_api.
func reportCaddyfile(t *testing.T, prefix, apiBase, reportEvery, adminAPI string) string {
	t.Helper()
	cf := stripeCaddyfile(prefix, apiBase, 0)
	for old, repl := range map[string]string{
		"report_every 50ms":                   "report_every " + reportEvery,
		"key_secret test-secret-0123456789\n": "key_secret test-secret-0123456789\n\t\tadmin_api " + adminAPI + "\n",
	} {
		if !strings.Contains(cf, old) {
			t.Fatalf("stripeCaddyfile has no %q", old)
		}
		cf = strings.Replace(cf, old, repl, 1)
	}
	return cf
}

// startReporting gives a fresh Redis prefix to before (to seed the store)
// and starts Caddy on it, reporting to apiBase.
func startReporting(t *testing.T, apiBase, reportEvery, adminAPI string, before func(st store.Store)) (store.Store, *caddytest.Tester, string) {
	t.Helper()
	prefix := redisTestPrefix(t)
	st, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	before(st)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(reportCaddyfile(t, prefix, apiBase, reportEvery, adminAPI), "caddyfile")
	return st, tester, prefix
}

// TestSettleGraceZeroMeansZero: `settle_grace 0` in a Caddyfile and
// "settle_grace": 0 in JSON report an hour as soon as it ends; they used to
// become the 2-minute default silently. Leaving it out keeps the default.
func TestSettleGraceZeroMeansZero(t *testing.T) {
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte("{\n\tapi_monetize {\n\t\tstripe {\n\t\t\tsecret_key sk_test_123\n\t\t\tsettle_grace 0\n\t\t}\n\t\ttier free {\n\t\t\trate 10/min\n\t\t}\n\t}\n}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			APIMonetize json.RawMessage `json:"api_monetize"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	for name, tc := range map[string]struct {
		config string
		want   time.Duration
	}{
		"caddyfile":    {string(cfg.Apps.APIMonetize), 0},
		"json zero":    {`{"stripe":{"secret_key":"sk_test_123","settle_grace":0}}`, 0},
		"json 30s":     {`{"stripe":{"secret_key":"sk_test_123","settle_grace":30000000000}}`, 30 * time.Second},
		"json omitted": {`{"stripe":{"secret_key":"sk_test_123"}}`, defaultSettleGrace},
	} {
		t.Run(name, func(t *testing.T) {
			var app App
			if err := json.Unmarshal([]byte(tc.config), &app); err != nil {
				t.Fatal(err)
			}
			s, err := app.stripeSettings()
			if err != nil {
				t.Fatal(err)
			}
			if s.settleGrace != tc.want {
				t.Fatalf("settle_grace from %s is %v, want %v", tc.config, s.settleGrace, tc.want)
			}
		})
	}
}

// TestStripeReportNowAndPendingUnits runs a reporter pass through
// POST /api_monetize/stripe/report while the reporter's own schedule
// (report_every 1h) would wait, and checks the reconciliation counts the
// hour in progress as pending, not unreported.
func TestStripeReportNowAndPendingUnits(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	st, _, _ := startReporting(t, double.URL, "1h", "read_write", func(st store.Store) { seedHour(t, st, "acme", 2, 40) })
	waitUntil(t, 20*time.Second, "the first pass at start", func() bool { return len(double.Events()) == 1 })
	// The reporter's loop runs one pass at a time: once this one is
	// answered, the pass at start is over too, and the next is 1h away.
	if r := admin(t, http.MethodPost, "/api_monetize/stripe/report", ""); r.status != http.StatusOK {
		t.Fatalf("report: %d %s", r.status, r.body)
	}

	seedHour(t, st, "beta", 3, 7)
	seedHour(t, st, "acme", 0, 5) // the hour in progress
	r := admin(t, http.MethodPost, "/api_monetize/stripe/report", "")
	if r.status != http.StatusOK {
		t.Fatalf("report: %d %s", r.status, r.body)
	}
	var v reportView
	if err := json.Unmarshal([]byte(r.body), &v); err != nil {
		t.Fatal(err)
	}
	if v.Sent != 1 || v.Failed != 0 || len(v.Hours) != 1 || v.Hours[0].Customer != "beta" || v.Hours[0].Units != 7 ||
		v.Hours[0].Outcome != stripereport.StateSent || v.UnreportedUnits != 0 {
		t.Fatalf("report answered %s; want beta's hour of 7 units sent", r.body)
	}
	events := double.Events()
	if len(events) != 2 || events[1].Customer != "cus_BETA" || events[1].Value != 7 || events[1].Identifier != v.Hours[0].Identifier {
		t.Fatalf("Stripe has %v", events)
	}
	// Nothing left: a second pass sends nothing.
	if r := admin(t, http.MethodPost, "/api_monetize/stripe/report", ""); r.status != http.StatusOK || !strings.Contains(r.body, `"sent":0`) {
		t.Fatalf("second report: %d %s", r.status, r.body)
	}

	r = admin(t, http.MethodGet, "/api_monetize/stripe/reconciliation", "")
	var recon reconciliationView
	if err := json.Unmarshal([]byte(r.body), &recon); err != nil || r.status != http.StatusOK {
		t.Fatalf("reconciliation: %d %s", r.status, r.body)
	}
	if recon.PendingUnits != 5 || recon.UnreportedUnits != 0 || recon.LedgerUnits != 52 || recon.ReportedUnits != 47 || recon.Namespace == "" {
		t.Fatalf("reconciliation %s; want the open hour's 5 units pending and none unreported", r.body)
	}
}

// TestStripeReportNeedsReadWriteAndTheLease: the pass is a change (403
// with admin_api read_only, 405 for GET), and an instance that does not
// hold the reporter lease answers 409 and sends nothing.
func TestStripeReportNeedsReadWriteAndTheLease(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	_, tester, prefix := startReporting(t, double.URL, "1h", "read_only", func(st store.Store) {
		seedHour(t, st, "acme", 2, 40)
		// Another instance reports for this store.
		if ok, err := st.TryLease(context.Background(), stripereport.LeaseName, "another-instance", time.Minute); !ok || err != nil {
			t.Fatalf("lease: %v %v", ok, err)
		}
	})
	if r := admin(t, http.MethodPost, "/api_monetize/stripe/report", ""); r.status != http.StatusForbidden {
		t.Fatalf("report with admin_api read_only: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodGet, "/api_monetize/stripe/report", ""); r.status != http.StatusMethodNotAllowed {
		t.Fatalf("GET report: %d %s", r.status, r.body)
	}
	tester.InitServer(reportCaddyfile(t, prefix, double.URL, "1h", "read_write"), "caddyfile")
	if r := admin(t, http.MethodPost, "/api_monetize/stripe/report", ""); r.status != http.StatusConflict || !strings.Contains(r.body, "lease") {
		t.Fatalf("report without the lease: %d %s", r.status, r.body)
	}
	if n := double.Requests("POST /v1/billing/meter_events"); n != 0 {
		t.Fatalf("%d meter events sent by an instance without the lease", n)
	}
}

// TestReportEveryBelowTheLeaseInterval: report_every shorter than the
// 30-second lease renewal is honoured; it used to be rounded up to 30s
// silently. (The lease timings are left at their defaults here.)
func TestReportEveryBelowTheLeaseInterval(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	st, _, _ := startReporting(t, double.URL, "200ms", "read_only", func(st store.Store) { seedHour(t, st, "acme", 2, 40) })
	waitUntil(t, 20*time.Second, "the first pass at start", func() bool { return len(double.Events()) == 1 })
	seedHour(t, st, "beta", 2, 7)
	// A pass every 200ms sends it well within 10s; one every 30s would not.
	waitUntil(t, 10*time.Second, "the next pass", func() bool { return len(double.Events()) == 2 })
}

// TestStripeReportAgainstStripeMock is the README's testing setup:
// api_base pointing at stripe-mock, which checks every request against
// Stripe's API spec, and passes run through the admin API.
func TestStripeReportAgainstStripeMock(t *testing.T) {
	base := stripedouble.StripeMock(t)
	startReporting(t, base, "1h", "read_write", func(st store.Store) {
		seedHour(t, st, "acme", 2, 40)
		seedHour(t, st, "beta", 3, 7)
	})
	// The pass at start and the ones asked for share the work; stripe-mock
	// must accept every event, and the reconciliation show both hours sent.
	var recon reconciliationView
	waitUntil(t, 20*time.Second, "both hours sent", func() bool {
		r := admin(t, http.MethodPost, "/api_monetize/stripe/report", "")
		var pass reportView
		if err := json.Unmarshal([]byte(r.body), &pass); err != nil || r.status != http.StatusOK || pass.Failed != 0 {
			t.Fatalf("report: %d %s", r.status, r.body)
		}
		r = admin(t, http.MethodGet, "/api_monetize/stripe/reconciliation", "")
		recon = reconciliationView{}
		if err := json.Unmarshal([]byte(r.body), &recon); err != nil {
			t.Fatal(err)
		}
		return len(recon.Hours) == 2 && recon.ReportedUnits == 47
	})
	for _, h := range recon.Hours {
		if h.State != stripereport.StateSent || !strings.HasPrefix(h.Identifier, "am2_") {
			t.Fatalf("hour %+v", h)
		}
	}
}
