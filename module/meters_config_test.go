package module

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stripe/stripe-go/v86"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// metersGlobal declares two meters and gives tiers blocks for them.
const metersGlobal = `api_monetize {
	meter tokens {
		source header X-Tokens-Used max 100000
		stripe ai_tokens
	}
	meter upload {
		source request_bytes
	}
	meter download {
		source response_bytes max 1048576
	}
	tier pro {
		included 50000/month
		over_quota bill 0.002
		rate 100/min
		meter tokens {
			included 2000000/month
			over_quota throttle 10/min bill 0.000010
			thresholds 80 100
		}
		meter upload {
			included 1000000/month
		}
	}
	tier free {
		included 1000/month
		meter tokens {
			included 50000/month
			over_quota block
			thresholds off
		}
	}
}`

func TestParseMeters(t *testing.T) {
	app, err := parseApp(caddyfile.NewTestDispenser(metersGlobal), nil)
	if err != nil {
		t.Fatal(err)
	}
	_ = app
	a, err := parseGlobal(metersGlobal)
	if err != nil {
		t.Fatal(err)
	}
	wantMeters := []MeterConfig{
		{Name: "tokens", Source: MeterSource{Kind: "header", Header: "X-Tokens-Used", Max: 100000}, StripeEvent: "ai_tokens"},
		{Name: "upload", Source: MeterSource{Kind: "request_bytes"}},
		{Name: "download", Source: MeterSource{Kind: "response_bytes", Max: 1048576}},
	}
	if !reflect.DeepEqual(a.Meters, wantMeters) {
		t.Errorf("meters %+v, want %+v", a.Meters, wantMeters)
	}
	month := func(n int64) *Included { return &Included{Units: n, Interval: "month"} }
	wantPro := []TierMeter{
		{Meter: "tokens", Included: month(2000000), Thresholds: []int{80, 100},
			OverQuota: &OverQuota{Mode: "throttle", PriceMicros: 10, Throttle: &Rate{Limit: 10, Window: caddy.Duration(time.Minute)}}},
		{Meter: "upload", Included: month(1000000)},
	}
	if !reflect.DeepEqual(a.Tiers[0].Meters, wantPro) {
		t.Errorf("pro meters %+v, want %+v", a.Tiers[0].Meters, wantPro)
	}
	wantFree := []TierMeter{{Meter: "tokens", Included: month(50000), OverQuota: &OverQuota{Mode: "block"}, Thresholds: []int{}}}
	if !reflect.DeepEqual(a.Tiers[1].Meters, wantFree) {
		t.Errorf("free meters %+v, want %+v", a.Tiers[1].Meters, wantFree)
	}
	checkAccepted(t, metersGlobal, a)

	// Compiled: every tier sees every meter, in declaration order, with
	// the tier's block or only metering.
	if err := a.compileTiers(); err != nil {
		t.Fatal(err)
	}
	pro := a.tierByName["pro"]
	if len(pro.meters) != 3 {
		t.Fatalf("pro has %d meters, want 3", len(pro.meters))
	}
	tok := pro.meters[0]
	if tok.name != "tokens" || tok.quota.quotaMode != "throttle" || tok.quota.included != 2000000 ||
		tok.quota.quotaName != "pro-tokens-month" || tok.quota.throttleName != "pro-tokens-throttle-min" ||
		!reflect.DeepEqual(tok.quota.thresholds, []int{80, 100}) || tok.stripeEvent != "ai_tokens" || tok.header != "X-Tokens-Used" {
		t.Errorf("pro tokens compiled as %+v", tok)
	}
	if up := pro.meters[1]; up.quota.quotaMode != "block" || up.quota.included != 1000000 || up.stripeEvent != "upload" {
		t.Errorf("pro upload compiled as %+v", up)
	}
	if down := pro.meters[2]; down.quota.quotaMode != "" || down.quota.quotaName != "" {
		t.Errorf("pro download (no block) compiled as %+v; want only metered", down)
	}
	if free := a.tierByName["free"]; free.meters[0].quota.thresholds == nil || len(free.meters[0].quota.thresholds) != 0 {
		t.Errorf("free tokens thresholds %v, want off", free.meters[0].quota.thresholds)
	}
}

func TestParseMetersErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		line  int
		want  string
	}{
		{"meter no name", "api_monetize {\n\tmeter {\n\t}\n\ttier t\n}", 2, "meter: expected a name"},
		{"meter no source", "api_monetize {\n\tmeter m {\n\t\tstripe x\n\t}\n\ttier t\n}", 2, "meter m: missing 'source …'"},
		{"meter unknown option", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t\tunit tokens\n\t}\n\ttier t\n}", 4, "unrecognized option 'unit'"},
		{"meter source twice", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t\tsource request_bytes\n\t}\n\ttier t\n}", 4, "'source' is given twice"},
		{"source unknown", "api_monetize {\n\tmeter m {\n\t\tsource tokens\n\t}\n\ttier t\n}", 3, "unknown source 'tokens'"},
		{"header without max", "api_monetize {\n\tmeter m {\n\t\tsource header X-T\n\t}\n\ttier t\n}", 3, "needs 'max <units>'"},
		{"header max zero", "api_monetize {\n\tmeter m {\n\t\tsource header X-T max 0\n\t}\n\ttier t\n}", 3, "max must be a whole number ≥ 1"},
		{"header underscore", "api_monetize {\n\tmeter m {\n\t\tsource header X_T max 5\n\t}\n\ttier t\n}", 3, "header names with '_' or '.' are refused"},
		{"cost with max", "api_monetize {\n\tmeter m {\n\t\tsource cost max 5\n\t}\n\ttier t\n}", 3, "unexpected 'max'"},
		{"bytes bad max", "api_monetize {\n\tmeter m {\n\t\tsource response_bytes limit 5\n\t}\n\ttier t\n}", 3, "unexpected 'limit'"},
		{"stripe event space", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t\tstripe \"a b\"\n\t}\n\ttier t\n}", 4, "not a meter event name"},
		{"tier meter twice", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t}\n\ttier t {\n\t\tmeter m {\n\t\t}\n\t\tmeter m {\n\t\t}\n\t}\n}", 8, "meter 'm' has two blocks (first at Testfile:6)"},
		{"tier meter unknown option", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t}\n\ttier t {\n\t\tmeter m {\n\t\t\trate 5/min\n\t\t}\n\t}\n}", 7, "tier t meter m: unrecognized option 'rate'"},
		{"tier meter bad included", "api_monetize {\n\tmeter m {\n\t\tsource cost\n\t}\n\ttier t {\n\t\tmeter m {\n\t\t\tincluded 5/year\n\t\t}\n\t}\n}", 7, "5/month"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseApp(caddyfile.NewTestDispenser(tc.input), nil)
			checkErr(t, err, tc.line, tc.want, "")
		})
	}
}

// TestMeterNotificationPayload checks that a meter's threshold event
// becomes a payload naming the meter, with the tier's policy for that
// meter, and that the default meter's payload has no meter field.
func TestMeterNotificationPayload(t *testing.T) {
	a, err := parseGlobal(metersGlobal)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.compileTiers(); err != nil {
		t.Fatal(err)
	}
	c := store.Customer{ID: "acme", Tier: "pro"}
	ev := store.ThresholdEvent{Subject: "acme", PeriodID: "20261101T000000Z", Threshold: 100, Used: 2000001, Included: 2000000, Meter: "tokens"}
	p := a.notificationPayload(c, ev)
	if p.Data.Meter != "tokens" || p.Data.OverQuota != "throttle" || !strings.Contains(p.Data.Message, "2000000 tokens") {
		t.Errorf("meter payload %+v", p.Data)
	}
	ev.Meter, ev.Included = "", 50000
	if p := a.notificationPayload(c, ev); p.Data.Meter != "" || p.Data.OverQuota != "bill" || !strings.Contains(p.Data.Message, "API calls") {
		t.Errorf("default payload %+v", p.Data)
	}
}

