package boltstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

func openTemp(t testing.TB, path string, opts ...Option) *Store {
	t.Helper()
	s, err := Open(path, opts...)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return openTemp(t, filepath.Join(t.TempDir(), "store.db"))
	})
}

func TestDataSurvivesReopen(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "store.db")
	anchor := time.Date(2025, 4, 1, 0, 0, 0, 0, time.UTC)
	hash := strings.Repeat("ab", 32)

	s, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if _, err := s.KeySecret(ctx, []byte("the-first-secret")); err != nil {
		t.Fatalf("KeySecret: %v", err)
	}
	if _, err := s.UpsertConfigCustomer(ctx, store.Customer{ID: "acme", Tier: "free", ConfigTier: "free", Email: "ops@acme.example", Anchor: anchor}); err != nil {
		t.Fatalf("UpsertConfigCustomer: %v", err)
	}
	if _, err := s.SetTier(ctx, "acme", "pro"); err != nil {
		t.Fatalf("SetTier: %v", err)
	}
	if err := s.CreateCustomer(ctx, store.Customer{ID: "globex", Tier: "free"}); err != nil {
		t.Fatalf("CreateCustomer: %v", err)
	}
	put, err := s.PutKey(ctx, store.Key{ID: "key_1", Hash: hash, CustomerID: "acme", Prefix: "am_live_AbC"})
	if err != nil {
		t.Fatalf("PutKey: %v", err)
	}
	revoked, err := s.RevokeKey(ctx, "key_1")
	if err != nil {
		t.Fatalf("RevokeKey: %v", err)
	}
	p := limiter.Policy{Limit: 10, Period: time.Hour}
	if out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Rate: p, Cost: 10, Quota: thisMonth()}); err != nil || !out.Allowed {
		t.Fatalf("Reserve = %+v, %v", out, err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = openTemp(t, path)
	if sec, err := s.KeySecret(ctx, []byte("another-secret")); err != nil || string(sec) != "the-first-secret" {
		t.Errorf("KeySecret after reopen = %q, %v; want the first secret", sec, err)
	}
	c, err := s.GetCustomer(ctx, "acme")
	if err != nil || c.Tier != "pro" || c.ConfigTier != "free" || c.Email != "ops@acme.example" || !c.Anchor.Equal(anchor) || c.CreatedAt.IsZero() {
		t.Errorf("customer after reopen = %+v, %v", c, err)
	}
	if list, err := s.ListCustomers(ctx); err != nil || len(list) != 2 || list[1].ID != "globex" {
		t.Errorf("ListCustomers after reopen = %+v, %v", list, err)
	}
	k, err := s.KeyByHash(ctx, hash)
	if err != nil || k.ID != "key_1" || k.CustomerID != "acme" || k.Prefix != "am_live_AbC" ||
		!k.CreatedAt.Equal(put.CreatedAt) || !k.RevokedAt.Equal(revoked.RevokedAt) {
		t.Errorf("key after reopen = %+v, %v; want %+v", k, err, revoked)
	}
	if keys, err := s.ListKeys(ctx, "acme"); err != nil || len(keys) != 1 || keys[0].Hash != hash {
		t.Errorf("ListKeys after reopen = %+v, %v", keys, err)
	}
	if again, err := s.RevokeKey(ctx, "key_1"); err != nil || !again.RevokedAt.Equal(revoked.RevokedAt) {
		t.Errorf("RevokeKey by id after reopen = %+v, %v", again, err)
	}
	// Rate-limit state is in memory only: the budget is full again.
	if out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Rate: p, Cost: 0, Quota: thisMonth()}); err != nil || out.Rate.Remaining != 10 {
		t.Errorf("Reserve after reopen = %+v, %v; want a full budget of 10", out, err)
	}
}

func TestFileModes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "data", "api_monetize", "store.db")
	openTemp(t, path)
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("store file mode = %o, want 600", perm)
	}
	for _, d := range []string{filepath.Join(dir, "data"), filepath.Dir(path)} {
		fi, err := os.Stat(d)
		if err != nil {
			t.Fatal(err)
		}
		if perm := fi.Mode().Perm(); perm != 0o700 {
			t.Errorf("created directory %s mode = %o, want 700", d, perm)
		}
	}
}

func TestSecondOpenFailsWhileLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	first, err := Open(path)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	second, err := Open(path, WithLockTimeout(50*time.Millisecond))
	if err == nil {
		second.Close()
		t.Fatal("second Open of a locked file succeeded")
	}
	if !strings.Contains(err.Error(), "locked") {
		t.Errorf("second Open error = %q, want it to say the file is locked", err)
	}
	if err := first.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	openTemp(t, path) // the lock is released on Close
}

func TestClosed(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Watch(context.Background(), func() {}) }()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch returned %v after Close, want nil", err)
		}
	case <-time.After(storetest.Timeout):
		t.Fatal("Watch did not return after Close")
	}
	if _, err := s.GetCustomer(t.Context(), "acme"); !errors.Is(err, store.ErrUnavailable) {
		t.Errorf("GetCustomer on a closed store: %v, want ErrUnavailable", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestOpenRejectsBadLockTimeout(t *testing.T) {
	if s, err := Open(filepath.Join(t.TempDir(), "store.db"), WithLockTimeout(0)); err == nil {
		s.Close()
		t.Fatal("Open with a zero lock timeout succeeded")
	}
}

func BenchmarkKeyByHash(b *testing.B) {
	s := openTemp(b, filepath.Join(b.TempDir(), "store.db"))
	ctx := context.Background()
	if err := s.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "free"}); err != nil {
		b.Fatal(err)
	}
	hashes := make([]string, 1000)
	for i := range hashes {
		hashes[i] = fmt.Sprintf("%064x", i)
		if _, err := s.PutKey(ctx, store.Key{ID: fmt.Sprintf("key_%d", i), Hash: hashes[i], CustomerID: "acme"}); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := s.KeyByHash(ctx, hashes[i%len(hashes)]); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
}
