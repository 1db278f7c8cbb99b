package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/stripe/stripe-go/v86"
	"github.com/stripe/stripe-go/v86/webhook"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/portal"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

func init() {
	caddy.RegisterModule(new(StripeWebhook))
	httpcaddyfile.RegisterHandlerDirective("api_monetize_stripe_webhook", parseStripeWebhook)
	httpcaddyfile.RegisterDirectiveOrder("api_monetize_stripe_webhook", httpcaddyfile.Before, "basic_auth")
}

// Record kinds of the webhook handler.
const (
	// recordKindStripeEvent remembers handled Stripe event ids (replays
	// are ignored).
	recordKindStripeEvent = "stripe_event"
	// recordKindPastDue holds a customer's failed payment, id = customer.
	recordKindPastDue = "stripe_past_due"
	// recordKindCheckoutLink holds, per customer, the Stripe customer the
	// first completed portal checkout linked (written only if absent, so
	// one of two racing completions wins).
	recordKindCheckoutLink = "stripe_checkout_link"
	// stripeEventTTL outlives Stripe's delivery retries (3 days).
	stripeEventTTL = 30 * 24 * time.Hour
)

// pastDue is the state of a customer whose invoice payment failed.
type pastDue struct {
	// Since is when the first failure arrived.
	Since time.Time `json:"since"`
	// Tier is the customer's tier then, restored when the invoice is paid.
	Tier string `json:"tier"`
	// Downgraded is set once past_due_grace ran out and the customer was
	// moved to downgrade_to.
	Downgraded bool `json:"downgraded,omitempty"`
}

// StripeWebhook receives Stripe's subscription and invoice events and
// changes customers' tiers. Mount it beside the API, outside key
// authentication: `handle /stripe/webhook { api_monetize_stripe_webhook }`.
type StripeWebhook struct {
	app    *App
	s      stripeSettings
	client *stripe.Client
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*StripeWebhook) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_monetize_stripe_webhook",
		New: func() caddy.Module { return new(StripeWebhook) },
	}
}

func parseStripeWebhook(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	h.Next()
	if h.NextArg() || h.NextBlock(h.Nesting()) {
		return nil, h.Err("api_monetize_stripe_webhook takes no arguments or block; configure it in the stripe block of the api_monetize global option")
	}
	return new(StripeWebhook), nil
}

// Provision finds the api_monetize app and its Stripe settings.
func (w *StripeWebhook) Provision(ctx caddy.Context) error {
	w.logger = ctx.Logger()
	app, err := ctx.AppIfConfigured("api_monetize")
	if err != nil {
		return fmt.Errorf("api_monetize_stripe_webhook needs the api_monetize global option: %w", err)
	}
	w.app = app.(*App)
	if w.app.Stripe == nil {
		return errors.New("api_monetize_stripe_webhook needs a stripe block in the api_monetize global option")
	}
	if w.s, err = w.app.stripeSettings(); err != nil {
		return err
	}
	if w.s.webhookSecret == "" {
		return errors.New("api_monetize_stripe_webhook needs webhook_secret in the stripe block")
	}
	if w.s.downgradeTo == "" {
		return errors.New("api_monetize_stripe_webhook needs downgrade_to in the stripe block")
	}
	w.client = stripereport.NewClient(w.s.secretKey, w.s.apiBase, stripeRequestTimeout)
	return nil
}

