package portal

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
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
	u := Usage{Tier: "pro", Start: time.Now(), End: time.Now(), Currency: "USD", Meters: []MeterUsage{
		{Meter: "tokens", Used: 2500000, Included: &inc, Remaining: &rem, Overage: 500000, OverageCharge: "5", OverQuota: "bill"},
		{Meter: "download", Used: 1234},
	}}
	rec := httptest.NewRecorder()
	h.render(rec, httptest.NewRequest(http.MethodGet, "/usage", nil), http.StatusOK, "usage", &session{Customer: "acme"}, map[string]any{"Usage": u})
	body := rec.Body.String()
	for _, want := range []string{
		`<td>tokens</td><td>2500000</td><td>2000000</td><td>0</td><td>500000 (5 USD)</td><td>bill</td>`,
		`<td>download</td><td>1234</td><td>—</td><td>—</td><td>—</td><td>counted only</td>`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("usage page lacks %s:\n%s", want, body)
		}
	}
}
