package storetest

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// testKeyLifecycle checks key names, expiry, runtime changes and last-use
// recording.
func testKeyLifecycle(t *testing.T, open func(t *testing.T) store.Store) {
	t.Run("NameAndExpiryStored", func(t *testing.T) {
		s := open(t)
		ctx := t.Context()
		mustCreate(t, s, customer("acme", "free"))
		k := key("acme", 1)
		k.Name, k.ExpiresAt = "ci", base.Add(30*24*time.Hour)
		checkLifecycle(t, "PutKey result", mustPut(t, s, k), k)
		got, err := s.KeyByHash(ctx, k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash: %v", err)
		}
		checkLifecycle(t, "KeyByHash", got, k)
		got, err = s.KeyByID(ctx, k.ID)
		if err != nil {
			t.Fatalf("KeyByID: %v", err)
		}
		checkLifecycle(t, "KeyByID", got, k)
		keys, err := s.ListKeys(ctx, "acme")
		if err != nil || len(keys) != 1 {
			t.Fatalf("ListKeys = %+v, %v; want the key", keys, err)
		}
		checkLifecycle(t, "ListKeys", keys[0], k)
	})
	t.Run("KeyByIDMissing", func(t *testing.T) {
		s := open(t)
		if _, err := s.KeyByID(t.Context(), "key_missing"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("KeyByID(missing) error = %v, want ErrNotFound", err)
		}
	})
	t.Run("UpdateKey", func(t *testing.T) {
		s := open(t)
		ctx := t.Context()
		mustCreate(t, s, customer("acme", "free"))
		k := key("acme", 1)
		mustPut(t, s, k)

		name, later, sooner := "deploy", base.Add(48*time.Hour), base.Add(time.Hour)
		want := k
		want.Name, want.ExpiresAt = name, later
		got := mustUpdate(t, s, k.ID, store.KeyChange{Name: &name, ExpiresAt: &later})
		checkLifecycle(t, "name and expiry set", got, want)

		// A roll shortens, never lengthens.
		evenLater := later.Add(time.Hour)
		checkLifecycle(t, "ShortenOnly with a later expiry", mustUpdate(t, s, k.ID, store.KeyChange{ExpiresAt: &evenLater, ShortenOnly: true}), want)
		want.ExpiresAt = sooner
		checkLifecycle(t, "ShortenOnly with a sooner expiry", mustUpdate(t, s, k.ID, store.KeyChange{ExpiresAt: &sooner, ShortenOnly: true}), want)

		never := time.Time{}
		want.ExpiresAt = never
		checkLifecycle(t, "expiry removed", mustUpdate(t, s, k.ID, store.KeyChange{ExpiresAt: &never}), want)
		got, err := s.KeyByHash(ctx, k.Hash)
		if err != nil {
			t.Fatalf("KeyByHash: %v", err)
		}
		checkLifecycle(t, "KeyByHash after the updates", got, want)

		if _, err := s.UpdateKey(ctx, "key_missing", store.KeyChange{Name: &name}); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("UpdateKey(missing) error = %v, want ErrNotFound", err)
		}
	})
	t.Run("PutAgainKeepsRuntimeExpiryUntilConfigChanges", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		declared := key("acme", 1)
		declared.FromConfig = true
		declared.ConfigExpiresAt = base.Add(90 * 24 * time.Hour)
		declared.ExpiresAt = declared.ConfigExpiresAt
		mustPut(t, s, declared)

		// A roll (or PATCH) shortens it at run time; a resync of the same
		// configuration keeps that.
		rolled, name := base.Add(24*time.Hour), "old"
		mustUpdate(t, s, declared.ID, store.KeyChange{ExpiresAt: &rolled, Name: &name})
		want := declared
		want.ExpiresAt, want.Name = rolled, name
		checkLifecycle(t, "same configuration stored again", mustPut(t, s, declared), want)

		// A configuration declaring another expiry replaces it.
		changed := declared
		changed.ConfigExpiresAt = base.Add(10 * 24 * time.Hour)
		changed.ExpiresAt = changed.ConfigExpiresAt
		want.ExpiresAt, want.ConfigExpiresAt = changed.ConfigExpiresAt, changed.ConfigExpiresAt
		checkLifecycle(t, "configuration with a new expiry", mustPut(t, s, changed), want)
	})
	t.Run("TouchKeysKeepsTheLatest", func(t *testing.T) {
		s := open(t)
		ctx := t.Context()
		mustCreate(t, s, customer("acme", "free"))
		a, b := key("acme", 1), key("acme", 2)
		mustPut(t, s, a)
		mustPut(t, s, b)
		if got, err := s.KeyByID(ctx, a.ID); err != nil || !got.LastUsedAt.IsZero() {
			t.Fatalf("KeyByID of an unused key = %+v, %v; want no LastUsedAt", got, err)
		}
		t1, t2 := base.Add(time.Minute), base.Add(2*time.Minute)
		mustTouch(t, s, map[string]time.Time{a.ID: t2, b.ID: t1, "key_missing": t1})
		mustTouch(t, s, map[string]time.Time{a.ID: t1}) // older: ignored
		checkLastUsed(t, s, "acme", map[string]time.Time{a.ID: t2, b.ID: t1})
		if _, err := s.KeyByID(ctx, "key_missing"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("KeyByID of a touched id that names no key = %v, want ErrNotFound", err)
		}
		// Changing a key keeps its last use.
		name := "renamed"
		if got := mustUpdate(t, s, a.ID, store.KeyChange{Name: &name}); !got.LastUsedAt.Equal(t2) {
			t.Errorf("UpdateKey result LastUsedAt = %v, want %v", got.LastUsedAt, t2)
		}
	})
	t.Run("TouchKeysDoesNotWakeWatch", func(t *testing.T) {
		s := open(t)
		mustCreate(t, s, customer("acme", "free"))
		k := key("acme", 1)
		mustPut(t, s, k)
		watched := startWatch(t, s)
		name := "watched"
		// Wait until the watch is live: an UpdateKey must wake it.
		deadline := time.After(Timeout)
		for live := false; !live; {
			mustUpdate(t, s, k.ID, store.KeyChange{Name: &name})
			select {
			case <-watched:
				live = true
			case <-time.After(100 * time.Millisecond):
			case <-deadline:
				t.Fatalf("Watch saw no UpdateKey within %v", Timeout)
			}
		}
		quiet(watched)
		mustTouch(t, s, map[string]time.Time{k.ID: base})
		select {
		case <-watched:
			t.Error("TouchKeys woke Watch: recording uses would empty every instance's key cache")
		case <-time.After(2 * settle):
		}
	})
}

