package portal

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestUsagePageListsMeters checks that the usage page shows each other
// meter with its quota, and "counted only" for a meter the tier only
// counts.
func TestUsagePageListsMeters(t *testing.T) {
	h := &Handler{log: zap.NewNop()}
	if err := h.parseTemplates(); err != nil {
		t.Fatal(err)
	}
	inc, rem := int64(2000000), int64(0)
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	u := Usage{Tier: "pro", Start: start, End: start.AddDate(0, 1, 0), Currency: "USD", Meters: []MeterUsage{
		{Meter: "tokens", Used: 2500000, Included: &inc, Remaining: &rem, Overage: 500000, OverageCharge: "5", OverQuota: "bill",
			Hours: []store.HourUsage{{HourID: "20261101T030000Z", Counters: store.Counters{Billed: 2000000, Requests: 3}}, {HourID: "20261102T040000Z", Counters: store.Counters{Billed: 500000, Requests: 1}}}},
		{Meter: "download", Used: 1234, Hours: []store.HourUsage{{HourID: "20261102T040000Z", Counters: store.Counters{Billed: 1234, Requests: 2}}}},
	}}
	rec := httptest.NewRecorder()
	now := start.Add(2*24*time.Hour + time.Hour) // during the 3rd day
	h.render(rec, httptest.NewRequest(http.MethodGet, "/usage", nil), http.StatusOK, "usage", &session{Customer: "acme"},
		map[string]any{"Usage": u, "MeterCharts": meterCharts(u, now)})
	body := rec.Body.String()
	for _, want := range []string{
		`<td>tokens</td><td>2500000</td><td>2000000</td><td>0</td><td>500000 (5 USD)</td><td>bill</td>`,
		`<td>download</td><td>1234</td><td>—</td><td>—</td><td>—</td><td>counted only</td>`,
		// One chart per meter, the tokens one against its included units.
		`<figure class="card" id="meter-chart-tokens">`,
		`tokens used in the period so far, by day (UTC), against the included tokens (line)`,
		`<title>2026-11-02: 500000 tokens that day, 2500000 in the period so far</title>`,
		`<figure class="card" id="meter-chart-download">`,
		`<title>2026-11-02: 1234 download that day, 1234 in the period so far</title>`,
		`<tr><td>2026-11-02</td><td>500000</td><td>1</td><td>2500000 (over the included tokens)</td></tr>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("usage page lacks %s:\n%s", want, body)
		}
	}
}

// TestChartsOfMeters: each meter's daily chart sums its own hours, with
// its included units as the line, and none without a quota.
func TestChartsOfMeters(t *testing.T) {
	start := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	inc := int64(100)
	u := Usage{Start: start, End: start.AddDate(0, 1, 0), Used: 1, Hours: []store.HourUsage{{HourID: "20261101T000000Z", Counters: store.Counters{Billed: 1}}},
		Meters: []MeterUsage{
			{Meter: "tokens", Included: &inc, Hours: []store.HourUsage{{HourID: "20261101T010000Z", Counters: store.Counters{Billed: 60}}, {HourID: "20261101T020000Z", Counters: store.Counters{Billed: 70}}}},
			{Meter: "upload"},
		}}
	cs := meterCharts(u, start.Add(36*time.Hour))
	if len(cs) != 2 || cs[0].Meter != "tokens" || cs[1].Meter != "upload" {
		t.Fatalf("charts %+v; want tokens then upload", cs)
	}
	tok := cs[0]
	if len(tok.Days) != 2 || tok.Days[0].Units != 130 || tok.Days[0].Total != 130 || !tok.Days[0].OverIncludedLine || tok.Days[1].Total != 130 {
		t.Errorf("tokens days %+v; want 130 on day 1 (over the 100 included), 130 so far on day 2", tok.Days)
	}
	if !tok.HasIncluded || tok.Max != 130 {
		t.Errorf("tokens chart: included line %v, max %d; want the line and max 130", tok.HasIncluded, tok.Max)
	}
	if up := cs[1]; up.HasIncluded || len(up.Days) != 2 || up.Days[1].Total != 0 {
		t.Errorf("upload chart %+v; want two empty days without an included line", up)
	}
}

// TestPlansPageListsMeters checks that the plans page shows each plan's
// other meters.
func TestPlansPageListsMeters(t *testing.T) {
	h := &Handler{log: zap.NewNop()}
	if err := h.parseTemplates(); err != nil {
		t.Fatal(err)
	}
	plans := []Plan{{Name: "pro", Price: "49.00 USD per month", Included: "50000 units per month", OverQuota: "billed", Meters: []PlanMeter{
		{Name: "tokens", Included: "2000000 tokens per month", OverQuota: "billed", OveragePrice: "0.00001 USD per unit"},
		{Name: "download", Included: "Counted, not limited"},
	}}}
	rec := httptest.NewRecorder()
	h.render(rec, httptest.NewRequest(http.MethodGet, "/plans", nil), http.StatusOK, "plans", &session{Customer: "acme"}, map[string]any{"Plans": plans, "Current": "pro"})
	body := rec.Body.String()
	for _, want := range []string{
		`<dt>tokens</dt><dd class="meter">2000000 tokens per month; beyond: billed, 0.00001 USD per unit</dd>`,
		`<dt>download</dt><dd class="meter">Counted, not limited</dd>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("plans page lacks %s:\n%s", want, body)
		}
	}
}
