package stripereport

import (
	"strconv"
	"strings"
	"testing"
)

// FuzzCatalogPrices fuzzes the Stripe price payloads the catalog sync
// builds from a tier. Properties, for every catalog validate accepts: each
// amount is a canonical decimal (as Stripe echoes it back, so a second sync
// plans nothing) that converts back to exactly the configured micros; the
// lookup keys fit Stripe's 200 characters and name their tier back
// (TierOfLookupKey), so a webhook's price maps to the right tier.
func FuzzCatalogPrices(f *testing.F) {
	f.Add("pro", int64(49_000_000), "month", false, int64(50000), int64(2000), "usd")
	f.Add("ent", int64(0), "", true, int64(0), int64(1), "jpy")
	f.Add("x_base", int64(1), "year", false, int64(1), int64(999_999), "kwd")
	f.Add("am_", int64(9_223_372_036_854_775_807), "month", false, int64(1), int64(9_223_372_036_854_775_807), "eur")
	f.Fuzz(func(t *testing.T, name string, base int64, interval string, custom bool, included, overage int64, currency string) {
		cat := Catalog{Currency: currency, Meter: "api_calls", Tiers: []CatalogTier{{
			Name: name, BaseMicros: base, Interval: interval, Custom: custom, IncludedUnits: included, OverageMicros: overage,
		}}}
		if cat.validate() != nil {
			return
		}
		for _, p := range cat.desiredPrices(cat.Tiers[0]) {
			if canonDecimal(p.amount) != p.amount {
				t.Fatalf("%+v: amount %q is not canonical", cat.Tiers[0], p.amount)
			}
			want := base
			if p.metered {
				want = overage
			}
			if got := microsOf(t, p.amount, currency); got != want {
				t.Fatalf("%+v: amount %q in %s is %d micros, want %d", cat.Tiers[0], p.amount, currency, got, want)
			}
			if len(p.lookupKey) > 200 {
				t.Fatalf("lookup key of %d characters", len(p.lookupKey))
			}
			if got := TierOfLookupKey(p.lookupKey); got != name {
				t.Fatalf("lookup key %q names tier %q, want %q", p.lookupKey, got, name)
			}
		}
	})
}

// microsOf converts a minor-unit decimal back to micros of the major unit.
func microsOf(t *testing.T, amount, currency string) int64 {
	t.Helper()
	digits, ok := minorDigits[currency]
	if !ok {
		digits = 2
	}
	whole, frac, _ := strings.Cut(amount, ".")
	scaleDigits := 6 - digits
	if len(frac) > scaleDigits {
		t.Fatalf("amount %q has more decimals than micros allow", amount)
	}
	w, err := strconv.ParseInt(whole, 10, 64)
	if err != nil {
		t.Fatalf("amount %q: %v", amount, err)
	}
	var fr int64
	if frac != "" {
		fr, _ = strconv.ParseInt(frac+strings.Repeat("0", scaleDigits-len(frac)), 10, 64)
	}
	scale := int64(1)
	for range scaleDigits {
		scale *= 10
	}
	return w*scale + fr
}
