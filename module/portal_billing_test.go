package module

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v86"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/portal"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// portalStripeBlock is a stripe block talking to apiBase.
func portalStripeBlock(apiBase string) string {
	return fmt.Sprintf(`stripe {
			secret_key sk_test_123
			webhook_secret whsec_test_secret
			downgrade_to free
			api_base %s
		}`, apiBase)
}

// TestPortalUpgradeThroughCheckout: a member on the free plan chooses pro;
// the portal opens a subscription-mode Checkout Session with the prices
// stripe-sync made (base quantity 1, metered usage without quantity) and
// the customer as client_reference_id, and shows the change as pending;
// Stripe's signed checkout.session.completed links the Stripe customer
// and moves the tier, and the pro plan's endpoints and rate limit apply to
// the member's key at once. Then "Manage billing" opens the Billing
// Portal and Checkout is refused (no second subscription).
func TestPortalUpgradeThroughCheckout(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	double.SetPrice("price_pro_base", stripereport.BaseLookupKey("pro"), "licensed")
	double.SetPrice("price_pro_usage", stripereport.UsageLookupKey("pro"), "metered")
	smtp := startPortalStripe(t, "store_path "+t.TempDir()+"/store.db", "open", portalStripeBlock(double.URL))

	b := newBrowser(t)
	b.signIn(smtp, "dev@example.com", 1)
	key := b.createKey("ci")
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusForbidden {
		t.Fatalf("a free key on a pro endpoint: %d", res.status)
	}
	plans := b.do("/plans", nil)
	if !strings.Contains(plans.body, `id="upgrade-pro"`) || strings.Contains(plans.body, `id="upgrade-free"`) || strings.Contains(plans.body, "manage-billing") {
		t.Fatalf("plans page offers: %s", plans.body)
	}
	if csp := plans.header.Get("Content-Security-Policy"); !strings.Contains(csp, "form-action 'self' https://checkout.stripe.com https://billing.stripe.com") {
		t.Errorf("CSP does not allow the Stripe redirects: %s", csp)
	}
	// Without the CSRF token nothing is opened.
	if res := b.do("/plans/pro/checkout", url.Values{}); res.status != http.StatusForbidden || len(double.CheckoutSessions()) != 0 {
		t.Fatalf("checkout without CSRF: %d, sessions %d", res.status, len(double.CheckoutSessions()))
	}
	checkout := func() string {
		t.Helper()
		res := b.do("/plans/pro/checkout", url.Values{"csrf": {csrf(t, plans)}})
		loc := res.header.Get("Location")
		if res.status != http.StatusSeeOther || !strings.HasPrefix(loc, double.URL+"/pay/") {
			t.Fatalf("checkout: %d Location %q %s", res.status, loc, res.body)
		}
		if !strings.Contains(b.do("/plans", nil).body, `id="pending"`) {
			t.Fatal("the plans page does not show the pending change")
		}
		return strings.TrimPrefix(loc, double.URL+"/pay/")
	}
	// A checkout that expires is no longer shown as pending.
	first := checkout()
	cs := double.CheckoutSessions()[0]
	customer := cs["client_reference_id"]
	expired := fmt.Sprintf(`{"id":%q,"object":"checkout.session","mode":"subscription","client_reference_id":%q}`, first, customer)
	if r := sendStripeEvent(t, "whsec_test_secret", "evt_expired", "checkout.session.expired", expired); r.status != http.StatusOK {
		t.Fatalf("expiry event: %d %s", r.status, r.body)
	}
	if strings.Contains(b.do("/plans", nil).body, `id="pending"`) {
		t.Fatal("an expired checkout is still shown as pending")
	}
	second := checkout()
	sessions := double.CheckoutSessions()
	if len(sessions) != 2 || second == first {
		t.Fatalf("%d checkout sessions, ids %s %s", len(sessions), first, second)
	}
	cs = sessions[1]
	want := map[string]string{
		"mode": "subscription", "customer_email": "dev@example.com", "metadata[api_monetize_customer]": customer,
		"line_items[0][price]": "price_pro_base", "line_items[0][quantity]": "1", "line_items[1][price]": "price_pro_usage",
		"success_url": portalBase + "/plans?checkout=done", "cancel_url": portalBase + "/plans",
	}
	for k, v := range want {
		if cs[k] != v {
			t.Errorf("checkout %s = %q, want %q", k, cs[k], v)
		}
	}
	if !strings.HasPrefix(customer, "c-") {
		t.Errorf("client_reference_id %q is not the portal customer", customer)
	}
	if _, ok := cs["line_items[1][quantity]"]; ok {
		t.Error("the metered price has a quantity")
	}
	// A forged completion (bad signature) links nothing.
	completed := fmt.Sprintf(`{"id":%q,"object":"checkout.session","mode":"subscription","client_reference_id":%q,"metadata":{"api_monetize_customer":%q},"customer":"cus_NEW","subscription":"sub_NEW"}`, second, customer, customer)
	if r := sendStripeEvent(t, "whsec_wrong", "evt_forged", "checkout.session.completed", completed); r.status != http.StatusBadRequest {
		t.Fatalf("forged event: %d", r.status)
	}
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusForbidden {
		t.Fatalf("after a forged event: %d", res.status)
	}

	// A completed checkout the portal did not open (a Payment Link or a
	// pricing table, whose client_reference_id anyone can set in the URL)
	// links nothing, however validly signed.
	double.SetSubscription("sub_EVIL", "cus_EVIL", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	foreign := fmt.Sprintf(`{"id":"cs_link","object":"checkout.session","mode":"subscription","client_reference_id":%q,"customer":"cus_EVIL","subscription":"sub_EVIL"}`, customer)
	if r := sendStripeEvent(t, "whsec_test_secret", "evt_link", "checkout.session.completed", foreign); r.status != http.StatusOK {
		t.Fatalf("foreign completion event: %d %s", r.status, r.body)
	}
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusForbidden {
		t.Fatalf("after a checkout the portal did not open: %d (the customer was linked to the attacker's Stripe customer)", res.status)
	}
	if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); strings.Contains(c.body, "cus_EVIL") {
		t.Fatalf("a checkout the portal did not open linked the customer: %s", c.body)
	}

	double.SetSubscription("sub_NEW", "cus_NEW", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	if r := sendStripeEvent(t, "whsec_test_secret", "evt_done", "checkout.session.completed", completed); r.status != http.StatusOK {
		t.Fatalf("completion event: %d %s", r.status, r.body)
	}
	res := call(t, "/v1/pro-only", key)
	if res.status != http.StatusOK || !strings.HasSuffix(res.body, "tier=pro") || !strings.Contains(res.header.Get("RateLimit-Policy"), `"pro-min";q=100`) {
		t.Fatalf("the member's key after the upgrade: %d %s %v", res.status, res.body, res.header)
	}
	plans = b.do("/plans", nil)
	if strings.Contains(plans.body, `id="pending"`) || !strings.Contains(plans.body, `<h2 id="plan-pro">pro <span class="badge">Your plan</span>`) ||
		!strings.Contains(plans.body, `id="manage-billing"`) || strings.Contains(plans.body, `id="upgrade-`) {
		t.Fatalf("plans page after the upgrade: %s", plans.body)
	}
	res = b.do("/billing", url.Values{"csrf": {csrf(t, plans)}})
	if res.status != http.StatusSeeOther || len(double.PortalSessions()) != 1 || double.PortalSessions()[0]["customer"] != "cus_NEW" ||
		double.PortalSessions()[0]["return_url"] != portalBase+"/plans" {
		t.Fatalf("manage billing: %d %v", res.status, double.PortalSessions())
	}
	// Choosing a plan again goes to the Billing Portal, not Checkout.
	if res := b.do("/plans/pro/checkout", url.Values{"csrf": {csrf(t, plans)}}); res.status != http.StatusSeeOther || len(double.CheckoutSessions()) != 2 || len(double.PortalSessions()) != 2 {
		t.Fatalf("a second checkout for a paying customer: %d, sessions %d", res.status, len(double.CheckoutSessions()))
	}
}

// TestPortalCheckoutIsValidForStripe sends the portal's Checkout Session
// and Billing Portal session requests to stripe-mock, which validates them
// against Stripe's OpenAPI description.
func TestPortalCheckoutIsValidForStripe(t *testing.T) {
	base := stripedouble.StripeMock(t)
	sc := stripereport.NewClient("sk_test_123", base, 10*time.Second)
	items := []*stripe.CheckoutSessionCreateLineItemParams{
		{Price: stripe.String("price_base"), Quantity: stripe.Int64(1)},
		{Price: stripe.String("price_usage")},
	}
	s, err := sc.V1CheckoutSessions.Create(context.Background(), checkoutParams("c-1", "", "dev@example.com", items, "https://portal.example.com/plans", portal.CheckoutAttempt{Key: "am_checkout_test", Created: time.Now()}))
	if err != nil {
		t.Fatalf("checkout session: %v", err)
	}
	if s.URL == "" || s.Mode != stripe.CheckoutSessionModeSubscription || s.ClientReferenceID != "c-1" {
		t.Fatalf("checkout session %+v", s)
	}
	// A customer whose subscription ended subscribes again as the same
	// Stripe customer.
	again := checkoutParams("c-1", "cus_1", "dev@example.com", items, "https://portal.example.com/plans", portal.CheckoutAttempt{Key: "am_checkout_test_again", Created: time.Now()})
	if again.Customer == nil || *again.Customer != "cus_1" || again.CustomerEmail != nil {
		t.Fatalf("checkout for an existing Stripe customer: customer %v, customer_email %v", again.Customer, again.CustomerEmail)
	}
	if _, err := sc.V1CheckoutSessions.Create(context.Background(), again); err != nil {
		t.Fatalf("checkout session for an existing Stripe customer: %v", err)
	}
	// Cancel this checkout: expire it, and read it back when refused.
	if _, err := sc.V1CheckoutSessions.Expire(context.Background(), "cs_test_1", &stripe.CheckoutSessionExpireParams{}); err != nil {
		t.Fatalf("checkout session expire: %v", err)
	}
	if _, err := sc.V1CheckoutSessions.Retrieve(context.Background(), "cs_test_1", nil); err != nil {
		t.Fatalf("checkout session retrieve: %v", err)
	}
	p, err := sc.V1BillingPortalSessions.Create(context.Background(), &stripe.BillingPortalSessionCreateParams{
		Customer: stripe.String("cus_1"), ReturnURL: stripe.String("https://portal.example.com/plans"),
	})
	if err != nil || p.URL == "" {
		t.Fatalf("billing portal session: %v %+v", err, p)
	}
	// The duplicate-subscription check and cancellation of the webhook.
	for _, err := range sc.V1Subscriptions.List(context.Background(), &stripe.SubscriptionListParams{Customer: stripe.String("cus_1")}).All(context.Background()) {
		if err != nil {
			t.Fatalf("subscription list: %v", err)
		}
	}
	if _, err := sc.V1Subscriptions.Cancel(context.Background(), "sub_1", &stripe.SubscriptionCancelParams{}); err != nil {
		t.Fatalf("subscription cancel: %v", err)
	}
	list := sc.V1Prices.List(context.Background(), &stripe.PriceListParams{LookupKeys: []*string{stripe.String("am_pro_base")}, Active: stripe.Bool(true)})
	for _, err := range list.All(context.Background()) {
		if err != nil {
			t.Fatalf("price list: %v", err)
		}
	}
}

// tab is another window of the same browser: it shares the cookies at
// this moment, and can request concurrently with b.
func (b *browser) tab() *browser {
	t := newBrowser(b.t)
	t.origin = b.origin
	for k, c := range b.cookies {
		t.cookies[k] = c
	}
	return t
}

// TestPortalCheckoutOncePerCustomer is the abuse case of two checkouts
// opened before either completes, which could end in two paid
// subscriptions. Concurrent "Choose pro" clicks from several windows, on
// both stores, open one Checkout Session and all go to it (its URL is
// reused; an idempotency key covers a request racing the first); the
// plans page links to it. Then two completions of checkouts opened that
// way anyway (racing webhook deliveries) link one Stripe customer and
// cancel the other's subscription, recorded in the audit trail; a
// customer that pays is sent to the Billing Portal instead of Checkout;
// and a customer whose Stripe customer has no live subscription left is
// relinked by a new checkout, canceling nothing.
func TestPortalCheckoutOncePerCustomer(t *testing.T) {
	portalStores(t, func(t *testing.T, storeLine string) {
		double := stripedouble.New()
		defer double.Close()
		double.SetPrice("price_pro_base", stripereport.BaseLookupKey("pro"), "licensed")
		double.SetPrice("price_pro_usage", stripereport.UsageLookupKey("pro"), "metered")
		smtp := startPortalStripe(t, storeLine, "open", portalStripeBlock(double.URL))
		b := newBrowser(t)
		b.signIn(smtp, "dev@example.com", 1)
		token := csrf(t, b.do("/plans", nil))

		const windows = 6
		locs := make([]string, windows)
		statuses := make([]int, windows)
		tabs := make([]*browser, windows)
		for i := range tabs {
			tabs[i] = b.tab()
		}
		var wg sync.WaitGroup
		for i := range tabs {
			wg.Go(func() {
				res := tabs[i].do("/plans/pro/checkout", url.Values{"csrf": {token}})
				statuses[i], locs[i] = res.status, res.header.Get("Location")
			})
		}
		wg.Wait()
		sessions := double.CheckoutSessions()
		if len(sessions) != 1 {
			t.Fatalf("%d concurrent clicks opened %d Checkout Sessions (statuses %v)", windows, len(sessions), statuses)
		}
		for i := range locs {
			if statuses[i] != http.StatusSeeOther || locs[i] != locs[0] || !strings.HasPrefix(locs[0], double.URL+"/pay/") {
				t.Fatalf("window %d: %d %q (first %q)", i, statuses[i], locs[i], locs[0])
			}
		}
		// A later click, and the plans page, go to the open checkout.
		if res := b.do("/plans/pro/checkout", url.Values{"csrf": {token}}); res.status != http.StatusSeeOther || res.header.Get("Location") != locs[0] || len(double.CheckoutSessions()) != 1 {
			t.Fatalf("a later click: %d %q, %d sessions", res.status, res.header.Get("Location"), len(double.CheckoutSessions()))
		}
		if plans := b.do("/plans", nil); !strings.Contains(plans.body, `id="continue-checkout"`) || !strings.Contains(plans.body, locs[0]) {
			t.Fatalf("the plans page does not link to the open checkout: %s", plans.body)
		}
		customer := sessions[0]["client_reference_id"]

		// Two completions racing (e.g. checkouts opened before this
		// guard): one links, the other's subscription is canceled.
		double.SetSubscription("sub_A", "cus_A", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
		double.SetSubscription("sub_B", "cus_B", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
		codes := make([]int, 2)
		for i, who := range []string{"A", "B"} {
			wg.Go(func() {
				obj := fmt.Sprintf(`{"id":"cs_%s","object":"checkout.session","mode":"subscription","client_reference_id":%q,"metadata":{"api_monetize_customer":%q},"customer":"cus_%s","subscription":"sub_%s"}`, who, customer, customer, who, who)
				codes[i] = sendStripeEvent(t, "whsec_test_secret", "evt_done_"+who, "checkout.session.completed", obj).status
			})
		}
		wg.Wait()
		canceled := double.Canceled()
		if codes[0] != http.StatusOK || codes[1] != http.StatusOK || len(canceled) != 1 {
			t.Fatalf("racing completions: %v, canceled %v", codes, canceled)
		}
		kept := map[string]string{"sub_A": "cus_B", "sub_B": "cus_A"}[canceled[0]]
		if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); !strings.Contains(c.body, `"stripe_customer_id":"`+kept+`"`) || !strings.Contains(c.body, `"tier":"pro"`) {
			t.Fatalf("customer after racing completions (kept %s): %s", kept, c.body)
		}
		audit := admin(t, http.MethodGet, "/api_monetize/audit?customer="+customer, "")
		if !strings.Contains(audit.body, `"action":"stripe.duplicate_subscription_canceled"`) || !strings.Contains(audit.body, canceled[0]) {
			t.Fatalf("audit trail: %s", audit.body)
		}
		// The plans page offers Manage billing, and Choose goes there too.
		plans := b.do("/plans", nil)
		if strings.Contains(plans.body, `id="upgrade-`) || !strings.Contains(plans.body, `id="manage-billing"`) {
			t.Fatalf("plans page of a paying customer: %s", plans.body)
		}
		res := b.do("/plans/pro/checkout", url.Values{"csrf": {token}})
		if res.status != http.StatusSeeOther || len(double.CheckoutSessions()) != 1 || len(double.PortalSessions()) != 1 ||
			double.PortalSessions()[0]["customer"] != kept || !strings.HasPrefix(res.header.Get("Location"), double.URL+"/pay/") {
			t.Fatalf("Choose for a paying customer: %d %q, %d checkouts, portal %v", res.status, res.header.Get("Location"), len(double.CheckoutSessions()), double.PortalSessions())
		}

		// The kept subscription ends; a later checkout relinks, and
		// nothing is canceled.
		keptSub := map[string]string{"cus_A": "sub_A", "cus_B": "sub_B"}[kept]
		double.SetSubscription(keptSub, kept, "canceled", stripereport.BaseLookupKey("pro"))
		double.SetSubscription("sub_C", "cus_C", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
		obj := fmt.Sprintf(`{"id":"cs_C","object":"checkout.session","mode":"subscription","client_reference_id":%q,"metadata":{"api_monetize_customer":%q},"customer":"cus_C","subscription":"sub_C"}`, customer, customer)
		if r := sendStripeEvent(t, "whsec_test_secret", "evt_done_C", "checkout.session.completed", obj); r.status != http.StatusOK || len(double.Canceled()) != 1 {
			t.Fatalf("completion after the subscription ended: %d %s, canceled %v", r.status, r.body, double.Canceled())
		}
		if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); !strings.Contains(c.body, `"stripe_customer_id":"cus_C"`) {
			t.Fatalf("not relinked: %s", c.body)
		}
	})
}
