package module

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
	"unicode"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// TestProvisionChecksKeyExpiry: JSON configuration gets the Caddyfile's
// rule for a key's expires.
func TestProvisionChecksKeyExpiry(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	app := &App{
		KeySecret: "provision-secret-0123456789",
		StorePath: t.TempDir() + "/store.db",
		Tiers:     []Tier{{Name: "free"}},
		Customers: []CustomerConfig{{ID: "acme", Tier: "free"}},
		Keys:      []KeyConfig{{Key: "dated-key-0123456789abcdef", Customer: "acme", Expires: "next week"}},
	}
	err := app.Provision(ctx)
	_ = app.Cleanup()
	if err == nil || !strings.Contains(err.Error(), `key #1 of customer "acme": expires: expected an RFC 3339 date`) {
		t.Fatalf("Provision with a bad expires: %v", err)
	}
}

// FuzzDecodeKeyRequest: no body makes the decoder panic, and whatever it
// accepts is within the rules: a name of printable characters, at most 64
// of them; a creation expiry in the future; a non-negative overlap.
func FuzzDecodeKeyRequest(f *testing.F) {
	for _, seed := range []string{
		``, `{}`, `{"name":"ci","expires_in":"720h"}`, `{"expires_at":"2099-01-01T00:00:00Z"}`,
		`{"overlap":"0s","name":"x"}`, `{"expires_at":null}`, `{"name":"\u0000"}`, `{"overlap":"-1s"}`, `[]`, `{"name":1}`,
	} {
		f.Add(seed)
	}
	now := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	f.Fuzz(func(t *testing.T, body string) {
		for _, rules := range []keyRules{
			{fields: []string{"name", "overlap", "expires_at", "expires_in"}},
			{fields: []string{"name", "expires_at"}, anyExpiry: true},
		} {
			w := httptest.NewRecorder()
			r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(body))
			edit, err := decodeKeyRequest(w, r, now, rules)
			if err != nil {
				writeAPIError(w, err)
				if w.Code != http.StatusBadRequest {
					t.Fatalf("refused with %d, want 400", w.Code)
				}
				continue
			}
			if edit.name != nil {
				if len([]rune(*edit.name)) > maxKeyNameLength {
					t.Fatalf("accepted a name of %d characters", len([]rune(*edit.name)))
				}
				for _, c := range *edit.name {
					if !unicode.IsPrint(c) {
						t.Fatalf("accepted a name with %U", c)
					}
				}
			}
			if edit.expires != nil && !rules.anyExpiry && !edit.expires.After(now) {
				t.Fatalf("accepted an expiry %v not after now", edit.expires)
			}
			if edit.overlap < 0 {
				t.Fatalf("accepted an overlap of %v", edit.overlap)
			}
		}
	})
}

// BenchmarkKeyLifecycleOnRequest is what the key lifecycle adds to an
// authenticated request: the expiry check on the cached lookup and the
// in-memory last-use record, from all goroutines on one key (the
// contended case).
func BenchmarkKeyLifecycleOnRequest(b *testing.B) {
	uses := newKeyUses()
	k := store.Key{ID: "key_0123456789abcdef", ExpiresAt: time.Now().Add(time.Hour)}
	slot := uses.slot(k.ID)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			now := clockNow()
			if k.Expired(now) {
				b.Fatal("expired")
			}
			slot.record(now)
		}
	})
}