// ServeHTTP verifies and applies one Stripe event. A bad signature gets
// 400; an event that could not be applied gets 500, so Stripe delivers it
// again; anything else (including unknown event types and replays) 200.
func (w *StripeWebhook) ServeHTTP(rw http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodPost {
		rw.Header().Set("Allow", http.MethodPost)
		rw.WriteHeader(http.StatusMethodNotAllowed)
		return nil
	}
	payload, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, 1<<20))
	if err != nil {
		writeAdminError(rw, http.StatusBadRequest, "unreadable body")
		return nil
	}
	// The subscription is re-fetched through this SDK's API version, so
	// an endpoint on another version is fine.
	ev, err := webhook.ConstructEventWithOptions(payload, r.Header.Get("Stripe-Signature"), w.s.webhookSecret,
		webhook.ConstructEventOptions{IgnoreAPIVersionMismatch: true})
	if err != nil || !signedRecently(r.Header.Get("Stripe-Signature"), time.Now(), webhook.DefaultTolerance) {
		writeAdminError(rw, http.StatusBadRequest, "invalid Stripe-Signature")
		return nil
	}
	st, err := w.app.store()
	if err != nil {
		writeAdminError(rw, http.StatusServiceUnavailable, "store unavailable")
		return nil
	}
	ctx := r.Context()
	if _, err := st.GetRecord(ctx, recordKindStripeEvent, ev.ID); err == nil {
		writeJSON(rw, http.StatusOK, map[string]string{"status": "replay ignored"})
		return nil
	}
	if err := w.apply(ctx, st, ev); err != nil {
		w.logger.Error("applying a Stripe event", zap.String("event", ev.ID), zap.String("type", string(ev.Type)), zap.Error(err))
		writeAdminError(rw, http.StatusInternalServerError, "could not apply the event; Stripe will retry")
		return nil
	}
	if _, err := st.PutRecord(ctx, store.Record{Kind: recordKindStripeEvent, ID: ev.ID, Data: []byte(`{}`), Expires: time.Now().Add(stripeEventTTL)}, true); err != nil {
		w.logger.Warn("could not remember a Stripe event id", zap.String("event", ev.ID), zap.Error(err))
	}
	writeJSON(rw, http.StatusOK, map[string]string{"status": "ok"})
	return nil
}

// apply applies one verified event.
func (w *StripeWebhook) apply(ctx context.Context, st store.Store, ev stripe.Event) error {
	var obj struct {
		ID                string `json:"id"`
		Customer          string `json:"customer"`
		Subscription      string `json:"subscription"`
		ClientReferenceID string `json:"client_reference_id"`
		Mode              string `json:"mode"`
		// Metadata carries checkoutCustomerKey on sessions the portal
		// opened (see checkoutParams).
		Metadata map[string]string `json:"metadata"`
	}
	if ev.Data == nil || json.Unmarshal(ev.Data.Raw, &obj) != nil {
		return nil
	}
	switch ev.Type {
	case "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted":
		return w.syncSubscription(ctx, st, obj.ID)
	case "invoice.payment_failed":
		return w.paymentFailed(ctx, st, obj.Customer)
	case "invoice.paid":
		return w.paid(ctx, st, obj.Customer)
	case "checkout.session.completed":
		if obj.Mode != string(stripe.CheckoutSessionModeSubscription) {
			return nil
		}
		if obj.ClientReferenceID == "" || obj.Metadata[checkoutCustomerKey] != obj.ClientReferenceID {
			// Not a checkout the portal opened: a Payment Link or a pricing
			// table lets anyone set client_reference_id in its URL, so it
			// names no customer to link.
			w.logger.Warn("checkout completed that the portal did not open; not linked to any customer",
				zap.String("checkout", obj.ID), zap.String("client_reference_id", obj.ClientReferenceID))
			return nil
		}
		if err := w.checkoutCompleted(ctx, st, obj.ClientReferenceID, obj.Customer, obj.Subscription); err != nil {
			return err
		}
		return portal.ClearPendingCheckout(ctx, st, obj.ClientReferenceID, obj.ID)
	case "checkout.session.expired":
		// The portal stops showing the plan change as pending.
		return portal.ClearPendingCheckout(ctx, st, obj.ClientReferenceID, obj.ID)
	}
	return nil
}

