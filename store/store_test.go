package store

import (
	"testing"
	"time"
)

func TestBillingAnchorDefaultsToTheDayFirstStored(t *testing.T) {
	created := time.Date(2026, 1, 31, 17, 45, 0, 0, time.UTC)
	if got, want := (Customer{CreatedAt: created}).BillingAnchor(), time.Date(2026, 1, 31, 0, 0, 0, 0, time.UTC); !got.Equal(want) {
		t.Errorf("no anchor: %v, want %v", got, want)
	}
	anchor := time.Date(2025, 3, 15, 0, 0, 0, 0, time.UTC)
	if got := (Customer{CreatedAt: created, Anchor: anchor}).BillingAnchor(); !got.Equal(anchor) {
		t.Errorf("with an anchor: %v, want %v", got, anchor)
	}
}

// TestMergeConfigKeepsRuntimeStripeLink: a customer declared in the
// configuration without a Stripe id keeps the link a checkout made at
// runtime when the configuration is stored again (every minute and at
// each reload); a declared id replaces it; contact fields follow the
// configuration.
func TestMergeConfigKeepsRuntimeStripeLink(t *testing.T) {
	stored := Customer{ID: "acme", Tier: "pro", ConfigTier: "free", Email: "old@example.com", StripeCustomerID: "cus_LINKED"}
	got := stored.MergeConfig(Customer{ID: "acme", Tier: "free", ConfigTier: "free", Email: "new@example.com"})
	if got.StripeCustomerID != "cus_LINKED" || got.Email != "new@example.com" || got.Tier != "pro" {
		t.Errorf("config without a Stripe id: got %+v, want the runtime link and tier kept, the email updated", got)
	}
	got = stored.MergeConfig(Customer{ID: "acme", Tier: "free", ConfigTier: "free", StripeCustomerID: "cus_DECLARED"})
	if got.StripeCustomerID != "cus_DECLARED" {
		t.Errorf("config declaring a Stripe id: got %q, want cus_DECLARED", got.StripeCustomerID)
	}
}
