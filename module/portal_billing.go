package module

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/stripe/stripe-go/v86"

	"github.com/apimonetize/caddy-api-monetize/portal"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// portalBilling opens Stripe Checkout and Billing Portal sessions for the
// portal. The tier changes only when Stripe's signed webhook says so
// (checkout.session.completed links the Stripe customer; the
// subscription's prices name the tier).
type portalBilling struct {
	app    *App
	client *stripe.Client
}

// checkoutCustomerKey is the Checkout Session metadata key naming the
// customer a portal checkout is for: the webhook links a completed
// checkout only when it equals client_reference_id, which Payment Links
// let anyone set.
const checkoutCustomerKey = "api_monetize_customer"

// checkoutParams is a subscription-mode Checkout Session for customer
// with the given line items, expiring portal.CheckoutLifetime after the
// attempt began, sent with the attempt's idempotency key: a retry or a
// concurrent request of the same attempt gets the same session from
// Stripe (the parameters are the same, as Stripe requires). The Stripe
// customer is created by Checkout (with email prefilled) and linked to
// customer by client_reference_id when the session completes; a customer
// linked already (its subscription ended) subscribes again as the same
// Stripe customer, stripeCustomer.
func checkoutParams(customer, stripeCustomer, email string, items []*stripe.CheckoutSessionCreateLineItemParams, returnURL string, attempt portal.CheckoutAttempt) *stripe.CheckoutSessionCreateParams {
	p := &stripe.CheckoutSessionCreateParams{
		Mode:              stripe.String(string(stripe.CheckoutSessionModeSubscription)),
		ClientReferenceID: stripe.String(customer),
		LineItems:         items,
		SuccessURL:        stripe.String(returnURL + "?checkout=done"),
		CancelURL:         stripe.String(returnURL),
		ExpiresAt:         stripe.Int64(attempt.Created.Add(portal.CheckoutLifetime).Unix()),
		Metadata:          map[string]string{checkoutCustomerKey: customer},
	}
	p.SetIdempotencyKey(attempt.Key)
	switch {
	case stripeCustomer != "":
		p.Customer = stripe.String(stripeCustomer)
	case email != "":
		p.CustomerEmail = stripe.String(email)
	}
	return p
}

// Checkout opens a Checkout Session for tier with the prices stripe-sync
// created: the flat base price (quantity 1) and, when the tier bills
// overage, the metered usage price (no quantity).
func (b portalBilling) Checkout(ctx context.Context, customerID, tier, returnURL string, attempt portal.CheckoutAttempt) (string, string, error) {
	c, err := portalBackend{app: b.app}.Customer(ctx, customerID)
	if err != nil {
		return "", "", err
	}
	if c.StripeCustomerID != "" {
		live, err := liveSubscription(ctx, b.client, c.StripeCustomerID, "")
		if err != nil {
			return "", "", providerErr(err)
		}
		if live {
			return "", "", portal.InputError("You already pay through Stripe: change your plan with Manage billing.")
		}
	}
	t := b.app.tierByName[tier]
	if t == nil || !purchasable(t) {
		return "", "", portal.InputError("This plan cannot be bought here.")
	}
	if t.Name == c.Tier {
		return "", "", portal.InputError("You are already on this plan.")
	}
	baseKey, usageKey := stripereport.BaseLookupKey(tier), stripereport.UsageLookupKey(tier)
	prices := map[string]*stripe.Price{}
	list := b.client.V1Prices.List(ctx, &stripe.PriceListParams{LookupKeys: []*string{&baseKey, &usageKey}, Active: stripe.Bool(true)})
	for p, err := range list.All(ctx) {
		if err != nil {
			return "", "", fmt.Errorf("listing the Stripe prices of tier %q: %w", tier, providerErr(err))
		}
		prices[p.LookupKey] = p
	}
	base := prices[baseKey]
	if base == nil {
		return "", "", fmt.Errorf("tier %q has no active Stripe price with lookup key %s: run `caddy api-monetize stripe-sync`", tier, baseKey)
	}
	items := []*stripe.CheckoutSessionCreateLineItemParams{{Price: stripe.String(base.ID), Quantity: stripe.Int64(1)}}
	if u := prices[usageKey]; u != nil {
		items = append(items, &stripe.CheckoutSessionCreateLineItemParams{Price: stripe.String(u.ID)})
	}
	s, err := b.client.V1CheckoutSessions.Create(ctx, checkoutParams(c.ID, c.StripeCustomerID, c.Email, items, returnURL, attempt))
	if err != nil {
		return "", "", fmt.Errorf("creating a Stripe Checkout Session: %w", providerErr(err))
	}
	return s.ID, s.URL, nil
}

