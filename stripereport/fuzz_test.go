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

// FuzzIdentifier fuzzes the meter-event identifier. Properties: it fits
// Stripe's 100 characters and is printable ASCII; it is the same for the
// same hour (a retry after a crash is deduplicated by Stripe); and two
// different (namespace, customer, Stripe customer, meter, hour) tuples whose
// fields hold no NUL — every field the configuration and the admin API
// accept — never share an identifier, however the fields' characters are
// split between them (so no deployment's usage is taken for another's).
func FuzzIdentifier(f *testing.F) {
	f.Add("prod", "acme", "cus_A", "api_calls", "20261101T000000Z", "staging", "acme", "cus_A", "api_calls", "20261101T000000Z")
	f.Add("ab", "c", "cus_1", "m", "h", "a", "bc", "cus_1", "m", "h")
	f.Add("", "acme", "", "api_calls", "20261101T000000Z", "", "acme", "cus_B", "api_calls", "20261101T000000Z")
	f.Fuzz(func(t *testing.T, ns1, c1, s1, m1, h1, ns2, c2, s2, m2, h2 string) {
		a := []string{ns1, c1, s1, m1, h1}
		b := []string{ns2, c2, s2, m2, h2}
		for _, v := range append(a, b...) {
			if strings.ContainsRune(v, 0) {
				return
			}
		}
		id := Identifier(ns1, c1, s1, m1, h1)
		if len(id) > 100 || !strings.HasPrefix(id, "am2_") || strings.ContainsFunc(id, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
			t.Fatalf("identifier %q is not a short printable ASCII am2_ id", id)
		}
		if again := Identifier(ns1, c1, s1, m1, h1); again != id {
			t.Fatalf("identifier not deterministic: %q then %q", id, again)
		}
		same := strings.Join(a, "\x00") == strings.Join(b, "\x00")
		if other := Identifier(ns2, c2, s2, m2, h2); (other == id) != same {
			t.Fatalf("%q and %q: identifiers %q and %q (same tuple: %v)", a, b, id, other, same)
		}
	})
}