// TestDegradedAdmissionWithMeters: while the store is unreachable, the
// usage this process last saw per (customer, meter) decides each meter's
// block quota, as the stores decide it (store.Reservation.AdmitMeters),
// and what is admitted is added to it.
func TestDegradedAdmissionWithMeters(t *testing.T) {
	a := &App{shared: &shared{local: limiter.NewLocal()}}
	tr := &tierRuntime{onStoreError: storeErrorLocal}
	q := store.Quota{PeriodID: "20261101T000000Z", HourID: "20261101T000000Z"}
	res := func(upload int64) store.Reservation {
		return store.Reservation{Subject: "c", Cost: 1, Quota: q, Meters: []store.MeterReservation{
			{Meter: "tokens", Mode: store.QuotaBlock, Included: 100},
			{Meter: "upload", Amount: upload, Mode: store.QuotaBlock, Included: 100},
		}}
	}
	// The store last reported 99 tokens and 80 upload bytes.
	a.shared.usage.observe(res(0), store.Reserved{Allowed: true, Used: 3, Meters: []store.MeterReserved{{Used: 99}, {Used: 80}}}, 0)
	out, err := a.reserveDegraded(res(20), tr)
	if err != nil || !out.Allowed || len(out.Meters) != 2 || out.Meters[0].Used != 99 || out.Meters[1].Used != 100 {
		t.Fatalf("tokens 99 < 100, upload 80+20 ≤ 100: %+v, %v; want admitted", out, err)
	}
	out, err = a.reserveDegraded(res(1), tr)
	if err != nil || out.Allowed || out.QuotaExceededMeter != "upload" {
		t.Fatalf("upload 100+1 > 100: %+v, %v; want refused for upload", out, err)
	}
	// The upstream reported 5 tokens: settled into the cache.
	a.shared.usage.addMeter("c", q.PeriodID, "tokens", 5)
	out, err = a.reserveDegraded(res(0), tr)
	if err != nil || out.Allowed || out.QuotaExceededMeter != "tokens" || out.Meters[0].Used != 104 {
		t.Fatalf("tokens 104 ≥ 100: %+v, %v; want refused for tokens", out, err)
	}
}

