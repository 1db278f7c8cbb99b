package stripereport

import (
	"context"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// meterSums returns the recorded event values per (event name, Stripe
// customer, hour), checking each identifier appears once.
func (f *fixture) meterSums() map[string]int64 {
	f.t.Helper()
	out := map[string]int64{}
	seen := map[string]bool{}
	for _, e := range f.double.Events() {
		if seen[e.Identifier] {
			f.t.Fatalf("identifier %s recorded twice", e.Identifier)
		}
		seen[e.Identifier] = true
		out[e.EventName+"|"+e.Customer+"|"+metering.TimeID(time.Unix(e.Timestamp, 0).UTC().Truncate(time.Hour))] += e.Value
	}
	return out
}

// TestReportsEveryMeterOnce checks that each meter's closed hours are
// reported once under the meter's own event name, with sums equal to the
// ledger, under lost answers, and that reconciliation has one row per
// (customer, meter, hour).
func TestReportsEveryMeterOnce(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 10)
	f.st.addMeterUsage("acme", period, "tokens", f.hour(2), 5000)
	f.st.addMeterUsage("acme", period, "tokens", f.hour(3), 700)
	f.st.addMeterUsage("beta", period, "upload", f.hour(2), 1)
	f.st.addMeterUsage("beta", period, "gone", f.hour(2), 9)   // a meter no longer configured: not reported
	f.st.addMeterUsage("acme", period, "tokens", f.hour(0), 3) // the open hour
	r := f.reporter("a")
	r.Meters = []MeterEvent{{Meter: "tokens", Event: "ai_tokens"}, {Meter: "upload", Event: "upload_bytes"}}
	// The first tokens event is accepted but its answer is lost: the retry
	// is deduplicated by its identifier.
	f.double.Fail(stripedouble.None, stripedouble.AcceptThenHang)

	res := tick(t, r)
	if res.Sent != 4 || res.Failed != 0 || res.Unreported != 0 {
		t.Fatalf("tick: %+v", res)
	}
	want := map[string]int64{
		"api_calls|cus_ACME|" + f.hour(2):    10,
		"ai_tokens|cus_ACME|" + f.hour(2):    5000,
		"ai_tokens|cus_ACME|" + f.hour(3):    700,
		"upload_bytes|cus_BETA|" + f.hour(2): 1,
	}
	got := f.meterSums()
	if len(got) != len(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("events %v, want %v", got, want)
		}
	}
	// Marks: the default meter's as before, the others' with the meter.
	for _, id := range []string{"acme|" + f.hour(2), "acme|tokens|" + f.hour(2), "acme|tokens|" + f.hour(3), "beta|upload|" + f.hour(2)} {
		if _, err := f.st.GetRecord(context.Background(), KindSent, id); err != nil {
			t.Errorf("mark %s: %v", id, err)
		}
	}
	if res := tick(t, r); res.Sent != 0 {
		t.Fatalf("second tick sent %d", res.Sent)
	}

	// Late tokens after the hour was sent are unreported, for that meter
	// only; reconciliation lists each meter's hours apart.
	f.st.addMeterUsage("acme", period, "tokens", f.hour(3), 5)
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{{Customer: store.Customer{ID: "acme", StripeCustomerID: "cus_ACME"}, PeriodID: period}})
	if err != nil {
		t.Fatal(err)
	}
	ledger, reported, unreported := map[string]int64{}, map[string]int64{}, map[string]int64{}
	for _, row := range rows {
		ledger[row.Meter] += row.LedgerUnits
		reported[row.Meter] += row.ReportedUnits
		unreported[row.Meter] += row.UnreportedUnits()
	}
	if ledger[""] != 10 || reported[""] != 10 || ledger["tokens"] != 5708 || reported["tokens"] != 5700 || unreported["tokens"] != 5 || unreported[""] != 0 {
		t.Errorf("reconciliation per meter: ledger %v reported %v unreported %v (rows %+v)", ledger, reported, unreported, rows)
	}
	if len(rows) != 4 { // default h2, tokens h3, h2, h0 (pending)
		t.Errorf("%d rows, want 4: %+v", len(rows), rows)
	}
	// The tick's unreported units, per meter as in total.
	f.st.addUsage("acme", period, f.hour(3), 2)
	f.double.Fail(stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError)
	if res := tick(t, r); res.Unreported != 7 || len(res.UnreportedByMeter) != 2 || res.UnreportedByMeter["tokens"] != 5 || res.UnreportedByMeter[""] != 2 {
		t.Errorf("tick after late tokens and a failed default hour: unreported %d by meter %v; want 7: tokens 5, default 2", res.Unreported, res.UnreportedByMeter)
	}
}

