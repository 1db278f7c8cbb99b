package stripereport

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v86"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
)

// testCatalog has every kind of tier: free, monthly with included units and
// overage, custom with overage, yearly without overage, and overage without
// included units.
func testCatalog() Catalog {
	return Catalog{Currency: "usd", Meter: "api_calls", Tiers: []CatalogTier{
		{Name: "free"},
		{Name: "pro", BaseMicros: 49_000_000, Interval: "month", IncludedUnits: 50_000, OverageMicros: 2_000},
		{Name: "enterprise", Custom: true, IncludedUnits: 1_000_000, OverageMicros: 1_000},
		{Name: "team", BaseMicros: 490_000_000, Interval: "year"},
		{Name: "payg", OverageMicros: 1_500},
	}}
}

func runSync(t *testing.T, sc *stripe.Client, cat Catalog, dryRun bool) (*Plan, string) {
	t.Helper()
	var out bytes.Buffer
	p, err := SyncCatalog(context.Background(), sc, cat, dryRun, &out)
	if err != nil {
		t.Fatalf("sync: %v\n%s", err, out.String())
	}
	return p, out.String()
}

func creates(d *stripedouble.Double) [3]int {
	return [3]int{d.Creates("meter"), d.Creates("product"), d.Creates("price")}
}

func posts(d *stripedouble.Double) int {
	return d.Requests("POST /v1/billing/meters") + d.Requests("POST /v1/products") + d.Requests("POST /v1/prices")
}

