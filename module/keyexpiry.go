package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// expiredKey answers a request with an expired key: 401 with its own
// problem type and the instant it expired. Only a caller holding a real
// key ever gets it; unknown and revoked keys get invalidKey.
func expiredKey(w http.ResponseWriter, r *http.Request, at time.Time) {
	getMetrics().requests.WithLabelValues("none", decisionUnauthorized).Inc()
	w.Header().Set("WWW-Authenticate", authenticateExpiredHeader)
	writeProblem(w, r, problem{
		Type: problemExpiredKey, Title: "API key expired", Status: http.StatusUnauthorized,
		Detail: "The API key expired at " + at.UTC().Format(time.RFC3339Nano) + "; use the key that replaced it, or ask for a new one.",
	}, 0)
}

// keyExpiryNotices are the windows before a key's expiry in which it is
// announced, shortest first, with their names in ids and payloads.
var keyExpiryNotices = []struct {
	before time.Duration
	name   string
}{{24 * time.Hour, "1d"}, {7 * 24 * time.Hour, "7d"}}

// keyExpiryScanInterval is how often the notifier looks for keys about to
// expire (a scan reads every customer's keys). Tests shorten it, so it is
// atomic.
var keyExpiryScanInterval atomic.Int64

func init() { keyExpiryScanInterval.Store(int64(time.Minute)) }

// keyExpiryScan is the notifier's state for key expiry announcements.
type keyExpiryScan struct {
	last time.Time
	// done are the event ids whose notifications exist, as of the last
	// scan.
	done map[string]bool
}

// announceExpiringKeys writes, at most every keyExpiryScanInterval, one
// notification per channel for each active key whose expiry is within a
// notice window: only the shortest window it is in, so that a key
// created a day before its expiry is announced once, not twice. The event
// id holds the key id, its expiry and the window; PutRecord with
// onlyIfAbsent makes each exactly once across instances and reloads, and
// a changed expiry is announced anew.
func (n *notifier) announceExpiringKeys(ctx context.Context, st store.Store) error {
	now := clockNow()
	if now.Sub(n.keyScan.last) < time.Duration(keyExpiryScanInterval.Load()) && !n.keyScan.last.After(now) {
		return nil
	}
	customers, err := st.ListCustomers(ctx)
	if err != nil {
		return err
	}
	seen := make(map[string]bool)
	for _, c := range customers {
		keys, err := st.ListKeys(ctx, c.ID)
		if err != nil {
			return err
		}
		// Each key is judged by the clock after it was listed, never by one
		// read before: a key created during the scan is not announced for a
		// window it was never in.
		now := clockNow()
		for _, k := range keys {
			if !k.Active() || k.ExpiresAt.IsZero() || k.Expired(now) {
				continue
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
				break // only the shortest window the key is in
			}
		}
	}
	n.keyScan.last, n.keyScan.done = now, seen
	return nil
}

// sendKeyExpiringEmail sends a key expiry announcement by email.
func (n *notifier) sendKeyExpiringEmail(ctx context.Context, nt notification) error {
	var p notify.KeyExpiringPayload
	if err := json.Unmarshal(nt.Payload, &p); err != nil {
		return err
	}
	return n.email.Send(ctx, nt.Target, nt.ID, notify.RenderKeyExpiringEmail(p))
}