// metersCatalog is testCatalog with two more meters: pro bills tokens
// beyond 2 000 000, payg bills upload bytes per unit.
func metersCatalog() Catalog {
	cat := testCatalog()
	cat.Meters = []CatalogMeter{{Name: "tokens", Event: "ai_tokens"}, {Name: "upload", Event: "upload"}}
	cat.Tiers[1].Meters = []CatalogTierMeter{{Meter: "tokens", IncludedUnits: 2_000_000, OverageMicros: 10}}
	cat.Tiers[4].Meters = []CatalogTierMeter{{Meter: "upload", OverageMicros: 1}}
	return cat
}

// TestCatalogSyncCreatesOneMeterAndPricePerMeter checks stripe-sync with
// several meters: one Billing Meter per event name and, per tier billing a
// meter, a metered price am_<tier>_<meter>_usage on that meter; a second
// run creates nothing; every request passes stripe-mock's validation.
func TestCatalogSyncCreatesOneMeterAndPricePerMeter(t *testing.T) {
	mock := stripedouble.StripeMock(t)
	d := stripedouble.New()
	defer d.Close()
	v := &validator{mock: mock, double: d.URL}
	srv := httptest.NewServer(v)
	defer srv.Close()
	sc := NewClient("sk_test_123", srv.URL, 10*time.Second)
	cat := metersCatalog()

	_, out := runSync(t, sc, cat, false)
	if got := creates(d); got != [3]int{3, 5, 7} {
		t.Fatalf("created (meters, products, prices) = %v, want [3 5 7]\n%s", got, out)
	}
	got, err := pricesByLookupKey(context.Background(), sc, []string{"am_pro_usage", "am_pro_tokens_usage", "am_payg_upload_usage"})
	if err != nil {
		t.Fatal(err)
	}
	calls, tok, up := got["am_pro_usage"], got["am_pro_tokens_usage"], got["am_payg_upload_usage"]
	if tok.Recurring == nil || tok.Recurring.Meter == "" || tok.Recurring.Meter == calls.Recurring.Meter || tok.BillingScheme != "tiered" ||
		len(tok.Tiers) != 2 || *tok.Tiers[0].UpTo != 2_000_000 || amountOf(nil, tok.Tiers[1].UnitAmountDecimal) != "0.001" || tok.Product != calls.Product {
		t.Fatalf("pro tokens price %+v (calls price on meter %s)", tok, calls.Recurring.Meter)
	}
	if up.Recurring == nil || up.Recurring.Meter == "" || up.Recurring.Meter == tok.Recurring.Meter || up.BillingScheme != "per_unit" ||
		amountOf(nil, up.UnitAmountDecimal) != "0.0001" {
		t.Fatalf("payg upload price %+v", up)
	}
	if p, out := runSync(t, sc, cat, false); !p.UpToDate() {
		t.Fatalf("second run planned %d steps:\n%s", len(p.Actions), out)
	}
	if len(v.refused) > 0 {
		t.Fatalf("stripe-mock refused %d requests:\n%s", len(v.refused), strings.Join(v.refused, "\n"))
	}
}

// TestCatalogRefusesCollidingLookupKeys: tier "pro_tokens" and tier "pro"
// billing meter "tokens" would share am_pro_tokens_usage.
func TestCatalogRefusesCollidingLookupKeys(t *testing.T) {
	cat := metersCatalog()
	cat.Tiers = append(cat.Tiers, CatalogTier{Name: "pro_tokens", OverageMicros: 1})
	if err := cat.validate(); err == nil || !strings.Contains(err.Error(), "am_pro_tokens_usage") {
		t.Fatalf("validate: %v", err)
	}
}