// prices reads the prices holding the catalog's lookup keys back from
// Stripe (the double).
func prices(t *testing.T, sc *stripe.Client, cat Catalog) map[string]stripePrice {
	t.Helper()
	var keys []string
	for _, tier := range cat.Tiers {
		keys = append(keys, BaseLookupKey(tier.Name), UsageLookupKey(tier.Name))
	}
	got, err := pricesByLookupKey(context.Background(), sc, keys)
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func TestCatalogSyncTwiceCreatesEachObjectOnce(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	sc := NewClient("sk_test_123", d.URL, 10*time.Second)
	cat := testCatalog()

	_, out := runSync(t, sc, cat, false)
	// 1 meter; 5 products; prices: pro base+usage, enterprise usage, team
	// base, payg usage.
	if got := creates(d); got != [3]int{1, 5, 5} {
		t.Fatalf("created (meters, products, prices) = %v, want [1 5 5]\n%s", got, out)
	}
	got := prices(t, sc, cat)
	if len(got) != 5 {
		t.Fatalf("prices by lookup key: %v", got)
	}
	base := got["am_pro_base"]
	if amountOf(base.UnitAmount, base.UnitAmountDecimal) != "4900" || base.Recurring.Interval != "month" ||
		base.Recurring.UsageType != "licensed" || base.Currency != "usd" {
		t.Fatalf("pro base price: %+v", base)
	}
	use := got["am_pro_usage"]
	if use.Recurring.UsageType != "metered" || use.Recurring.Meter == "" || use.BillingScheme != "tiered" ||
		use.TiersMode != "graduated" || len(use.Tiers) != 2 || *use.Tiers[0].UpTo != 50_000 ||
		amountOf(nil, use.Tiers[0].UnitAmountDecimal) != "0" || use.Tiers[1].UpTo != nil ||
		amountOf(nil, use.Tiers[1].UnitAmountDecimal) != "0.2" {
		t.Fatalf("pro usage price: %+v", use)
	}
	if use.Product != base.Product {
		t.Fatalf("pro prices on different products: %s, %s", base.Product, use.Product)
	}
	if _, ok := got["am_enterprise_base"]; ok {
		t.Fatal("a custom tier got a base price")
	}
	if e := got["am_enterprise_usage"]; amountOf(nil, e.Tiers[1].UnitAmountDecimal) != "0.1" || e.Recurring.Meter != use.Recurring.Meter {
		t.Fatalf("enterprise usage price: %+v", e)
	}
	if y := got["am_team_base"]; y.Recurring.Interval != "year" || amountOf(nil, y.UnitAmountDecimal) != "49000" {
		t.Fatalf("team base price: %+v", y)
	}
	if pg := got["am_payg_usage"]; pg.BillingScheme != "per_unit" || amountOf(nil, pg.UnitAmountDecimal) != "0.15" {
		t.Fatalf("payg usage price: %+v", pg)
	}

	before := posts(d)
	p, out := runSync(t, sc, cat, false)
	if !p.UpToDate() || !strings.Contains(out, "up to date") {
		t.Fatalf("second run planned %d steps:\n%s", len(p.Actions), out)
	}
	if posts(d) != before || creates(d) != [3]int{1, 5, 5} {
		t.Fatalf("second run sent %d create requests", posts(d)-before)
	}
}

func TestCatalogSyncReplacesAChangedPrice(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	sc := NewClient("sk_test_123", d.URL, 10*time.Second)
	cat := testCatalog()
	runSync(t, sc, cat, false)
	old := prices(t, sc, cat)

	cat.Tiers[1].BaseMicros = 59_000_000 // pro 59.00/month
	cat.Tiers[1].IncludedUnits = 60_000  // and more included
	cat.Tiers[3].Interval = "month"      // team now monthly
	cat.Tiers[3].BaseMicros = 49_000_000 //   at 49.00
	p, out := runSync(t, sc, cat, false)
	var replaced []string
	for _, a := range p.Actions {
		if a.Kind != ReplacePrice {
			t.Fatalf("unexpected step %q", a.Description)
		}
		replaced = append(replaced, a.LookupKey)
	}
	if strings.Join(replaced, " ") != "am_pro_base am_pro_usage am_team_base" {
		t.Fatalf("replaced %v\n%s", replaced, out)
	}
	if got := creates(d); got != [3]int{1, 5, 8} {
		t.Fatalf("created (meters, products, prices) = %v, want [1 5 8]", got)
	}
	now := prices(t, sc, cat)
	for _, k := range replaced {
		if now[k].ID == old[k].ID {
			t.Fatalf("%s still on %s", k, old[k].ID)
		}
	}
	if amountOf(nil, now["am_pro_base"].UnitAmountDecimal) != "5900" || *now["am_pro_usage"].Tiers[0].UpTo != 60_000 ||
		now["am_team_base"].Recurring.Interval != "month" || now["am_pro_base"].Product != old["am_pro_base"].Product {
		t.Fatalf("new prices: %+v", now)
	}
	if now["am_payg_usage"].ID != old["am_payg_usage"].ID || now["am_enterprise_usage"].ID != old["am_enterprise_usage"].ID {
		t.Fatal("an unchanged price was replaced")
	}
	if p, out := runSync(t, sc, cat, false); !p.UpToDate() {
		t.Fatalf("run after the replacement is not up to date:\n%s", out)
	}
}

func TestCatalogDryRunCreatesNothing(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	sc := NewClient("sk_test_123", d.URL, 10*time.Second)
	cat := testCatalog()

	p, out := runSync(t, sc, cat, true)
	if len(p.Actions) != 11 || posts(d) != 0 { // 1 meter, 5 products, 5 prices
		t.Fatalf("dry run: %d steps, %d create requests\n%s", len(p.Actions), posts(d), out)
	}
	for _, want := range []string{"create meter \"api_calls\"", "create product \"pro\"",
		"create price am_pro_usage: metered on \"api_calls\", graduated: first 50000 units 0, then 0.2 usd", "dry run"} {
		if !strings.Contains(out, want) {
			t.Fatalf("dry run output lacks %q:\n%s", want, out)
		}
	}

	runSync(t, sc, cat, false)
	before := posts(d)
	cat.Tiers[1].OverageMicros = 3_000
	p, out = runSync(t, sc, cat, true)
	if len(p.Actions) != 1 || p.Actions[0].Kind != ReplacePrice || posts(d) != before ||
		!strings.Contains(out, "replace price am_pro_usage") {
		t.Fatalf("dry run of a change: %d steps, %d create requests\n%s", len(p.Actions), posts(d)-before, out)
	}
}

func TestCatalogRefusesAMeterOfAnotherShape(t *testing.T) {
	d := stripedouble.New()
	defer d.Close()
	sc := NewClient("sk_test_123", d.URL, 10*time.Second)
	_, err := sc.V1BillingMeters.Create(context.Background(), &stripe.BillingMeterCreateParams{
		DisplayName: stripe.String("calls"), EventName: stripe.String("api_calls"),
		DefaultAggregation: &stripe.BillingMeterCreateDefaultAggregationParams{Formula: stripe.String("count")},
		CustomerMapping: &stripe.BillingMeterCreateCustomerMappingParams{
			Type: stripe.String("by_id"), EventPayloadKey: stripe.String("stripe_customer_id"),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = SyncCatalog(context.Background(), sc, testCatalog(), false, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "aggregation count") {
		t.Fatalf("sync over a count meter: %v", err)
	}
	if d.Creates("product")+d.Creates("price") != 0 {
		t.Fatal("created objects despite the error")
	}
}

func TestMinorUnitDecimal(t *testing.T) {
	for _, c := range []struct {
		micros   int64
		currency string
		want     string
	}{
		{49_000_000, "usd", "4900"}, // 49.00/month → 4900 cents
		{2_000, "usd", "0.2"},       // 0.002 per unit
		{1_000, "usd", "0.1"},       // 0.001 per unit
		{1, "usd", "0.0001"},        // the smallest configurable amount
		{49_990_000, "eur", "4999"},
		{123_456_789, "usd", "12345.6789"},
		{0, "usd", "0"},
		{500_000_000, "jpy", "500"},    // zero-decimal currency
		{2_000, "jpy", "0.002"},        //
		{1_234_567, "kwd", "1234.567"}, // three-decimal currency
		{9_223_372_036_854_775_807, "usd", "922337203685477.5807"},
	} {
		if got := MinorUnitDecimal(c.micros, c.currency); got != c.want {
			t.Errorf("MinorUnitDecimal(%d, %s) = %q, want %q", c.micros, c.currency, got, c.want)
		}
	}
	for in, want := range map[string]string{"4900": "4900", "4900.000": "4900", "0.20": "0.2", "007.5": "7.5", ".5": "", "1e3": "", "-1": ""} {
		if got := canonDecimal(in); got != want {
			t.Errorf("canonDecimal(%q) = %q, want %q", in, got, want)
		}
	}
}

// validator sends every request to stripe-mock first, which checks it
// against Stripe's API spec, and then, when stripe-mock accepted it, to the
// stateful double, whose answer the client gets. A refused request gets
// stripe-mock's refusal.
type validator struct {
	mock, double string
	mu           sync.Mutex
	validated    int
	refused      []string
}

func (v *validator) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	send := func(base string) (int, []byte, error) {
		req, err := http.NewRequestWithContext(r.Context(), r.Method, base+r.URL.RequestURI(), bytes.NewReader(body))
		if err != nil {
			return 0, nil, err
		}
		req.Header = r.Header.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, b, err
	}
	status, b, err := send(v.mock)
	v.mu.Lock()
	v.validated++
	if err != nil || status != http.StatusOK {
		v.refused = append(v.refused, r.Method+" "+r.URL.RequestURI()+" "+string(body)+" → "+string(b))
	}
	v.mu.Unlock()
	if err == nil && status == http.StatusOK {
		status, b, err = send(v.double)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// TestCatalogRequestsAreValidForStripe runs the sync (create everything, up
// to date, replace changed prices) with every request checked by
// stripe-mock.
func TestCatalogRequestsAreValidForStripe(t *testing.T) {
	mock := stripedouble.StripeMock(t)
	d := stripedouble.New()
	defer d.Close()
	v := &validator{mock: mock, double: d.URL}
	srv := httptest.NewServer(v)
	defer srv.Close()
	sc := NewClient("sk_test_123", srv.URL, 10*time.Second)

	cat := testCatalog()
	runSync(t, sc, cat, false)
	runSync(t, sc, cat, false)
	cat.Tiers[1].BaseMicros, cat.Tiers[1].OverageMicros = 59_000_000, 2_500
	cat.Tiers[4].OverageMicros = 1_000
	runSync(t, sc, cat, false)
	if len(v.refused) > 0 {
		t.Fatalf("stripe-mock refused %d requests:\n%s", len(v.refused), strings.Join(v.refused, "\n"))
	}
	if posts(d) != 14 || creates(d) != [3]int{1, 5, 8} { // 11 creates, then 3 replacements
		t.Fatalf("%d create requests, created %v", posts(d), creates(d))
	}
	if v.validated <= posts(d) {
		t.Fatalf("only %d requests validated", v.validated)
	}

	// The validation is real: a price without a currency is refused.
	_, err := sc.V1Prices.Create(context.Background(), &stripe.PriceCreateParams{Product: stripe.String("prod_1")})
	if err == nil || len(v.refused) != 1 {
		t.Fatalf("stripe-mock accepted a price without currency: %v", err)
	}
}
