package notifier

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// keyExpiryNotices are the windows before a key's expiry in which it is
// announced, shortest first, with their names in ids and payloads.
var keyExpiryNotices = []struct {
	before time.Duration
	name   string
}{{24 * time.Hour, "1d"}, {7 * 24 * time.Hour, "7d"}}

// keyExpiryScan is the notifier's state for key expiry announcements.
type keyExpiryScan struct {
	last time.Time
	// done are the event ids whose notifications exist, as of the last
	// scan.
	done map[string]bool
	// full is when the last scan of every customer's keys was.
	full time.Time
}

// announceExpiringKeys writes, at most every KeyScanInterval, one
// notification per channel for each active key whose expiry is within a
// notice window: only the shortest window it is in, so that a key
// created a day before its expiry is announced once, not twice. The event
// id holds the key id, its expiry and the window; PutRecord with
// onlyIfAbsent makes each exactly once across instances and reloads, and
// a changed expiry is announced anew.
func (n *Notifier) announceExpiringKeys(ctx context.Context, st Store) error {
	now := n.now()
	if now.Sub(n.keyScan.last) < n.KeyScanInterval && !n.keyScan.last.After(now) {
		return nil
	}
	seen := make(map[string]bool)
	var err error
	idx, indexed := st.(store.KeyExpiryIndex)
	switch {
	case indexed && !n.keyScan.full.IsZero() && now.Sub(n.keyScan.full) < FullKeyScanEvery:
		err = n.announceIndexed(ctx, st, idx, now, seen)
	case indexed:
		// A full scan also primes the index: its first call indexes the
		// keys stored before the store kept it, in this scan rather than
		// in a later one that should read only what is about to expire.
		if _, err = idx.KeysExpiring(ctx, now, now); err == nil {
			err = n.announceAll(ctx, st, seen)
		}
	default:
		err = n.announceAll(ctx, st, seen)
	}
	if err == nil && (!indexed || n.keyScan.full.IsZero() || now.Sub(n.keyScan.full) >= FullKeyScanEvery) {
		n.keyScan.full = now
	}
	if err != nil {
		return err
	}
	n.keyScan.last, n.keyScan.done = now, seen
	return nil
}

// FullKeyScanEvery is how often the key expiry announcements read every
// customer's keys although the store has a key expiry index: the first
// scan of a notifier does, and then one a day, for keys the index missed.
const FullKeyScanEvery = 24 * time.Hour

// announceAll announces the expiring keys of every customer.
func (n *Notifier) announceAll(ctx context.Context, st Store, seen map[string]bool) error {
	customers, err := st.ListCustomers(ctx)
	if err != nil {
		return err
	}
	for _, c := range customers {
		keys, err := st.ListKeys(ctx, c.ID)
		if err != nil {
			return err
		}
		// Each key is judged by the clock after it was listed, never by one
		// read before: a key created during the scan is not announced for a
		// window it was never in.
		now := n.now()
		for _, k := range keys {
			if err := n.announceKey(ctx, st, c, k, now, seen); err != nil {
				return err
			}
		}
	}
	return nil
}

// announceIndexed announces the keys the store's index says expire
// within the longest notice window: its work does not grow with the
// customers and keys that are not about to expire.
func (n *Notifier) announceIndexed(ctx context.Context, st Store, idx store.KeyExpiryIndex, now time.Time, seen map[string]bool) error {
	longest := keyExpiryNotices[len(keyExpiryNotices)-1].before
	hashes, err := idx.KeysExpiring(ctx, now, now.Add(longest))
	if err != nil {
		return err
	}
	customers := make(map[string]store.Customer)
	for _, h := range hashes {
		k, err := idx.KeyByHash(ctx, h)
		if errors.Is(err, store.ErrNotFound) {
			continue
		}
		if err != nil {
			return err
		}
		c, ok := customers[k.CustomerID]
		if !ok {
			if c, err = st.GetCustomer(ctx, k.CustomerID); err != nil && !errors.Is(err, store.ErrNotFound) {
				return err
			}
			c.ID = k.CustomerID
			customers[k.CustomerID] = c
		}
		// Judged by the clock after the key was read, as in announceAll.
		if err := n.announceKey(ctx, st, c, k, n.now(), seen); err != nil {
			return err
		}
	}
	return nil
}

// announceKey writes the notifications of key k of customer c when it is
// active and within a notice window at now: only the shortest window it
// is in, and only when the last scan did not.
func (n *Notifier) announceKey(ctx context.Context, st Store, c store.Customer, k store.Key, now time.Time, seen map[string]bool) error {
	if !k.Active() || k.ExpiresAt.IsZero() || k.Expired(now) {
		return nil
	}
	for _, notice := range keyExpiryNotices {
		if now.Before(k.ExpiresAt.Add(-notice.before)) {
			continue
		}
		id := fmt.Sprintf("%s|%s|%s|%d|%s", c.ID, notify.KeyExpiringType, k.ID, k.ExpiresAt.Unix(), notice.name)
		seen[id] = true
		if !n.keyScan.done[id] {
			at := time.Now().UTC()
			payload := notify.NewKeyExpiringPayload(c.ID, k.ID, k.Name, k.Prefix, k.ExpiresAt, notice.name, at).Marshal()
			if err := n.write(ctx, st, c, store.ThresholdEvent{ID: id, Subject: c.ID, At: at}, notify.KeyExpiringType, payload); err != nil {
				return fmt.Errorf("key %s: %w", k.ID, err)
			}
		}
		return nil // only the shortest window the key is in
	}
	return nil
}
