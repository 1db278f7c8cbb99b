package redisstore

import (
	"context"
	"testing"
)

// TestSeedMarker: the first claim wins, later claims return its token, and
// a Redis that lost its data has none.
func TestSeedMarker(t *testing.T) {
	prefix := newPrefix(t)
	a, b := openStore(t, Options{KeyPrefix: prefix}), openStore(t, Options{KeyPrefix: prefix})
	ctx := context.Background()
	if tok, err := a.SeedMarker(ctx); err != nil || tok != "" {
		t.Fatalf("marker of an empty store = %q, %v; want none", tok, err)
	}
	if tok, err := a.ClaimSeedMarker(ctx, "first"); err != nil || tok != "first" {
		t.Fatalf("first claim = %q, %v", tok, err)
	}
	if tok, err := b.ClaimSeedMarker(ctx, "second"); err != nil || tok != "first" {
		t.Fatalf("second claim = %q, %v; want the first one's token", tok, err)
	}
	if tok, err := b.SeedMarker(ctx); err != nil || tok != "first" {
		t.Fatalf("marker = %q, %v", tok, err)
	}
	if err := rawClient(t).Del(ctx, prefix+"seeded").Err(); err != nil { // the data is lost
		t.Fatal(err)
	}
	if tok, err := a.SeedMarker(ctx); err != nil || tok != "" {
		t.Fatalf("marker after the loss = %q, %v; want none", tok, err)
	}
}

// TestPersistence asks private Redis servers with each persistence setting,
// and one that refuses CONFIG (as managed services do).
func TestPersistence(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want Persistence
	}{
		{"none", nil, Persistence{Known: true}},
		{"aof", []string{"--appendonly", "yes"}, Persistence{AOF: true, Known: true}},
		{"rdb", []string{"--save", "900 1"}, Persistence{RDB: true, Known: true}},
		{"no CONFIG, none", []string{"--rename-command", "CONFIG", ""}, Persistence{}},
		{"no CONFIG, aof", []string{"--rename-command", "CONFIG", "", "--appendonly", "yes"}, Persistence{AOF: true, Known: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openStore(t, Options{URL: "unix://" + privateRedis(t, tc.args...)})
			got, err := s.Persistence(context.Background())
			if err != nil || got != tc.want {
				t.Fatalf("Persistence = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}
