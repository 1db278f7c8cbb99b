package redisstore

import (
	"testing"
	"time"
)

// TestSingleNodeLayoutReadAsIs: data a single Redis holds in the layout of
// earlier versions (written here with raw commands, as those versions
// wrote it) is read as is: the bucketed layout is a cluster's only.
func TestSingleNodeLayoutReadAsIs(t *testing.T) {
	c := rawClient(t)
	p := newPrefix(t)
	ctx := t.Context()
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	used := time.Date(2026, 11, 1, 0, 0, 0, 0, time.UTC)
	for _, cmd := range [][]any{
		{"SET", p + "secret", "old-secret"},
		{"SET", p + "seeded", "old-token"},
		{"SET", p + "cust:acme", `{"id":"acme","tier":"pro","created_at":"2026-01-02T03:04:05Z"}`},
		{"ZADD", p + "customers", 0, "acme"},
		{"SET", p + "key:h1", `{"id":"k1","hash":"h1","customer_id":"acme","created_at":"2026-01-02T03:04:05Z"}`},
		{"SET", p + "keyid:k1", "h1"},
		{"ZADD", p + "custkeys:{acme}", created.UnixMicro(), "h1"},
		{"HSET", p + "keyused", "k1", used.UnixMicro()},
		{"HSET", p + "rec:sent:acme|2026-11", "d", "mark", "x", 0},
		{"ZADD", p + "recidx:sent", 0, "acme|2026-11"},
		{"SET", p + "lease:report", "old-holder", "PX", 60000},
	} {
		if err := c.Do(ctx, cmd...).Err(); err != nil {
			t.Fatal(cmd, err)
		}
	}
	s := openStore(t, Options{KeyPrefix: p})
	if got, err := s.KeySecret(ctx, []byte("new")); err != nil || string(got) != "old-secret" {
		t.Errorf("KeySecret = %q, %v; want the stored one", got, err)
	}
	if got, err := s.SeedMarker(ctx); err != nil || got != "old-token" {
		t.Errorf("SeedMarker = %q, %v", got, err)
	}
	if cs, err := s.ListCustomers(ctx); err != nil || len(cs) != 1 || cs[0].ID != "acme" || cs[0].Tier != "pro" {
		t.Errorf("ListCustomers = %+v, %v", cs, err)
	}
	if k, err := s.KeyByHash(ctx, "h1"); err != nil || k.ID != "k1" || k.CustomerID != "acme" {
		t.Errorf("KeyByHash = %+v, %v", k, err)
	}
	if k, err := s.KeyByID(ctx, "k1"); err != nil || !k.LastUsedAt.Equal(used) {
		t.Errorf("KeyByID = %+v, %v; want last used %v", k, err, used)
	}
	if ks, err := s.ListKeys(ctx, "acme"); err != nil || len(ks) != 1 || ks[0].Hash != "h1" {
		t.Errorf("ListKeys = %+v, %v", ks, err)
	}
	if rs, err := s.ListRecords(ctx, "sent", "acme|"); err != nil || len(rs) != 1 || string(rs[0].Data) != "mark" {
		t.Errorf("ListRecords = %+v, %v", rs, err)
	}
	if ok, err := s.TryLease(ctx, "report", "new-holder", time.Minute); err != nil || ok {
		t.Errorf("TryLease of a lease held in the old layout = %v, %v; want refused", ok, err)
	}
	if _, err := s.RevokeKey(ctx, "k1"); err != nil {
		t.Fatal(err)
	}
	if k, err := s.KeyByHash(ctx, "h1"); err != nil || k.RevokedAt.IsZero() {
		t.Errorf("after RevokeKey: %+v, %v", k, err)
	}
	if n, err := c.Exists(ctx, p+"key:h1", p+"cust:acme").Result(); err != nil || n != 2 {
		t.Errorf("the old keys are no longer where they were: %d, %v", n, err)
	}
}
