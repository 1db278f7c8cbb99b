package apikey

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzCheck fuzzes the key format and checksum check. Properties: a
// refused key is refused for a reason (too short, or generated-looking
// with a wrong checksum); an accepted generated-looking key carries the
// checksum of its body, so changing one character of it is refused; the
// display prefix never holds more than 12 bytes of the key and is valid
// UTF-8 when the key is; hashing is deterministic and hex.
func FuzzCheck(f *testing.F) {
	f.Add(Generate())
	f.Add("am_live_" + strings.Repeat("A", 32) + "_" + checksum("am_live_"+strings.Repeat("A", 32)))
	f.Add("pro-key-0123456789abcdef")
	f.Add("am_live_short")
	f.Add(strings.Repeat("x", GeneratedLength-checksumLen-1) + "_abcdef")
	f.Add("ünïcödé-key-0123456789")
	f.Fuzz(func(t *testing.T, key string) {
		err := Check(key)
		shaped := len(key) == GeneratedLength && key[GeneratedLength-checksumLen-1] == '_'
		generated := shaped || strings.HasPrefix(key, Prefix)
		switch {
		case len(key) < MinLength:
			if err == nil {
				t.Fatalf("%q: accepted with %d characters", key, len(key))
			}
		case !generated:
			if err != nil {
				t.Fatalf("%q: a configured-style key refused: %v", key, err)
			}
		case err == nil:
			body, sum, _ := cutLast(key, '_')
			if sum != checksum(body) || len(body) != len(Prefix)+randomLen {
				t.Fatalf("%q: accepted without its checksum", key)
			}
			// Any one changed character is detected.
			for i := 0; i < len(key); i++ {
				b := []byte(key)
				b[i] ^= 0x01
				if Check(string(b)) == nil {
					t.Fatalf("%q: changing byte %d to %q is not detected", key, i, b[i])
				}
			}
		}
		if len(key) >= MinLength {
			p := DisplayPrefix(key)
			shown := strings.TrimSuffix(p, "…")
			if !strings.HasPrefix(key, shown) || len(shown) > len(Prefix)+4 {
				t.Fatalf("%q: display prefix %q shows too much", key, p)
			}
			if utf8.ValidString(key) && !utf8.ValidString(p) {
				t.Fatalf("%q: display prefix %q splits a character", key, p)
			}
		}
		h := NewHasher([]byte("fuzz-secret-0123456789"))
		hash := h.Hash(key)
		if hash != Hash([]byte("fuzz-secret-0123456789"), key) || hash != h.Hash(key) {
			t.Fatalf("%q: hashing is not deterministic", key)
		}
		if b, err := hex.DecodeString(hash); err != nil || len(b) != sha256.Size {
			t.Fatalf("%q: hash %q is not %d hex bytes", key, hash, sha256.Size)
		}
		if strings.Contains(hash, key) && len(key) >= MinLength {
			t.Fatalf("%q: the hash holds the key", key)
		}
	})
}

// FuzzGenerate checks generated keys from the fuzzer's point of view: the
// generated body with any suffix the fuzzer picks is accepted only with
// the right checksum.
func FuzzGenerate(f *testing.F) {
	f.Add("abcdef")
	f.Add("")
	f.Fuzz(func(t *testing.T, sum string) {
		key := Generate()
		if Check(key) != nil {
			t.Fatalf("generated key %q refused", key)
		}
		body, want, _ := cutLast(key, '_')
		if err := Check(body + "_" + sum); (err == nil) != (sum == want) {
			t.Fatalf("body %q with checksum %q (want %q): %v", body, sum, want, err)
		}
	})
}
