package portal

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// recordKindPending holds, per customer, the plan a checkout was
	// opened for, until it completes (the tier changes) or expires.
	recordKindPending = "portal_pending"
)

// pending is the one checkout attempt a customer may have open: it is
// claimed (written only if absent) before the payment provider is asked,
// so concurrent attempts, from any instance, find it and reuse it.
type pending struct {
	Tier string `json:"tier"`
	// Attempt is the random id of the attempt; the provider's idempotency
	// key is derived from it.
	Attempt string `json:"attempt"`
	// Session and URL are the checkout's id and address at the payment
	// provider, empty while it is being opened.
	Session string    `json:"session,omitempty"`
	URL     string    `json:"url,omitempty"`
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

// CheckoutLifetime is how long an opened checkout stays open: the Billing
// implementation makes checkouts expire CheckoutLifetime after their
// attempt began, and the portal shows it as pending as long.
const CheckoutLifetime = time.Hour

// openCheckout returns the customer's pending checkout, nil when none.
func (h *Handler) openCheckout(ctx context.Context, customer string) (*pending, error) {
	recs, err := h.be.Records(ctx)
	if err != nil {
		return nil, err
	}
	rec, err := recs.GetRecord(ctx, recordKindPending, customer)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var p pending
	if json.Unmarshal(rec.Data, &p) != nil || p.Tier == "" {
		return nil, nil
	}
	return &p, nil
}

// attemptKey is the idempotency key of a checkout attempt.
func attemptKey(customer, attempt string) string {
	return "am_checkout_" + hashToken(customer + "\x00" + attempt)[:48]
}

// checkout opens a checkout for a plan and sends the browser there. A
// customer has at most one open checkout: choosing the same plan again
// (another window, a teammate, a double click) goes to the open one;
// choosing another plan meanwhile is refused until it completes, expires
// or is canceled (cancelCheckout). A customer who already pays (has a
// live subscription) goes to the billing portal, where plan changes keep
// the one subscription; a customer whose subscription ended gets a
// checkout for the billing account it has.
func (h *Handler) checkout(w http.ResponseWriter, r *http.Request, s *session) {
	tier := r.PathValue("tier")
	ctx := r.Context()
	c, err := h.be.Customer(ctx, s.Customer)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if c.StripeCustomerID != "" {
		live, err := h.cfg.Billing.Subscribed(ctx, s.Customer)
		if err != nil {
			h.failErr(w, r, s, err)
			return
		}
		if live {
			h.manageBilling(w, r, s)
			return
		}
	}
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	now := h.now().UTC()
	p := pending{Tier: tier, Attempt: randomToken(), Created: now}
	data, _ := json.Marshal(p)
	mine, err := recs.PutRecord(ctx, store.Record{Kind: recordKindPending, ID: s.Customer, Data: data, Expires: now.Add(CheckoutLifetime)}, true)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if !mine {
		open, err := h.openCheckout(ctx, s.Customer)
		if err != nil {
			h.failErr(w, r, s, err)
			return
		}
		if open == nil {
			// It completed or expired a moment ago.
			h.fail(w, r, s, http.StatusConflict, "Your plan is changing. Please reload the plans page.")
			return
		}
		if open.Tier != tier {
			h.fail(w, r, s, http.StatusConflict, "A checkout for the "+open.Tier+" plan is already open. Finish it, or cancel it on the plans page (it expires by itself at "+
				open.Created.Add(CheckoutLifetime).Format("15:04 MST")+") and choose again.")
			return
		}
		if open.URL != "" {
			http.Redirect(w, r, open.URL, http.StatusSeeOther)
			return
		}
		// Being opened by another request at this moment: the same attempt
		// gets the same checkout from the provider.
		p = *open
	}
	id, u, err := h.cfg.Billing.Checkout(ctx, s.Customer, tier, h.base.String()+"/plans", CheckoutAttempt{Key: attemptKey(s.Customer, p.Attempt), Created: p.Created})
	if err != nil {
		if mine && !errors.Is(err, ErrBillingBusy) {
			// Free the claim for a new attempt, unless a concurrent request
			// of the same attempt opened the checkout meanwhile (or is
			// opening it: the provider said the attempt is in progress).
			if open, _ := h.openCheckout(ctx, s.Customer); open != nil && open.Attempt == p.Attempt && open.URL == "" {
				_ = recs.DeleteRecord(ctx, recordKindPending, s.Customer)
			}
		}
		h.failErr(w, r, s, err)
		return
	}
	p.Session, p.URL = id, u
	data, _ = json.Marshal(p)
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindPending, ID: s.Customer, Data: data, Expires: p.Created.Add(CheckoutLifetime)}, false); err != nil {
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

// cancelCheckout expires the customer's open checkout at the payment
// provider and frees the claim, so another plan can be chosen at once.
// The form names the checkout it cancels: a page older than the open
// checkout cancels nothing. A checkout paid before it could be expired
// stays pending (the payment provider's confirmation moves the tier).
func (h *Handler) cancelCheckout(w http.ResponseWriter, r *http.Request, s *session) {
	ctx := r.Context()
	open, err := h.openCheckout(ctx, s.Customer)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if open == nil || (open.Session != "" && !tokensEqual(r.PostFormValue("checkout"), open.Session)) {
		// Completed, expired or canceled already, or not the one shown.
		http.Redirect(w, r, h.link("/plans"), http.StatusSeeOther)
		return
	}
	if open.Session == "" {
		w.Header().Set("Retry-After", "1")
		h.fail(w, r, s, http.StatusServiceUnavailable, "Your checkout is being prepared. Please try again in a moment.")
		return
	}
	err = h.cfg.Billing.CancelCheckout(ctx, s.Customer, open.Session)
	if errors.Is(err, ErrCheckoutCompleted) {
		h.showPlans(w, r, s, http.StatusConflict, "This checkout was already paid, so it cannot be canceled: your plan changes as soon as the payment is confirmed.")
		return
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	recs, err := h.be.Records(ctx)
	if err == nil {
		err = ClearPendingCheckout(ctx, recs, s.Customer, open.Session)
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	h.log.Info("checkout canceled by a member", zap.String("customer", s.Customer), zap.String("checkout", open.Session))
	h.be.CheckoutCanceled(ctx, s.Customer, open.Session, s.Email, h.cfg.ClientIP(r))
	http.Redirect(w, r, h.link("/plans"), http.StatusSeeOther)
}
