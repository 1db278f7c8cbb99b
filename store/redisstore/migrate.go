package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// Migrated counts what Migrate copied; what the destination already had
// is not counted.
type Migrated struct {
	// Customers, Keys and Records are the catalogue entries copied.
	Customers, Keys, Records int
	// CustomerKeys are the keys of the customers' own slots copied (period
	// counters and hours, rate state, idempotency keys, outboxes).
	CustomerKeys int
	// SecretCopied reports that the key secret was copied.
	SecretCopied bool
}

// migrateSkippedKinds are the record kinds Migrate leaves out: the Stripe
// reporter's cursor (so that the destination's first run is a full pass,
// the destination having no hour index of the hours before) and the
// stored configuration hash (so that every instance writes its
// configuration again).
var migrateSkippedKinds = map[string]bool{"stripe_cursor": true, "config_sync": true}

// Migrate copies the data of from, a store on a single Redis, into to (a
// cluster's layout or a single Redis's): the key secret, the customers,
// their keys with their last use, the records, and every key of the
// customers' own slots (usage, rate state, idempotency keys, threshold
// outboxes), which keep their names (under to's key prefix) and their time
// to live.
//
// Nothing the destination has is overwritten: a customer, key or record
// that exists there is left as it is, and so is a customer-slot key (a
// RESTORE without REPLACE). So a second run copies nothing, and a run
// after a partial one completes it. Leases, instances, the seed marker
// and the indexes the destination rebuilds itself (threshold outboxes,
// hours, key expiry) are not copied. Run it before the gateways switch to
// the destination: usage counted on the source after the run stays there
// (run it again after the switch to copy what the destination lacks; a
// customer-slot key the destination already has is not merged).
// A destination whose key secret differs from the source's is refused:
// its key hashes would not match.
func Migrate(ctx context.Context, from, to *Store, logf func(format string, args ...any)) (Migrated, error) {
	var m Migrated
	if from.cluster != nil {
		return m, errors.New("redisstore: migrate: the source must be a single Redis")
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	// The key secret.
	secret, err := from.client.Get(ctx, from.secretKey()).Bytes()
	switch {
	case errors.Is(err, redis.Nil):
		logf("the source has no key secret (keys are hashed with a configured key_secret)")
	case err != nil:
		return m, fmt.Errorf("reading the source's key secret: %w", err)
	default:
		got, err := to.KeySecret(ctx, secret)
		if err != nil {
			return m, fmt.Errorf("storing the key secret: %w", err)
		}
		if string(got) != string(secret) {
			return m, errors.New("redisstore: migrate: the destination has another key secret; its key hashes would not match the source's")
		}
		m.SecretCopied = true // or already there: the same
	}
	// Customers and keys.
	customers, err := from.ListCustomers(ctx)
	if err != nil {
		return m, fmt.Errorf("listing the source's customers: %w", err)
	}
	for _, c := range customers {
		switch _, err := to.GetCustomer(ctx, c.ID); {
		case errors.Is(err, store.ErrNotFound):
			if err := to.CreateCustomer(ctx, c); err != nil {
				return m, fmt.Errorf("copying customer %q: %w", c.ID, err)
			}
			m.Customers++
		case err != nil:
			return m, fmt.Errorf("reading customer %q: %w", c.ID, err)
		}
		keys, err := from.ListKeys(ctx, c.ID)
		if err != nil {
			return m, fmt.Errorf("listing the keys of %q: %w", c.ID, err)
		}
		uses := make(map[string]time.Time)
		for _, k := range keys {
			if _, err := to.KeyByHash(ctx, k.Hash); errors.Is(err, store.ErrNotFound) {
				if _, err := to.PutKey(ctx, k); err != nil {
					return m, fmt.Errorf("copying key %s: %w", k.ID, err)
				}
				m.Keys++
			} else if err != nil {
				return m, fmt.Errorf("reading key %s: %w", k.ID, err)
			}
			if !k.LastUsedAt.IsZero() {
				uses[k.ID] = k.LastUsedAt
			}
		}
		if err := to.TouchKeys(ctx, uses); err != nil { // keeps the later of both
			return m, fmt.Errorf("copying the last uses of %q's keys: %w", c.ID, err)
		}
	}
	// Records, by kind.
	kinds, err := from.scanKeys(ctx, from.prefix+"recidx:*")
	if err != nil {
		return m, fmt.Errorf("listing the source's record kinds: %w", err)
	}
	for _, idx := range kinds {
		kind := strings.TrimPrefix(idx, from.prefix+"recidx:")
		if migrateSkippedKinds[kind] {
			continue
		}
		recs, err := from.ListRecords(ctx, kind, "")
		if err != nil {
			return m, fmt.Errorf("listing the source's %s records: %w", kind, err)
		}
		for _, r := range recs {
			stored, err := to.PutRecord(ctx, r, true)
			if err != nil {
				return m, fmt.Errorf("copying record %s %s: %w", kind, r.ID, err)
			}
			if stored {
				m.Records++
			}
		}
	}
	// The customers' own slots: same names in both layouts.
	slotKeys, err := from.scanKeys(ctx, from.prefix+"{*")
	if err != nil {
		return m, fmt.Errorf("listing the source's customer keys: %w", err)
	}
	for _, k := range slotKeys {
		n, err := copyKey(ctx, from, to, k)
		if err != nil {
			return m, fmt.Errorf("copying %s: %w", k, err)
		}
		m.CustomerKeys += n
	}
	logf("copied %d customers, %d keys, %d records and %d customer-slot keys", m.Customers, m.Keys, m.Records, m.CustomerKeys)
	return m, nil
}

// copyKey copies key k from from to to with DUMP and RESTORE, under to's
// prefix instead of from's, keeping its time to live, unless to has it.
// It returns 1 when it copied it.
func copyKey(ctx context.Context, from, to *Store, k string) (int, error) {
	var dump *redis.StringCmd
	var ttl *redis.DurationCmd
	if _, err := from.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		dump = p.Dump(ctx, k)
		ttl = p.PTTL(ctx, k)
		return nil
	}); err != nil && !errors.Is(err, redis.Nil) {
		return 0, err
	}
	data, err := dump.Result()
	if errors.Is(err, redis.Nil) {
		return 0, nil // expired meanwhile
	}
	if err != nil {
		return 0, err
	}
	d := ttl.Val()
	switch {
	case d == -2*time.Nanosecond || d == -2*time.Millisecond:
		return 0, nil // expired meanwhile
	case d < 0:
		d = 0 // no expiry
	}
	err = to.client.Restore(ctx, to.prefix+strings.TrimPrefix(k, from.prefix), d, data).Err()
	if err != nil && strings.HasPrefix(err.Error(), "BUSYKEY") {
		return 0, nil // the destination has it: left as it is
	}
	if err != nil {
		return 0, err
	}
	return 1, nil
}

// scanKeys returns the keys matching pattern on a single Redis.
func (s *Store) scanKeys(ctx context.Context, pattern string) ([]string, error) {
	var out []string
	iter := s.client.Scan(ctx, 0, globEscape(pattern), 1000).Iterator()
	for iter.Next(ctx) {
		out = append(out, iter.Val())
	}
	return out, iter.Err()
}

// globEscape escapes the glob characters of a pattern's prefix: every
// character before the pattern's final '*'.
func globEscape(pattern string) string {
	head, tail := pattern, ""
	if i := strings.LastIndex(pattern, "*"); i >= 0 {
		head, tail = pattern[:i], pattern[i:]
	}
	var b strings.Builder
	for _, r := range head {
		if strings.ContainsRune(`*?[]\`, r) {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String() + tail
}