// checkoutCompleted links the Stripe customer a portal checkout created
// to the api_monetize customer named by client_reference_id, then applies
// the subscription (whose own events may have arrived before the link).
//
// A customer pays through one subscription. When the checkout completes
// for a customer already linked to another Stripe customer that has a
// live subscription (two checkouts were open at once, and this is the
// second to complete), the customer is not relinked: the new
// subscription is canceled at once, so it bills nothing more, and the
// audit trail records it (its first payment is for the operator to
// refund). A customer whose linked Stripe customer has no live
// subscription left (it canceled) is relinked to the new one. A checkout
// the portal opened for the linked Stripe customer itself (its
// subscription had ended) keeps the link; its subscription is canceled
// only if that Stripe customer has an older live one. Two
// completions racing (on any instances) are ordered by a link record
// written only if absent: the first links, the second is the duplicate.
func (w *StripeWebhook) checkoutCompleted(ctx context.Context, st store.Store, customer, stripeID, subscription string) error {
	if customer == "" || stripeID == "" {
		return nil
	}
	c, err := st.GetCustomer(ctx, customer)
	if errors.Is(err, store.ErrNotFound) {
		w.logger.Warn("checkout completed for an unknown customer", zap.String("client_reference_id", customer))
		return nil
	}
	if err != nil {
		return err
	}
	linked := c.StripeCustomerID
	if linked == "" {
		won, err := st.PutRecord(ctx, store.Record{Kind: recordKindCheckoutLink, ID: c.ID, Data: []byte(stripeID)}, true)
		if err != nil {
			return err
		}
		if !won {
			rec, err := st.GetRecord(ctx, recordKindCheckoutLink, c.ID)
			if err != nil {
				return err
			}
			linked = string(rec.Data)
		}
	}
	if linked != "" && linked != stripeID {
		live, err := w.hasLiveSubscription(ctx, linked)
		if err != nil {
			return err
		}
		if live {
			return w.cancelDuplicate(ctx, st, c, linked, stripeID, subscription)
		}
		w.logger.Info("checkout completed for a customer whose Stripe customer has no live subscription; relinking",
			zap.String("customer", c.ID), zap.String("from", linked), zap.String("stripe_customer", stripeID))
		if _, err := st.PutRecord(ctx, store.Record{Kind: recordKindCheckoutLink, ID: c.ID, Data: []byte(stripeID)}, false); err != nil {
			return err
		}
	}
	if c.StripeCustomerID == stripeID && subscription != "" {
		// A checkout for the Stripe customer linked already (its
		// subscription had ended): the link stays. Should it have another
		// live subscription by now, the customer keeps the older one.
		older, err := w.olderLiveSubscription(ctx, stripeID, subscription)
		if err != nil {
			return err
		}
		if older != "" {
			return w.cancelDuplicate(ctx, st, c, stripeID, stripeID, subscription)
		}
	}
	if c.StripeCustomerID != stripeID {
		// UpsertConfigCustomer with the stored customer changes only its
		// contact fields: here the Stripe id.
		next := c
		next.StripeCustomerID = stripeID
		if _, err := st.UpsertConfigCustomer(ctx, next); err != nil {
			return err
		}
		w.app.shared.registry.invalidate()
		w.logger.Info("Stripe customer linked by checkout", zap.String("customer", c.ID), zap.String("stripe_customer", stripeID))
	}
	if subscription == "" {
		return nil
	}
	return w.syncSubscription(ctx, st, subscription)
}

// hasLiveSubscription reports whether a Stripe customer has a
// subscription that is not canceled or expired.
func (w *StripeWebhook) hasLiveSubscription(ctx context.Context, stripeID string) (bool, error) {
	return liveSubscription(ctx, w.client, stripeID, "")
}

// olderLiveSubscription returns a live subscription of the Stripe
// customer created before subscription (by creation time, then id), or
// "". Two completions racing see the same subscriptions, so they agree on
// which one is the duplicate.
func (w *StripeWebhook) olderLiveSubscription(ctx context.Context, stripeID, subscription string) (string, error) {
	var live []*stripe.Subscription
	var self *stripe.Subscription
	for sub, err := range w.client.V1Subscriptions.List(ctx, &stripe.SubscriptionListParams{Customer: stripe.String(stripeID)}).All(ctx) {
		if err != nil {
			return "", fmt.Errorf("listing the subscriptions of %s: %w", stripeID, err)
		}
		if sub.Status == stripe.SubscriptionStatusCanceled || sub.Status == stripe.SubscriptionStatusIncompleteExpired {
			continue
		}
		if sub.ID == subscription {
			self = sub
			continue
		}
		live = append(live, sub)
	}
	if self == nil {
		return "", nil // canceled already, or not this customer's
	}
	for _, sub := range live {
		if sub.Created < self.Created || (sub.Created == self.Created && sub.ID < self.ID) {
			return sub.ID, nil
		}
	}
	return "", nil
}

