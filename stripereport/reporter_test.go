package stripereport

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// fixture is a reporter against the Stripe double and an in-memory store,
// with a settable clock and recorded backoff waits.
type fixture struct {
	t      *testing.T
	double *stripedouble.Double
	st     *memStore
	mu     sync.Mutex
	now    time.Time
	waits  []time.Duration
}

const period = "20261101T000000Z"

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{t: t, double: stripedouble.New(), now: time.Date(2026, 11, 10, 12, 0, 0, 0, time.UTC)}
	t.Cleanup(f.double.Close)
	f.st = newMemStore(f.clock)
	f.st.customers = []store.Customer{
		{ID: "acme", Tier: "pro", StripeCustomerID: "cus_ACME"},
		{ID: "beta", Tier: "pro", StripeCustomerID: "cus_BETA"},
		{ID: "free", Tier: "free"}, // no Stripe id: never reported
	}
	return f
}

func (f *fixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fixture) advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

func (f *fixture) reporter(holder string) *Reporter {
	return &Reporter{
		Client:      NewClient("sk_test_123", f.double.URL, 300*time.Millisecond),
		Store:       f.st,
		Meter:       "api_calls",
		SettleGrace: 2 * time.Minute,
		Holder:      holder,
		LeaseTTL:    2 * time.Hour,
		Periods:     func(store.Customer, time.Time) []string { return []string{period} },
		Retry: Retry{Attempts: 5, Base: time.Second, Max: 8 * time.Second, Sleep: func(_ context.Context, d time.Duration) error {
			f.mu.Lock()
			f.waits = append(f.waits, d)
			f.mu.Unlock()
			return nil
		}},
		Now: f.clock,
	}
}

// hour is the id of the hour starting h hours before the fixture's start.
func (f *fixture) hour(h int) string {
	return metering.TimeID(time.Date(2026, 11, 10, 12, 0, 0, 0, time.UTC).Add(-time.Duration(h) * time.Hour))
}

// sums returns the recorded event values per (Stripe customer, timestamp
// hour) and checks each identifier appears once.
func (f *fixture) sums() map[string]int64 {
	f.t.Helper()
	out := map[string]int64{}
	seen := map[string]bool{}
	for _, e := range f.double.Events() {
		if seen[e.Identifier] {
			f.t.Fatalf("identifier %s recorded twice", e.Identifier)
		}
		seen[e.Identifier] = true
		out[e.Customer+"|"+metering.TimeID(time.Unix(e.Timestamp, 0).UTC().Truncate(time.Hour))] += e.Value
	}
	return out
}

func tick(t *testing.T, r *Reporter) Result {
	t.Helper()
	res, err := r.Tick(context.Background())
	if err != nil {
		t.Fatalf("tick: %v", err)
	}
	return res
}

func TestReportsEachClosedHourOnceWithExactValues(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(3), 1234)
	f.st.addUsage("acme", period, f.hour(2), 1)
	f.st.addUsage("beta", period, f.hour(2), 99)
	f.st.addUsage("acme", period, f.hour(5), 0) // released: nothing to send
	f.st.addUsage("acme", period, f.hour(0), 7) // the open hour
	f.st.addUsage("free", period, f.hour(2), 50)
	r := f.reporter("a")

	res := tick(t, r)
	if !res.Leader || res.Sent != 3 || res.Failed != 0 || res.Unreported != 0 {
		t.Fatalf("first tick: %+v", res)
	}
	got := f.sums()
	want := map[string]int64{"cus_ACME|" + f.hour(3): 1234, "cus_ACME|" + f.hour(2): 1, "cus_BETA|" + f.hour(2): 99}
	if len(got) != len(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Fatalf("events %v, want %v", got, want)
		}
	}
	for _, e := range f.double.Events() {
		if e.EventName != "api_calls" {
			t.Fatalf("event name %q", e.EventName)
		}
	}

	// A second tick sends nothing; the open hour closes only after the
	// settle grace.
	if res := tick(t, r); res.Sent != 0 {
		t.Fatalf("second tick sent %d", res.Sent)
	}
	f.advance(time.Hour + time.Minute)
	if res := tick(t, r); res.Sent != 0 {
		t.Fatalf("hour sent before its settle grace: %+v", res)
	}
	f.advance(time.Minute)
	if res := tick(t, r); res.Sent != 1 {
		t.Fatalf("hour not sent after its settle grace: %+v", res)
	}
	if got := f.sums()["cus_ACME|"+f.hour(0)]; got != 7 {
		t.Fatalf("open hour reported as %d, want 7", got)
	}
	if n := len(f.double.Events()); n != 4 {
		t.Fatalf("%d events, want 4", n)
	}
}