// testKeyLifecycleShared checks that last uses recorded through two
// handles of one shared store keep the latest, and that a change made
// through one is seen through the other.
func testKeyLifecycleShared(t *testing.T, open func(t *testing.T) (a, b store.Store)) {
	a, b := open(t)
	mustCreate(t, a, customer("acme", "free"))
	k := key("acme", 1)
	mustPut(t, a, k)
	var wg sync.WaitGroup
	latest := base.Add(time.Hour)
	for i := range 20 {
		h := []store.Store{a, b}[i%2]
		at := base.Add(time.Duration(i) * time.Minute)
		if i == 7 {
			at = latest
		}
		wg.Go(func() {
			if err := h.TouchKeys(t.Context(), map[string]time.Time{k.ID: at}); err != nil {
				t.Errorf("TouchKeys: %v", err)
			}
		})
	}
	wg.Wait()
	checkLastUsed(t, b, "acme", map[string]time.Time{k.ID: latest})
	expires := base.Add(time.Hour)
	mustUpdate(t, a, k.ID, store.KeyChange{ExpiresAt: &expires})
	if got, err := b.KeyByHash(t.Context(), k.Hash); err != nil || !got.ExpiresAt.Equal(expires) {
		t.Errorf("KeyByHash via b after UpdateKey via a = %+v, %v; want ExpiresAt %v", got, err, expires)
	}
}

func mustUpdate(t *testing.T, s store.Store, id string, ch store.KeyChange) store.Key {
	t.Helper()
	k, err := s.UpdateKey(t.Context(), id, ch)
	if err != nil {
		t.Fatalf("UpdateKey(%s): %v", id, err)
	}
	return k
}

func mustTouch(t *testing.T, s store.Store, uses map[string]time.Time) {
	t.Helper()
	if err := s.TouchKeys(t.Context(), uses); err != nil {
		t.Fatalf("TouchKeys: %v", err)
	}
}

// checkLastUsed checks the LastUsedAt of a customer's keys, through
// ListKeys and KeyByID.
func checkLastUsed(t *testing.T, s store.Store, customerID string, want map[string]time.Time) {
	t.Helper()
	keys, err := s.ListKeys(t.Context(), customerID)
	if err != nil {
		t.Fatalf("ListKeys: %v", err)
	}
	for _, k := range keys {
		if !k.LastUsedAt.Equal(want[k.ID]) {
			t.Errorf("ListKeys: key %s LastUsedAt = %v, want %v", k.ID, k.LastUsedAt, want[k.ID])
		}
		got, err := s.KeyByID(t.Context(), k.ID)
		if err != nil || !got.LastUsedAt.Equal(want[k.ID]) {
			t.Errorf("KeyByID(%s) = LastUsedAt %v, %v; want %v", k.ID, got.LastUsedAt, err, want[k.ID])
		}
	}
}

// checkLifecycle compares the key fields and the lifecycle fields.
func checkLifecycle(t *testing.T, what string, got, want store.Key) {
	t.Helper()
	checkKey(t, what, got, want)
	if got.Name != want.Name || !got.ExpiresAt.Equal(want.ExpiresAt) || !got.ConfigExpiresAt.Equal(want.ConfigExpiresAt) || got.FromConfig != want.FromConfig {
		t.Errorf("%s: name %q expires %v config expires %v from config %v; want %q, %v, %v, %v", what,
			got.Name, got.ExpiresAt, got.ConfigExpiresAt, got.FromConfig, want.Name, want.ExpiresAt, want.ConfigExpiresAt, want.FromConfig)
	}
}
