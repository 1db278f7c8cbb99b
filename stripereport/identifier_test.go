package stripereport

import (
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestDeploymentsSharingAStripeAccountAreBothBilled runs two deployments
// (two stores: production and staging, say) against one Stripe account,
// each with a customer "acme" using the same hour. Stripe dedupes
// identifiers account-wide: with identifiers of (customer, meter, hour)
// only, the second deployment's event was refused as "already exists",
// counted as sent, and its usage never billed.
func TestDeploymentsSharingAStripeAccountAreBothBilled(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 40)
	other := newMemStore(f.clock)
	other.customers = []store.Customer{{ID: "acme", Tier: "pro", StripeCustomerID: "cus_ACME_STAGING"}}
	other.addUsage("acme", period, f.hour(2), 60)

	prod := f.reporter("prod")
	staging := f.reporter("staging")
	staging.Store = other
	if res := tick(t, prod); res.Sent != 1 {
		t.Fatalf("production tick: %+v", res)
	}
	if res := tick(t, staging); res.Sent != 1 {
		t.Fatalf("staging tick: %+v", res)
	}
	got := f.sums() // also fails if an identifier was recorded twice
	if len(f.double.Events()) != 2 || got["cus_ACME|"+f.hour(2)] != 40 || got["cus_ACME_STAGING|"+f.hour(2)] != 60 {
		t.Fatalf("Stripe recorded %v; want both deployments' hours (40 and 60)", f.double.Events())
	}
}

// TestIdentifierSeparatesNamespacesAndStripeCustomers checks the
// identifier is deterministic and differs when the namespace, the customer,
// the Stripe customer, the meter or the hour differs.
func TestIdentifierSeparatesNamespacesAndStripeCustomers(t *testing.T) {
	base := Identifier("prod", "acme", "cus_A", "api_calls", "20261110T100000Z")
	if again := Identifier("prod", "acme", "cus_A", "api_calls", "20261110T100000Z"); again != base {
		t.Fatalf("identifier not deterministic: %s vs %s", base, again)
	}
	if !strings.HasPrefix(base, "am2_") || len(base) > 100 {
		t.Fatalf("identifier %q", base)
	}
	for _, other := range []string{
		Identifier("staging", "acme", "cus_A", "api_calls", "20261110T100000Z"),
		Identifier("prod", "acme2", "cus_A", "api_calls", "20261110T100000Z"),
		Identifier("prod", "acme", "cus_B", "api_calls", "20261110T100000Z"),
		Identifier("prod", "acme", "cus_A", "other", "20261110T100000Z"),
		Identifier("prod", "acme", "cus_A", "api_calls", "20261110T110000Z"),
		// The separators keep shifted fields apart.
		Identifier("pro", "dacme", "cus_A", "api_calls", "20261110T100000Z"),
		LegacyIdentifier("acme", "api_calls", "20261110T100000Z"),
	} {
		if other == base {
			t.Fatalf("identifier %s shared by different hours", base)
		}
	}
}

// TestStoredNamespaceIsSharedByTheStoreAndDiffersBetweenStores: the
// generated namespace is the same for every reporter of one store (a
// cluster, a reload), also when they generate it at once, and differs for
// another store.
func TestStoredNamespaceIsSharedByTheStoreAndDiffersBetweenStores(t *testing.T) {
	f := newFixture(t)
	var wg sync.WaitGroup
	got := make([]string, 8)
	for i := range got {
		wg.Go(func() {
			ns, err := StoredNamespace(context.Background(), f.st)
			if err != nil {
				t.Errorf("namespace: %v", err)
			}
			got[i] = ns
		})
	}
	wg.Wait()
	for _, ns := range got {
		if ns == "" || ns != got[0] {
			t.Fatalf("instances of one store disagree on the namespace: %q", got)
		}
	}
	other, err := StoredNamespace(context.Background(), newMemStore(f.clock))
	if err != nil || other == got[0] {
		t.Fatalf("another store's namespace %q (%v), the first's %q", other, err, got[0])
	}
}

