package module

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// recordKindAudit is the store record kind of the key audit trail; ids are
// "<Unix nanoseconds, 19 digits>-<8 hex digits>", so they sort by time.
const recordKindAudit = "audit"

// auditRetention is how long audit entries are kept.
const auditRetention = 400 * 24 * time.Hour

// Who changed a key.
const (
	actorAdminAPI = "admin_api"
	actorPortal   = "portal"
	actorConfig   = "config"
	// actorStripe is the Stripe webhook handler.
	actorStripe = "stripe_webhook"
)

// Audited actions.
const (
	auditKeyCreated = "key.created"
	auditKeyRolled  = "key.rolled"
	auditKeyUpdated = "key.updated"
	auditKeyRevoked = "key.revoked"
	// auditDuplicateSubscription: a checkout completed for a customer
	// that already pays through another Stripe customer; its subscription
	// was canceled (Detail names both).
	auditDuplicateSubscription = "stripe.duplicate_subscription_canceled"
	// auditOwnerTransferred: a portal owner made another member the
	// owner (Detail names both addresses).
	auditOwnerTransferred = "team.owner_transferred"
	// auditCheckoutCanceled: a portal member canceled the customer's open
	// Stripe Checkout Session (Detail names the member and the session).
	auditCheckoutCanceled = "stripe.checkout_canceled"
)

// auditEntry records one change to a key (or, for the stripe.* and team.*
// actions, to a customer's billing or team): who made it, when, and what
// the key is like after it. It never holds the key or its hash.
type auditEntry struct {
	// ID orders entries by time; it is the pagination cursor.
	ID string `json:"id"`
	// At is when the change was made.
	At time.Time `json:"at"`
	// Actor is admin_api, portal, config (keys declared in, or removed
	// from, the configuration) or stripe_webhook.
	Actor string `json:"actor"`
	// RemoteAddr is the address the admin or portal request came from.
	RemoteAddr string `json:"remote_addr,omitempty"`
	// Action is key.created, key.rolled, key.updated, key.revoked,
	// stripe.duplicate_subscription_canceled, stripe.checkout_canceled or
	// team.owner_transferred.
	Action string `json:"action"`
	// KeyID is the key created, changed or revoked; for key.rolled, the
	// new key. Empty for the stripe.* and team.* actions.
	KeyID string `json:"key_id,omitempty"`
	// Customer owns the key.
	Customer string `json:"customer"`
	// Replaces is the key a roll replaced.
	Replaces string `json:"replaces,omitempty"`
	// ReplacedExpiresAt is when the replaced key stops working.
	ReplacedExpiresAt time.Time `json:"replaced_expires_at,omitzero"`
	// Name is the key's name after the change.
	Name string `json:"name,omitempty"`
	// ExpiresAt is the key's expiry after the change (zero: none).
	ExpiresAt time.Time `json:"expires_at,omitzero"`
	// Detail describes a stripe.* or team.* change in words.
	Detail string `json:"detail,omitempty"`
}

// audit records e, stamped now. A failure is logged, not returned: the
// change it records is already made.
func (a *App) audit(ctx context.Context, rec store.Records, e auditEntry) {
	e.At = time.Now().UTC()
	e.ID = fmt.Sprintf("%019d-%s", e.At.UnixNano(), hex.EncodeToString(newSecret()[:4]))
	data, _ := json.Marshal(e) // plain fields: cannot fail
	if _, err := rec.PutRecord(ctx, store.Record{Kind: recordKindAudit, ID: e.ID, Data: data, Expires: e.At.Add(auditRetention)}, false); err != nil {
		a.logger.Error("could not record a key change in the audit trail", zap.String("action", e.Action), zap.String("key_id", e.KeyID), zap.Error(err))
	}
}

// auditPage is a page of the audit trail.
type auditPage struct {
	Entries []auditEntry `json:"entries"`
	// Next is the cursor of the next page (the after parameter); empty on
	// the last page.
	Next string `json:"next,omitempty"`
}

// listAudit serves GET /api_monetize/audit: the key audit trail, oldest
// first, limit entries (default 100, at most 1000) after the cursor
// after; customer=<id> and key_id=<id> filter it.
func (a *adminAPI) listAudit(w http.ResponseWriter, r *http.Request) error {
	q := r.URL.Query()
	limit := 100
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 1000 {
			return apiError(http.StatusBadRequest, "limit: expected a whole number from 1 to 1000, got "+strconv.Quote(v))
		}
		limit = n
	}
	after, customer, keyID := q.Get("after"), q.Get("customer"), q.Get("key_id")
	st, err := a.app.store()
	if err != nil {
		return err
	}
	recs, err := st.ListRecords(r.Context(), recordKindAudit, "")
	if err != nil {
		return err
	}
	page := auditPage{Entries: []auditEntry{}}
	for _, rec := range recs {
		if rec.ID <= after {
			continue
		}
		var e auditEntry
		if err := json.Unmarshal(rec.Data, &e); err != nil {
			return fmt.Errorf("audit entry %s: %w", rec.ID, err)
		}
		if (customer != "" && e.Customer != customer) || (keyID != "" && e.KeyID != keyID && e.Replaces != keyID) {
			continue
		}
		if len(page.Entries) == limit {
			page.Next = page.Entries[limit-1].ID
			break
		}
		page.Entries = append(page.Entries, e)
	}
	writeJSON(w, http.StatusOK, page)
	return nil
}