func TestRetriesRateLimitsServerErrorsAndTimeoutsWithTheSameIdentifier(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 500)
	f.double.Fail(stripedouble.RateLimit, stripedouble.ServerError, stripedouble.Hang, stripedouble.RateLimit)
	res := tick(t, f.reporter("a"))
	if res.Sent != 1 || res.Failed != 0 {
		t.Fatalf("tick: %+v", res)
	}
	if n := f.double.Requests("POST /v1/billing/meter_events"); n != 5 {
		t.Fatalf("%d requests, want 5 (4 faults, then accepted)", n)
	}
	if got := f.sums()["cus_ACME|"+f.hour(2)]; got != 500 || len(f.double.Events()) != 1 {
		t.Fatalf("events %v", f.double.Events())
	}
	// Backoff: 4 waits, each within its exponential ceiling (1s, 2s, 4s, 8s).
	if len(f.waits) != 4 {
		t.Fatalf("waits %v", f.waits)
	}
	for i, w := range f.waits {
		if ceiling := time.Second << i; w < 0 || w > ceiling {
			t.Fatalf("wait %d = %v, above its ceiling %v", i, w, ceiling)
		}
	}
}

func TestLostResponseAfterAcceptanceIsNotCountedTwice(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 40)
	f.st.addUsage("acme", period, f.hour(3), 60)
	// The first hour's event is accepted but the answer never arrives, the
	// second's is accepted and answered 500: both are retried, and the
	// retries are answered "already exists", which counts as accepted.
	f.double.Fail(stripedouble.AcceptThenHang, stripedouble.AcceptThen500)
	res := tick(t, f.reporter("a"))
	if res.Sent != 2 {
		t.Fatalf("tick: %+v", res)
	}
	got := f.sums()
	if len(f.double.Events()) != 2 || got["cus_ACME|"+f.hour(2)] != 40 || got["cus_ACME|"+f.hour(3)] != 60 {
		t.Fatalf("events %v", f.double.Events())
	}
}

func TestCrashBetweenAcceptanceAndMarkResendsDeduped(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 40)
	f.st.failPuts = 1 // the "sent" mark is lost: as if the process died after Stripe accepted
	r := f.reporter("a")
	if _, err := r.Tick(context.Background()); !errors.Is(err, errInjected) {
		t.Fatalf("tick error %v, want the injected store failure", err)
	}
	if len(f.double.Events()) != 1 {
		t.Fatalf("events %v", f.double.Events())
	}
	// The next reporter (a restarted process, once the dead one's lease
	// expired) sends the hour again; Stripe refuses the duplicate
	// identifier and the mark is written.
	f.advance(r.LeaseTTL)
	res := tick(t, f.reporter("b-after-restart"))
	if res.Sent != 1 {
		t.Fatalf("tick after restart: %+v", res)
	}
	if n := f.double.Requests("POST /v1/billing/meter_events"); n != 2 || len(f.double.Events()) != 1 {
		t.Fatalf("%d requests, events %v", n, f.double.Events())
	}
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if err != nil || len(rows) != 1 || rows[0].State != StateSent || rows[0].ReportedUnits != 40 || rows[0].LedgerUnits != 40 {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
}