// ManageBilling opens a Billing Portal session for the customer's Stripe
// customer.
func (b portalBilling) ManageBilling(ctx context.Context, customerID, returnURL string) (string, error) {
	c, err := portalBackend{app: b.app}.Customer(ctx, customerID)
	if err != nil {
		return "", err
	}
	if c.StripeCustomerID == "" {
		return "", portal.InputError("There is no billing account yet: choose a paid plan first.")
	}
	s, err := b.client.V1BillingPortalSessions.Create(ctx, &stripe.BillingPortalSessionCreateParams{
		Customer: stripe.String(c.StripeCustomerID), ReturnURL: stripe.String(returnURL),
	})
	if err != nil {
		return "", fmt.Errorf("creating a Stripe Billing Portal session: %w", providerErr(err))
	}
	return s.URL, nil
}

// Subscribed reports whether the customer's Stripe customer has a live
// subscription.
func (b portalBilling) Subscribed(ctx context.Context, customerID string) (bool, error) {
	c, err := portalBackend{app: b.app}.Customer(ctx, customerID)
	if err != nil || c.StripeCustomerID == "" {
		return false, err
	}
	live, err := liveSubscription(ctx, b.client, c.StripeCustomerID, "")
	return live, providerErr(err)
}

// CancelCheckout expires an open Checkout Session of the customer. When
// Stripe refuses (only an open session can be expired), the session is
// read back: an expired one is fine, a completed one is
// portal.ErrCheckoutCompleted.
func (b portalBilling) CancelCheckout(ctx context.Context, customerID, id string) error {
	_, err := b.client.V1CheckoutSessions.Expire(ctx, id, &stripe.CheckoutSessionExpireParams{})
	var se *stripe.Error
	if err == nil || !errors.As(err, &se) || se.HTTPStatusCode != http.StatusBadRequest {
		if err != nil {
			return fmt.Errorf("expiring Stripe Checkout Session %s: %w", id, providerErr(err))
		}
		return nil
	}
	s, gerr := b.client.V1CheckoutSessions.Retrieve(ctx, id, nil)
	if gerr != nil {
		return fmt.Errorf("expiring Stripe Checkout Session %s: %w (reading it back: %w)", id, err, providerErr(gerr))
	}
	if s.ClientReferenceID != customerID {
		return fmt.Errorf("Stripe Checkout Session %s is not customer %s's", id, customerID)
	}
	switch s.Status {
	case stripe.CheckoutSessionStatusExpired:
		return nil
	case stripe.CheckoutSessionStatusComplete:
		return portal.ErrCheckoutCompleted
	}
	return fmt.Errorf("expiring Stripe Checkout Session %s (status %q): %w", id, s.Status, err)
}

// providerErr wraps Stripe's 409 (another request with the same
// idempotency key is in progress) as portal.ErrBillingBusy, and Stripe not
// answering (a network error, a timeout, 429 or a 5xx) as
// portal.ErrBillingUnavailable.
func providerErr(err error) error {
	if err == nil {
		return nil
	}
	var se *stripe.Error
	switch {
	case !errors.As(err, &se) || se.HTTPStatusCode == 0:
		return fmt.Errorf("%w: %w", portal.ErrBillingUnavailable, err)
	case se.HTTPStatusCode == http.StatusConflict:
		return fmt.Errorf("%w: %w", portal.ErrBillingBusy, err)
	case se.HTTPStatusCode == http.StatusTooManyRequests || se.HTTPStatusCode >= 500:
		return fmt.Errorf("%w: %w", portal.ErrBillingUnavailable, err)
	}
	return err
}

// liveSubscription reports whether a Stripe customer has a subscription,
// other than except, that is not canceled or expired.
func liveSubscription(ctx context.Context, client *stripe.Client, stripeID, except string) (bool, error) {
	for sub, err := range client.V1Subscriptions.List(ctx, &stripe.SubscriptionListParams{Customer: stripe.String(stripeID)}).All(ctx) {
		if err != nil {
			return false, fmt.Errorf("listing the subscriptions of %s: %w", stripeID, err)
		}
		if sub.ID != except && sub.Status != stripe.SubscriptionStatusCanceled && sub.Status != stripe.SubscriptionStatusIncompleteExpired {
			return true, nil
		}
	}
	return false, nil
}

// purchasable reports whether a tier has a fixed, non-zero price.
func purchasable(t *tierRuntime) bool {
	return t.Price != nil && !t.Price.Custom && t.Price.AmountMicros > 0
}

var _ portal.Billing = portalBilling{}