// TestIdentifierIsPinnedBeforeTheFirstTry: an hour Stripe accepted but
// whose answer was lost is retried under the identifier of its first try
// even after the namespace changed, so Stripe dedupes it and bills it once.
func TestIdentifierIsPinnedBeforeTheFirstTry(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 40)
	r := f.reporter("a")
	r.Namespace = "before"
	f.double.Fail(stripedouble.AcceptThen500, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError)
	if res := tick(t, r); res.Sent != 0 || res.Failed != 1 {
		t.Fatalf("tick while Stripe loses the answer: %+v", res)
	}
	first := f.double.Events()[0].Identifier
	if first != Identifier("before", "acme", "cus_ACME", "api_calls", f.hour(2)) {
		t.Fatalf("first try sent %s", first)
	}
	r.Namespace = "after" // the operator sets a namespace before the retry
	res := tick(t, r)
	if res.Sent != 1 || len(res.Hours) != 1 || res.Hours[0].Identifier != first {
		t.Fatalf("retry: %+v; want the hour sent under %s", res, first)
	}
	if len(f.double.Events()) != 1 || f.double.Requests("POST /v1/billing/meter_events") != 6 {
		t.Fatalf("%d requests, events %v: the hour was billed twice", f.double.Requests("POST /v1/billing/meter_events"), f.double.Events())
	}
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if err != nil || len(rows) != 1 || rows[0].State != StateSent || rows[0].Identifier != first {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
	// The pin is gone once the mark holds the identifier.
	if recs, _ := f.st.ListRecords(context.Background(), KindTry, ""); len(recs) != 0 {
		t.Fatalf("pins left after acceptance: %v", recs)
	}
}