func TestStripeDownLeavesTheBacklogForTheNextTick(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(2), 10)
	f.st.addUsage("beta", period, f.hour(2), 20)
	r := f.reporter("a")
	f.double.Fail(stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError, stripedouble.ServerError)
	res := tick(t, r)
	if res.Sent != 0 || res.Failed != 1 || res.Unreported != 30 {
		t.Fatalf("tick while Stripe is down: %+v", res)
	}
	if n := f.double.Requests("POST /v1/billing/meter_events"); n != 5 {
		t.Fatalf("%d requests: the tick should stop after one event's retries", n)
	}
	rows, err := r.Reconcile(context.Background(), []ReconcileInput{
		{Customer: f.st.customers[0], PeriodID: period}, {Customer: f.st.customers[1], PeriodID: period},
	})
	if err != nil || len(rows) != 2 || rows[0].State != StateFailed || rows[0].Error == "" || rows[1].State != StatePending {
		t.Fatalf("reconciliation %+v, %v", rows, err)
	}
	res = tick(t, r)
	if res.Sent != 2 || res.Unreported != 0 {
		t.Fatalf("tick after Stripe is back: %+v", res)
	}
	rows, _ = r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if rows[0].State != StateSent || rows[0].Error != "" {
		t.Fatalf("reconciliation after recovery %+v", rows)
	}
}

func TestHoursOlderThanStripesWindowAreMarkedTooOldNotSent(t *testing.T) {
	f := newFixture(t)
	f.st.addUsage("acme", period, f.hour(35*24), 5) // 35 days old
	f.st.addUsage("acme", period, f.hour(30*24), 6)
	r := f.reporter("a")
	res := tick(t, r)
	if res.Sent != 1 || res.TooOld != 1 || res.Unreported != 5 {
		t.Fatalf("tick: %+v", res)
	}
	if len(f.double.Events()) != 1 || f.double.Events()[0].Value != 6 {
		t.Fatalf("events %v", f.double.Events())
	}
	res = tick(t, r)
	if res.TooOld != 0 || res.Unreported != 5 {
		t.Fatalf("second tick: %+v (a too-old hour is reported once, and stays unreported)", res)
	}
	rows, _ := r.Reconcile(context.Background(), []ReconcileInput{{Customer: f.st.customers[0], PeriodID: period}})
	if len(rows) != 2 || rows[0].State != StateTooOld || rows[0].LedgerUnits != 5 || rows[0].ReportedUnits != 0 || rows[1].State != StateSent {
		t.Fatalf("reconciliation %+v", rows)
	}
}

func TestOnlyTheLeaseHolderReports(t *testing.T) {
	f := newFixture(t)
	for h := 2; h <= 49; h++ { // closed hours
		f.st.addUsage("acme", period, f.hour(h), int64(h))
		f.st.addUsage("beta", period, f.hour(h), int64(1000+h))
	}
	a, b := f.reporter("a"), f.reporter("b")
	var wg sync.WaitGroup
	results := make([]Result, 2)
	for i, r := range []*Reporter{a, b} {
		wg.Go(func() {
			res, err := r.Tick(context.Background())
			if err != nil {
				t.Errorf("tick: %v", err)
			}
			results[i] = res
		})
	}
	wg.Wait()
	if results[0].Leader == results[1].Leader {
		t.Fatalf("both or neither led: %+v", results)
	}
	if results[0].Sent+results[1].Sent != 96 {
		t.Fatalf("sent %+v, want 96 hours", results)
	}
	// The lease outlives the tick: the follower cannot report until it
	// expires, then it takes over.
	follower := b
	if results[1].Leader {
		follower = a
	}
	f.st.addUsage("acme", period, f.hour(0), 3)
	f.advance(time.Hour + 2*time.Minute)
	if res := tick(t, follower); res.Leader {
		t.Fatalf("the follower led while the leader's lease was valid: %+v", res)
	}
	f.advance(time.Hour)
	if res := tick(t, follower); !res.Leader || res.Sent != 1 {
		t.Fatalf("after the lease expired the other reporter should lead: %+v", res)
	}
	var total int64
	for _, v := range f.sums() {
		total += v
	}
	var ledger int64
	for _, c := range []string{"acme", "beta"} {
		u, _ := f.st.Usage(context.Background(), c, period)
		ledger += u.Billed
	}
	if total != ledger {
		t.Fatalf("events sum to %d, the ledger to %d", total, ledger)
	}
}