// TestMetersExample adapts caddyfile-examples/meters and validates the
// result as Caddy would load it.
func TestMetersExample(t *testing.T) {
	t.Setenv("XDG_DATA_HOME", t.TempDir())
	t.Setenv("API_MONETIZE_KEY_SECRET", "example-secret-0123456789")
	t.Setenv("DEMO_FREE_KEY", "demo_free_0123456789abcdef")
	t.Setenv("DEMO_PRO_KEY", "demo_pro_0123456789abcdef0")
	input, err := os.ReadFile(filepath.Join("..", "caddyfile-examples", "meters", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(input, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("warning: %s:%d: %s", w.File, w.Line, w.Message)
	}
	var cfg caddy.Config
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg.Admin = &caddy.AdminConfig{Disabled: true}
	if err := caddy.Validate(&cfg); err != nil {
		t.Fatalf("the example does not validate: %v", err)
	}
}

// TestTierOfMeterPrice: a subscription whose only price is a meter's
// (am_<tier>_<meter>_usage) moves the customer to that tier.
func TestTierOfMeterPrice(t *testing.T) {
	a, err := parseGlobal(metersGlobal)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.compileTiers(); err != nil {
		t.Fatal(err)
	}
	w := &StripeWebhook{app: a}
	sub := func(keys ...string) *stripe.Subscription {
		s := &stripe.Subscription{Items: &stripe.SubscriptionItemList{}}
		for _, k := range keys {
			s.Items.Data = append(s.Items.Data, &stripe.SubscriptionItem{Price: &stripe.Price{LookupKey: k}})
		}
		return s
	}
	for keys, want := range map[string]string{
		"am_free_tokens_usage":            "free",
		"am_pro_tokens_usage am_pro_base": "pro",
		"am_gold_tokens_usage":            "",
		"am_pro_nometer_usage":            "",
	} {
		if got := w.tierOf(sub(strings.Fields(keys)...)); got != want {
			t.Errorf("tierOf(%s) = %q, want %q", keys, got, want)
		}
	}
}

// TestDegradedCostZeroWithMeters: without the store, a request costing 0
// still counts and enforces its other meters (the default meter stays
// free), as the stores do.
func TestDegradedCostZeroWithMeters(t *testing.T) {
	a := &App{shared: &shared{local: limiter.NewLocal()}}
	tr := &tierRuntime{onStoreError: storeErrorLocal}
	q := store.Quota{PeriodID: "20261101T000000Z", HourID: "20261101T000000Z", Mode: store.QuotaBlock, Included: 3}
	res := store.Reservation{Subject: "c", Cost: 0, Quota: q, Meters: []store.MeterReservation{
		{Meter: "upload", Amount: 40, Mode: store.QuotaBlock, Included: 100},
	}}
	a.shared.usage.observe(store.Reservation{Subject: "c", Cost: 1, Quota: q, Meters: res.Meters},
		store.Reserved{Allowed: true, Used: 3, Meters: []store.MeterReserved{{Used: 20}}}, 0)
	for _, want := range []int64{60, 100} {
		out, err := a.reserveDegraded(res, tr)
		if err != nil || !out.Allowed || out.Used != 3 || out.Meters[0].Used != want {
			t.Fatalf("%+v, %v; want admitted at cost 0 with the default quota used up, upload at %d", out, err, want)
		}
	}
	if got := a.shared.usage.get("c", q.PeriodID); got != 3 {
		t.Errorf("default meter %d; want 3 (free calls add nothing)", got)
	}
	if out, err := a.reserveDegraded(res, tr); err != nil || out.Allowed || out.QuotaExceededMeter != "upload" {
		t.Fatalf("upload 100+40 > 100: %+v, %v; want refused for upload", out, err)
	}
}

// TestUnreportedPerMeter: the reporter's unreported units are published
// per meter (cost for the default one) next to the total, every
// configured meter with a series, a meter no longer configured without.
func TestUnreportedPerMeter(t *testing.T) {
	m := getStripeMetrics()
	meters := []stripereport.MeterEvent{{Meter: "tokens", Event: "ai_tokens"}, {Meter: "upload", Event: "upload"}}
	m.setUnreported(stripereport.Result{Unreported: 12, UnreportedByMeter: map[string]int64{"": 2, "tokens": 10}}, append(meters, stripereport.MeterEvent{Meter: "gone"}))
	m.setUnreported(stripereport.Result{Unreported: 12, UnreportedByMeter: map[string]int64{"": 2, "tokens": 10}}, meters)
	if got := testutil.ToFloat64(m.unreported); got != 12 {
		t.Errorf("unreported_units %v; want the total 12", got)
	}
	for meter, want := range map[string]float64{"cost": 2, "tokens": 10, "upload": 0} {
		if got := testutil.ToFloat64(m.unreportedMeter.WithLabelValues(meter)); got != want {
			t.Errorf("unreported_meter_units{meter=%s} %v; want %v", meter, got, want)
		}
	}
	if n := testutil.CollectAndCount(m.unreportedMeter); n != 3 {
		t.Errorf("%d unreported_meter_units series; want 3 (cost, tokens, upload: not the meter no longer configured)", n)
	}
}

// TestPlansListMeters: the portal's plans page gets each plan's other
// meters with their included units, over-quota behaviour and price.
func TestPlansListMeters(t *testing.T) {
	a, err := parseGlobal(metersGlobal)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.compileTiers(); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, p := range (portalBackend{app: a}).Plans() {
		got[p.Name] = fmt.Sprint(p.Meters)
	}
	want := map[string]string{
		"pro": "[{tokens 2000000 tokens per month slowed down to 10 units per min 0.00001 USD per unit} " +
			"{upload 1000000 upload per month blocked } {download Counted, not limited  }]",
		"free": "[{tokens 50000 tokens per month blocked } {upload Counted, not limited  } {download Counted, not limited  }]",
	}
	for name, w := range want {
		if got[name] != w {
			t.Errorf("plan %s meters\n got  %s\n want %s", name, got[name], w)
		}
	}
}

// TestRequestBytesAdvanceBounded: a client's Content-Length is what a
// request_bytes meter reserves in advance, capped by the meter's max and,
// without one, by the stores' bound, so a claimed 2^62-byte body cannot
// overflow a counter (two such reservations summed wrapped an int64 on
// the embedded store).
func TestRequestBytesAdvanceBounded(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/upload", nil)
	r.ContentLength = 1 << 62
	if got := (&meterRuntime{kind: sourceRequestBytes}).advance(r, 1); got != store.MaxMeterAmount {
		t.Fatalf("advance of Content-Length 2^62 without max = %d, want %d", got, store.MaxMeterAmount)
	}
	if got := (&meterRuntime{kind: sourceRequestBytes, max: 1000}).advance(r, 1); got != 1000 {
		t.Fatalf("advance with max 1000 = %d", got)
	}
	r.ContentLength = 42
	if got := (&meterRuntime{kind: sourceRequestBytes}).advance(r, 1); got != 42 {
		t.Fatalf("advance of Content-Length 42 = %d", got)
	}
}
