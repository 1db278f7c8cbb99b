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