// TestUpgradeFromLegacyIdentifiers: after an upgrade from a version whose
// identifiers were (customer, meter, hour) only, an hour that version sent
// is not sent again (its mark is keyed by customer and hour, whatever the
// identifier), an hour it tried and did not see accepted is retried under
// its legacy identifier (so a lost acceptance is deduped), and an untried
// hour gets a new identifier.
func TestUpgradeFromLegacyIdentifiers(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	sentHour, triedHour, newHour := f.hour(4), f.hour(3), f.hour(2)
	f.st.addUsage("acme", period, sentHour, 10)
	f.st.addUsage("acme", period, triedHour, 20)
	f.st.addUsage("acme", period, newHour, 30)
	legacySent, legacyTried := LegacyIdentifier("acme", "api_calls", sentHour), LegacyIdentifier("acme", "api_calls", triedHour)
	// What the old version left: Stripe has both hours (the second one's
	// answer was lost), the store a mark for the first and a failure for
	// the second, in the old formats.
	client := NewClient("sk_test_123", f.double.URL, time.Second)
	lastSecond := func(hour string) time.Time {
		start, err := metering.ParseTimeID(hour)
		if err != nil {
			t.Fatal(err)
		}
		return start.Add(time.Hour - time.Second)
	}
	for _, ev := range []Event{
		{Meter: "api_calls", StripeCustomerID: "cus_ACME", Value: 10, Timestamp: lastSecond(sentHour), Identifier: legacySent},
		{Meter: "api_calls", StripeCustomerID: "cus_ACME", Value: 20, Timestamp: lastSecond(triedHour), Identifier: legacyTried},
	} {
		if out, err := Send(ctx, client, ev, Retry{Attempts: 1}); out != Accepted {
			t.Fatal(err)
		}
	}
	put := func(kind, id, data string) {
		if _, err := f.st.PutRecord(ctx, store.Record{Kind: kind, ID: id, Data: []byte(data)}, false); err != nil {
			t.Fatal(err)
		}
	}
	mark, _ := json.Marshal(Mark{State: StateSent, Units: 10, Identifier: legacySent, At: f.clock()})
	put(KindSent, "acme|"+sentHour, string(mark))
	put(KindFailed, "acme|"+triedHour, `{"error":"stripe: 500 An unknown error occurred","at":"2026-11-10T10:05:00Z"}`)

	r := f.reporter("upgraded")
	r.Namespace = "prod"
	res := tick(t, r)
	if res.Sent != 2 || res.Unreported != 0 {
		t.Fatalf("tick after the upgrade: %+v", res)
	}
	for _, h := range res.Hours {
		if h.Hour == sentHour {
			t.Fatalf("the hour sent before the upgrade was handled again: %+v", h)
		}
	}
	want := map[string]int64{"cus_ACME|" + sentHour: 10, "cus_ACME|" + triedHour: 20, "cus_ACME|" + newHour: 30}
	got := f.sums()
	if len(f.double.Events()) != 3 || len(got) != 3 {
		t.Fatalf("Stripe has %v, want one event per hour", f.double.Events())
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("Stripe has %v, want %v", got, want)
		}
	}
	rows, err := r.Reconcile(ctx, []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if err != nil || len(rows) != 3 {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
	wantIdent := map[string]string{sentHour: legacySent, triedHour: legacyTried, newHour: Identifier("prod", "acme", "cus_ACME", "api_calls", newHour)}
	for _, row := range rows {
		if row.State != StateSent || row.Identifier != wantIdent[row.Hour] || row.UnreportedUnits() != 0 {
			t.Fatalf("row %+v; want sent under %s", row, wantIdent[row.Hour])
		}
	}
}

// TestLateSettlementAfterSendIsUnreported: units an hour's ledger gains
// after the hour was sent never reach Stripe; the metric and the
// reconciliation count them as unreported instead of hiding them.
func TestLateSettlementAfterSendIsUnreported(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 40)
	r := f.reporter("a")
	if res := tick(t, r); res.Sent != 1 || res.Unreported != 0 {
		t.Fatalf("tick: %+v", res)
	}
	f.st.addUsage("acme", period, f.hour(2), 5) // settled after settle_grace
	if res := tick(t, r); res.Sent != 0 || res.Unreported != 5 {
		t.Fatalf("tick after the late settlement: %+v; want 5 unreported", res)
	}
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if err != nil || len(rows) != 1 || rows[0].State != StateSent || rows[0].UnreportedUnits() != 5 || rows[0].PendingUnits() != 0 {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
}

// TestPendingIsNotUnreported: the open hour and a closed hour not tried
// yet are pending, not unreported; a failed hour is unreported.
func TestPendingIsNotUnreported(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(0), 7)  // open
	f.st.addUsage("acme", period, f.hour(2), 11) // closed, not tried
	r := f.reporter("a")
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if err != nil || len(rows) != 2 {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
	for _, row := range rows {
		if row.State != StatePending || row.PendingUnits() != row.LedgerUnits || row.UnreportedUnits() != 0 || row.Closed != (row.Hour == f.hour(2)) {
			t.Fatalf("row %+v", row)
		}
	}
	f.double.Fail(stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError)
	if res := tick(t, r); res.Failed != 1 || res.Unreported != 11 || len(res.Hours) != 1 || res.Hours[0].Outcome != StateFailed || res.Hours[0].Error == "" {
		t.Fatalf("tick while Stripe fails: %+v", res)
	}
	rows, _ = r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if rows[0].State != StateFailed || rows[0].UnreportedUnits() != 11 || rows[1].PendingUnits() != 7 {
		t.Fatalf("reconciliation after the failure %+v", rows)
	}
}

// TestZeroSettleGraceReportsAnHourAsItEnds: with no settle grace an hour
// is reported as soon as it ends.
func TestZeroSettleGraceReportsAnHourAsItEnds(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(0), 3)
	r := f.reporter("a")
	r.SettleGrace = 0
	if res := tick(t, r); res.Sent != 0 {
		t.Fatalf("open hour sent: %+v", res)
	}
	f.advance(time.Hour)
	if res := tick(t, r); res.Sent != 1 {
		t.Fatalf("hour not sent at its end: %+v", res)
	}
}
