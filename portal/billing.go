package portal

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// recordKindPending holds, per customer, the plan a checkout was
	// opened for, until it completes (the tier changes) or expires.
	recordKindPending = "portal_pending"
	// checkoutLifetime is how long an opened checkout is shown as pending;
	// the Billing implementation makes its sessions expire as soon.
	checkoutLifetime = time.Hour
)

// pending is a checkout opened from the plans page.
type pending struct {
	Tier string `json:"tier"`
	// Session is the checkout's id at the payment provider.
	Session string    `json:"session"`
	Created time.Time `json:"created"`
}

// ClearPendingCheckout forgets the pending checkout of a customer when it
// is the checkout session (completed or expired); a newer checkout stays
// pending.
func ClearPendingCheckout(ctx context.Context, recs store.Records, customer, session string) error {
	if customer == "" {
		return nil
	}
	rec, err := recs.GetRecord(ctx, recordKindPending, customer)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var p pending
	if json.Unmarshal(rec.Data, &p) == nil && p.Session != session {
		return nil
	}
	return recs.DeleteRecord(ctx, recordKindPending, customer)
}

// pendingTier is the plan a checkout of the customer was opened for, ""
// when none is pending.
func (h *Handler) pendingTier(r *http.Request, customer string) (string, error) {
	recs, err := h.be.Records(r.Context())
	if err != nil {
		return "", err
	}
	rec, err := recs.GetRecord(r.Context(), recordKindPending, customer)
	if errors.Is(err, store.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	var p pending
	_ = json.Unmarshal(rec.Data, &p)
	return p.Tier, nil
}

// checkout opens a checkout for a plan and sends the browser there.
func (h *Handler) checkout(w http.ResponseWriter, r *http.Request, s *session) {
	tier := r.PathValue("tier")
	id, u, err := h.cfg.Billing.Checkout(r.Context(), s.Customer, tier, h.base.String()+"/plans")
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	recs, err := h.be.Records(r.Context())
	if err == nil {
		data, _ := json.Marshal(pending{Tier: tier, Session: id, Created: time.Now().UTC()})
		_, err = recs.PutRecord(r.Context(), store.Record{Kind: recordKindPending, ID: s.Customer, Data: data, Expires: time.Now().Add(checkoutLifetime)}, false)
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	http.Redirect(w, r, u, http.StatusSeeOther)
}

// manageBilling sends the browser to the billing portal.
func (h *Handler) manageBilling(w http.ResponseWriter, r *http.Request, s *session) {
	u, err := h.cfg.Billing.ManageBilling(r.Context(), s.Customer, h.base.String()+"/plans")
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	http.Redirect(w, r, u, http.StatusSeeOther)
}
