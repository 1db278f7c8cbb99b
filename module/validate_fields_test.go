package module

import (
	"context"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestCustomerFieldsOneValidation checks that the Caddyfile, a JSON
// configuration and the admin API's check (the same functions) agree on
// every email and Stripe customer id: what one refuses, all refuse.
func TestCustomerFieldsOneValidation(t *testing.T) {
	for _, tc := range []struct {
		field, value string
		ok           bool
	}{
		{"email", "billing@example.com", true},
		{"email", "a@example.com\r\nBcc: victim@example.com", false},
		{"email", "a@example.com\n", false},
		{"email", "Acme <a@example.com>", false},
		{"email", "a@example.com (comment)", false},
		{"email", strings.Repeat("a", 250) + "@example.com", false},
		{"email", "not an address", false},
		{"stripe", "cus_NffrFeUfNV2Hib", true},
		{"stripe", "cus_", false},
		{"stripe", "cus_1\r\nX: y", false},
		{"stripe", "cus_1/../../v1/charges", false},
		{"stripe", "acme", false},
	} {
		var checked error
		cust := CustomerConfig{ID: "acme", Tier: "free"}
		if tc.field == "email" {
			checked, cust.Email = checkEmail(tc.value), tc.value
		} else {
			checked, cust.StripeCustomerID = checkStripeCustomerID(tc.value), tc.value
		}
		if (checked == nil) != tc.ok {
			t.Errorf("%s %q: check says %v, want ok=%v", tc.field, tc.value, checked, tc.ok)
		}

		d := caddyfile.NewTestDispenser("api_monetize {\n\ttier free\n\tcustomer acme tier free " + tc.field + " " + caddyfileQuote(tc.value) + "\n}")
		_, parsed := parseApp(d, nil)
		if (parsed == nil) != tc.ok {
			t.Errorf("%s %q: the Caddyfile says %v, want ok=%v", tc.field, tc.value, parsed, tc.ok)
		}

		app := &App{StorePath: t.TempDir() + "/store.db", KeySecret: "test-secret-0123456789", Tiers: []Tier{{Name: "free"}}, Customers: []CustomerConfig{cust}}
		provisioned := provisionApp(t, app)
		if (provisioned == nil) != tc.ok {
			t.Errorf("%s %q: a JSON configuration says %v, want ok=%v", tc.field, tc.value, provisioned, tc.ok)
		}
	}
}

// caddyfileQuote writes v as one Caddyfile token.
func caddyfileQuote(v string) string {
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(v) + `"`
}

// provisionApp provisions app outside a Caddy server (no I/O: the store is
// opened lazily) and releases it; it returns Provision's error.
func provisionApp(t *testing.T, app *App) error {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	err := app.Provision(ctx)
	_ = app.Cleanup()
	return err
}

// TestKeyForTwoCustomersRefused checks that one key declared for two
// customers, through two placeholders whose variables hold the same value,
// is refused at provision time, naming both customers and never the key;
// the same key twice for one customer is harmless and accepted.
func TestKeyForTwoCustomersRefused(t *testing.T) {
	const key = "shared-key-0123456789abcdef"
	t.Setenv("API_MONETIZE_TEST_KEY_A", key)
	t.Setenv("API_MONETIZE_TEST_KEY_B", key)
	newApp := func(secondCustomer string) *App {
		return &App{
			StorePath: t.TempDir() + "/store.db", KeySecret: "test-secret-0123456789",
			Tiers:     []Tier{{Name: "free"}, {Name: "pro"}},
			Customers: []CustomerConfig{{ID: "hobbyist", Tier: "free"}, {ID: "acme", Tier: "pro"}},
			Keys:      []KeyConfig{{Key: "{env.API_MONETIZE_TEST_KEY_A}", Customer: "hobbyist"}, {Key: "{env.API_MONETIZE_TEST_KEY_B}", Customer: secondCustomer}},
		}
	}
	err := provisionApp(t, newApp("acme"))
	if err == nil {
		t.Fatal("one key for two customers was accepted")
	}
	for _, want := range []string{`"hobbyist"`, `"acme"`, "key #1", "key #2"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if strings.Contains(err.Error(), key) {
		t.Errorf("error %q holds the key", err)
	}
	if err := provisionApp(t, newApp("hobbyist")); err != nil {
		t.Errorf("the same key twice for one customer: %v", err)
	}
}
