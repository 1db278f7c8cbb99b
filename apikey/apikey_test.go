package apikey

import (
	"encoding/hex"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"
)

var generatedShape = regexp.MustCompile(`^am_live_[0-9A-Za-z]{32}_[0-9A-Za-z]{6}$`)

func TestGeneratedKeysHaveShapePassCheckAndAreUnique(t *testing.T) {
	seen := make(map[string]bool)
	for range 2000 {
		k := Generate()
		if !generatedShape.MatchString(k) || len(k) != GeneratedLength {
			t.Fatalf("generated key %q does not have the documented shape", k)
		}
		if err := Check(k); err != nil {
			t.Fatalf("Check(generated key) = %v", err)
		}
		if seen[k] {
			t.Fatal("duplicate generated key")
		}
		seen[k] = true
	}
}

func TestGeneratedKeysUseWholeAlphabet(t *testing.T) {
	// Every base62 character should appear in the random part of a few
	// hundred keys (32*500 draws; a missing character means a biased or
	// truncated alphabet).
	counts := make(map[byte]int)
	for range 500 {
		k := Generate()
		for i := len(Prefix); i < len(Prefix)+randomLen; i++ {
			counts[k[i]]++
		}
	}
	if len(counts) != 62 {
		t.Fatalf("random part used %d distinct characters, want 62", len(counts))
	}
}

func TestOneCharacterChangeFailsCheck(t *testing.T) {
	alphabet := base62 + "_-."
	for range 5 {
		k := Generate()
		for i := range len(k) {
			for j := range len(alphabet) {
				c := alphabet[j]
				if c == k[i] {
					continue
				}
				mutated := k[:i] + string(c) + k[i+1:]
				if Check(mutated) == nil {
					t.Fatalf("Check accepted %q, a one-character change of a generated key at %d", mutated, i)
				}
			}
		}
	}
}

func TestTruncatedOrExtendedGeneratedKeyFailsCheck(t *testing.T) {
	k := Generate()
	for _, bad := range []string{k[:len(k)-1], k + "x", k[:len(Prefix)+randomLen], Prefix + strings.Repeat("a", 20)} {
		if Check(bad) == nil {
			t.Errorf("Check accepted %q", bad)
		}
	}
}

func TestShortKeysFailCheck(t *testing.T) {
	for _, k := range []string{"", "a", strings.Repeat("x", MinLength-1), "am_live_"} {
		if Check(k) == nil {
			t.Errorf("Check accepted %q (%d chars)", k, len(k))
		}
	}
}

func TestConfiguredKeysPassCheck(t *testing.T) {
	for _, k := range []string{
		strings.Repeat("x", MinLength),
		"my-partner-key-2024-abc",
		"sk_test_51HxYzABCDEFGHIJKLMNOPQRST",
		"am_test_0123456789abcdefghijkl", // a different prefix is not ours
		"ключ-партнёра-номер-1",
		strings.Repeat("k", GeneratedLength), // generated length, no separator
	} {
		if err := Check(k); err != nil {
			t.Errorf("Check(%q) = %v, want accepted", k, err)
		}
	}
}

func TestHash(t *testing.T) {
	k := Generate()
	a := Hash([]byte("secret-a"), k)
	if a != Hash([]byte("secret-a"), k) {
		t.Fatal("Hash is not deterministic")
	}
	if !regexp.MustCompile(`^[0-9a-f]{64}$`).MatchString(a) {
		t.Fatalf("Hash = %q, want 64 hex digits", a)
	}
	if a == Hash([]byte("secret-b"), k) {
		t.Fatal("Hash is the same under two secrets")
	}
	if a == Hash([]byte("secret-a"), Generate()) {
		t.Fatal("two keys hash alike")
	}
	if strings.Contains(a, k[len(Prefix):]) {
		t.Fatal("hash contains the key")
	}
	id := ID(a)
	if id != "key_"+a[:16] || id != ID(Hash([]byte("secret-a"), k)) {
		t.Fatalf("ID = %q, want stable key_ + 16 hex digits", id)
	}
}

func TestDisplayPrefix(t *testing.T) {
	k := Generate()
	tests := []struct{ key, want string }{
		{k, k[:len(Prefix)+4] + "…"},
		{"my-partner-key-2024-abc", "my-p…"},
		{"am_live_short_but_20chars", "am_live_shor…"},
		{"ключ-партнёра-номер-1", "кл…"},
		{"ab€-partner-key-2024x", "ab…"}, // 4 bytes end inside the €
		{"short", "…"},
		{"", "…"},
		{"am_live_", "…"},
	}
	for _, tt := range tests {
		got := DisplayPrefix(tt.key)
		if got != tt.want {
			t.Errorf("DisplayPrefix(%q) = %q, want %q", tt.key, got, tt.want)
		}
		if !utf8.ValidString(got) {
			t.Errorf("DisplayPrefix(%q) = %q is not valid UTF-8", tt.key, got)
		}
		shown := strings.TrimSuffix(got, "…")
		if !strings.HasPrefix(tt.key, shown) || len(shown) > len(Prefix)+4 {
			t.Errorf("DisplayPrefix(%q) reveals %q", tt.key, shown)
		}
	}
}

func TestHasherMatchesHash(t *testing.T) {
	secret := []byte("a-secret-of-some-length")
	h := NewHasher(secret)
	for _, k := range []string{"key-one-0123456789abcdef", "key-two-0123456789abcdef", Generate()} {
		if got, want := h.Hash(k), Hash(secret, k); got != want {
			t.Errorf("Hasher.Hash(%q) = %s, want %s", k, got, want)
		}
		if got, want := h.Hash(k), Hash(secret, k); got != want { // a reused state
			t.Errorf("second Hasher.Hash(%q) = %s, want %s", k, got, want)
		}
	}
	if NewHasher([]byte("another secret")).Hash("key-one-0123456789abcdef") == h.Hash("key-one-0123456789abcdef") {
		t.Error("different secrets gave the same hash")
	}
	// Sum is Hash before hex encoding, for a long key too (longer than the
	// digest, so a reused buffer must not leak into the next one).
	for _, k := range []string{strings.Repeat("long-key-", 20), "key-one-0123456789abcdef"} {
		sum := h.Sum(k)
		if got, want := hex.EncodeToString(sum[:]), Hash(secret, k); got != want {
			t.Errorf("Hasher.Sum(%q) = %s, want %s", k, got, want)
		}
	}
	h.Sum("warm-up-0123456789abcdef") // the pool's state exists
	if n := testing.AllocsPerRun(100, func() { h.Sum("key-one-0123456789abcdef") }); n != 0 && !raceEnabled {
		t.Errorf("Hasher.Sum allocates %.0f times per key", n)
	}
}

func BenchmarkHasher(b *testing.B) {
	h := NewHasher([]byte("a-secret-of-some-length"))
	b.ReportAllocs()
	for b.Loop() {
		h.Hash("key-one-0123456789abcdef")
	}
}

func BenchmarkHash(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		Hash([]byte("a-secret-of-some-length"), "key-one-0123456789abcdef")
	}
}