// cancelDuplicate cancels the subscription of a second completed checkout
// and records it in the audit trail.
func (w *StripeWebhook) cancelDuplicate(ctx context.Context, st store.Store, c store.Customer, kept, stripeID, subscription string) error {
	if subscription != "" {
		_, err := w.client.V1Subscriptions.Cancel(ctx, subscription, &stripe.SubscriptionCancelParams{})
		var se *stripe.Error
		if errors.As(err, &se) && se.HTTPStatusCode == http.StatusNotFound {
			err = nil // already gone
		}
		if err != nil {
			return fmt.Errorf("canceling duplicate subscription %s: %w", subscription, err)
		}
	}
	w.logger.Warn("checkout completed for a customer that already pays; its subscription was canceled",
		zap.String("customer", c.ID), zap.String("kept_stripe_customer", kept),
		zap.String("stripe_customer", stripeID), zap.String("subscription", subscription))
	w.app.audit(ctx, st, auditEntry{Actor: actorStripe, Action: auditDuplicateSubscription, Customer: c.ID,
		Detail: fmt.Sprintf("subscription %s of Stripe customer %s canceled: the customer pays through %s; refund its first invoice in Stripe if it was paid", subscription, stripeID, kept)})
	return nil
}

// customerByStripeID finds the customer with a Stripe id.
func customerByStripeID(ctx context.Context, st store.Store, stripeID string) (store.Customer, bool, error) {
	cs, err := st.ListCustomers(ctx)
	if err != nil {
		return store.Customer{}, false, err
	}
	for _, c := range cs {
		if stripeID != "" && c.StripeCustomerID == stripeID {
			return c, true, nil
		}
	}
	return store.Customer{}, false, nil
}

// syncSubscription re-fetches a subscription (so out-of-order deliveries
// apply the current state) and sets its customer's tier: the tier of its
// prices' lookup keys while active or trialing, downgrade_to once it is
// canceled, unpaid, expired or paused. A past_due subscription keeps its
// tier (invoice.payment_failed starts the grace).
func (w *StripeWebhook) syncSubscription(ctx context.Context, st store.Store, id string) error {
	sub, err := w.client.V1Subscriptions.Retrieve(ctx, id, nil)
	if err != nil {
		return fmt.Errorf("fetching subscription %s: %w", id, err)
	}
	if sub.Customer == nil {
		return nil
	}
	c, ok, err := customerByStripeID(ctx, st, sub.Customer.ID)
	if err != nil || !ok {
		if !ok && err == nil {
			w.logger.Warn("subscription of a Stripe customer no api_monetize customer has", zap.String("stripe_customer", sub.Customer.ID))
		}
		return err
	}
	tier := ""
	switch sub.Status {
	case stripe.SubscriptionStatusActive, stripe.SubscriptionStatusTrialing:
		tier = w.tierOf(sub)
		if tier == "" {
			w.logger.Warn("subscription has no price whose lookup key names a tier", zap.String("subscription", id))
			return nil
		}
	case stripe.SubscriptionStatusCanceled, stripe.SubscriptionStatusUnpaid,
		stripe.SubscriptionStatusIncompleteExpired, stripe.SubscriptionStatusPaused:
		tier = w.s.downgradeTo
	default:
		return nil
	}
	return w.app.setTierFromStripe(ctx, st, c, tier)
}

// tierOf maps a subscription's prices to a tier by lookup key (see
// stripereport.TierOfLookupKey).
func (w *StripeWebhook) tierOf(sub *stripe.Subscription) string {
	if sub.Items == nil {
		return ""
	}
	for _, it := range sub.Items.Data {
		if it.Price == nil {
			continue
		}
		key := stripereport.TierOfLookupKey(it.Price.LookupKey)
		if _, ok := w.app.tierByName[key]; ok {
			return key
		}
		// A meter's price, am_<tier>_<meter>_usage: the only price of a
		// tier that bills nothing but that meter.
		for _, m := range w.app.meters {
			if tier, ok := strings.CutSuffix(key, "_"+m.name); ok {
				if _, ok := w.app.tierByName[tier]; ok {
					return tier
				}
			}
		}
	}
	return ""
}

