// Package apikey generates, checks and hashes API keys. Keys are never
// stored in clear: a store holds only Hash(secret, key).
//
// Generated keys look like am_live_<random>_<checksum>, where random is 32
// base62 characters (190 bits) and checksum is the base62 CRC-32 of
// "am_live_<random>", so a mistyped key is rejected without a store lookup.
// Keys written in a configuration may be any string of MinLength or more
// characters, except that a key starting with Prefix, or having a generated
// key's shape (GeneratedLength characters with '_' before the last six), must
// carry a valid checksum.
package apikey

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"hash/crc32"
	"strings"
	"sync"
	"unicode/utf8"
)

// Prefix starts every generated key.
const Prefix = "am_live_"

// MinLength is the shortest key accepted at all.
const MinLength = 20

// GeneratedLength is the length of every key Generate returns.
const GeneratedLength = len(Prefix) + randomLen + 1 + checksumLen

const (
	randomLen   = 32
	checksumLen = 6
	base62      = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)

// ErrMalformed is returned for a key that cannot be valid.
var ErrMalformed = errors.New("malformed API key")

// Generate returns a new random key.
func Generate() string {
	var b strings.Builder
	b.Grow(GeneratedLength)
	b.WriteString(Prefix)
	// Rejection sampling keeps every base62 character equally likely.
	buf := make([]byte, 64)
	for n := 0; n < randomLen; {
		_, _ = rand.Read(buf) // crypto/rand.Read never fails (Go 1.24+)
		for _, c := range buf {
			if c < 248 && n < randomLen { // 248 = 4*62
				b.WriteByte(base62[c%62])
				n++
			}
		}
	}
	body := b.String()
	return body + "_" + checksum(body)
}

// Check rejects keys that are too short, and generated-looking keys whose
// checksum does not match, without any store lookup. A key is
// generated-looking if it starts with Prefix or has GeneratedLength
// characters with '_' before the last six, so that changing any one
// character of a generated key, including its prefix, is detected.
func Check(key string) error {
	if len(key) < MinLength {
		return ErrMalformed
	}
	shaped := len(key) == GeneratedLength && key[GeneratedLength-checksumLen-1] == '_'
	if !shaped && !strings.HasPrefix(key, Prefix) {
		return nil
	}
	body, sum, ok := cutLast(key, '_')
	if !ok || len(body) != len(Prefix)+randomLen || !hmac.Equal([]byte(sum), []byte(checksum(body))) {
		return ErrMalformed
	}
	return nil
}

// Hash returns the hex HMAC-SHA256 of key under secret: the only form in
// which a key is stored.
func Hash(secret []byte, key string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(key))
	return hex.EncodeToString(m.Sum(nil))
}

// Hasher computes Hash for one secret without setting HMAC up again for
// every key: it reuses keyed HMAC states. It is safe for concurrent use.
type Hasher struct {
	pool sync.Pool // of *hmacState
}

// hmacState is a keyed HMAC and its scratch buffer, reused across keys.
type hmacState struct {
	mac hash.Hash
	buf []byte
}

// NewHasher returns a Hasher for secret.
func NewHasher(secret []byte) *Hasher {
	secret = bytes.Clone(secret)
	return &Hasher{pool: sync.Pool{New: func() any { return &hmacState{mac: hmac.New(sha256.New, secret)} }}}
}

// Sum returns the HMAC-SHA256 of key: Hash before hex encoding. It does not
// allocate, and leaves no copy of key behind.
func (h *Hasher) Sum(key string) [sha256.Size]byte {
	s := h.pool.Get().(*hmacState)
	s.mac.Reset()
	s.buf = append(s.buf[:0], key...)
	s.mac.Write(s.buf)
	clear(s.buf)
	s.buf = s.mac.Sum(s.buf[:0])
	var sum [sha256.Size]byte
	copy(sum[:], s.buf)
	h.pool.Put(s)
	return sum
}

// Hash returns Hash(secret, key).
func (h *Hasher) Hash(key string) string {
	sum := h.Sum(key)
	return hex.EncodeToString(sum[:])
}

// ID derives a key's public identifier from its hash.
func ID(hash string) string {
	return "key_" + hash[:16]
}

// DisplayPrefix is the part of a key shown to humans when listing keys:
// Prefix plus the next four bytes of a key starting with Prefix, or the
// first four bytes of another key, followed by "…". A key shorter than
// MinLength is not valid and shows as "…" alone. The cut never splits a
// UTF-8 character, so it may show fewer bytes.
func DisplayPrefix(key string) string {
	if len(key) < MinLength {
		return "…"
	}
	n := 4
	if strings.HasPrefix(key, Prefix) {
		n += len(Prefix)
	}
	for n > 0 && !utf8.RuneStart(key[n]) {
		n--
	}
	return key[:n] + "…"
}

func checksum(body string) string {
	v := crc32.ChecksumIEEE([]byte(body))
	out := make([]byte, checksumLen)
	for i := checksumLen - 1; i >= 0; i-- {
		out[i] = base62[v%62]
		v /= 62
	}
	return string(out)
}

func cutLast(s string, sep byte) (before, after string, ok bool) {
	i := strings.LastIndexByte(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+1:], true
}