// paymentFailed starts a customer's past-due grace (once).
func (w *StripeWebhook) paymentFailed(ctx context.Context, st store.Store, stripeID string) error {
	c, ok, err := customerByStripeID(ctx, st, stripeID)
	if err != nil || !ok {
		return err
	}
	data, _ := json.Marshal(pastDue{Since: time.Now().UTC(), Tier: c.Tier})
	_, err = st.PutRecord(ctx, store.Record{Kind: recordKindPastDue, ID: c.ID, Data: data}, true)
	return err
}

// paid ends a customer's past-due state and restores the tier it had.
func (w *StripeWebhook) paid(ctx context.Context, st store.Store, stripeID string) error {
	c, ok, err := customerByStripeID(ctx, st, stripeID)
	if err != nil || !ok {
		return err
	}
	rec, err := st.GetRecord(ctx, recordKindPastDue, c.ID)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var pd pastDue
	if json.Unmarshal(rec.Data, &pd) == nil && pd.Downgraded && pd.Tier != "" {
		if err := w.app.setTierFromStripe(ctx, st, c, pd.Tier); err != nil {
			return err
		}
	}
	return st.DeleteRecord(ctx, recordKindPastDue, c.ID)
}

// applyPastDue moves customers whose past_due_grace ran out to
// downgrade_to. Any instance may run it: it is idempotent.
func (a *App) applyPastDue(ctx context.Context, st store.Store, s stripeSettings) {
	if s.downgradeTo == "" {
		return
	}
	recs, err := st.ListRecords(ctx, recordKindPastDue, "")
	if err != nil {
		return
	}
	now := time.Now()
	for _, rec := range recs {
		var pd pastDue
		if json.Unmarshal(rec.Data, &pd) != nil || pd.Downgraded || now.Sub(pd.Since) < s.pastDueGrace {
			continue
		}
		c, err := st.GetCustomer(ctx, rec.ID)
		if err != nil {
			continue
		}
		if err := a.setTierFromStripe(ctx, st, c, s.downgradeTo); err != nil {
			a.logger.Error("downgrading a past-due customer", zap.String("customer", c.ID), zap.Error(err))
			continue
		}
		pd.Downgraded = true
		data, _ := json.Marshal(pd)
		_, _ = st.PutRecord(ctx, store.Record{Kind: recordKindPastDue, ID: rec.ID, Data: data}, false)
		a.logger.Info("past-due grace ran out; customer downgraded", zap.String("customer", c.ID), zap.String("tier", s.downgradeTo))
	}
}

// setTierFromStripe sets a customer's tier and makes the change visible to
// the next request (other instances learn through the store's change
// notifications).
func (a *App) setTierFromStripe(ctx context.Context, st store.Store, c store.Customer, tier string) error {
	if c.Tier == tier {
		return nil
	}
	if _, err := st.SetTier(ctx, c.ID, tier); err != nil {
		return err
	}
	a.invalidateKeys()
	a.logger.Info("tier changed by Stripe", zap.String("customer", c.ID), zap.String("from", c.Tier), zap.String("to", tier))
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*StripeWebhook)(nil)
	_ caddyhttp.MiddlewareHandler = (*StripeWebhook)(nil)
)

// signedRecently reports whether every timestamp (t=) of a Stripe-Signature
// header is within tolerance of now, in either direction. The Stripe
// library refuses signatures older than the tolerance only; one dated far
// ahead would stay replayable until that date.
func signedRecently(header string, now time.Time, tolerance time.Duration) bool {
	seen := false
	for part := range strings.SplitSeq(header, ",") {
		v, ok := strings.CutPrefix(part, "t=")
		if !ok {
			continue
		}
		sec, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return false
		}
		if d := time.Unix(sec, 0).Sub(now); d > tolerance || d < -tolerance {
			return false
		}
		seen = true
	}
	return seen
}
