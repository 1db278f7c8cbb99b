package module

import (
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// startCheckoutPortal starts the portal with Stripe on a store (a fresh
// embedded one when storeLine is empty), the pro prices in the double,
// and a member of a new customer signed in; it returns the browser and
// the plans page's CSRF token.
func startCheckoutPortal(t *testing.T, double *stripedouble.Double, storeLine string) (*browser, string) {
	t.Helper()
	double.SetPrice("price_pro_base", stripereport.BaseLookupKey("pro"), "licensed")
	double.SetPrice("price_pro_usage", stripereport.UsageLookupKey("pro"), "metered")
	if storeLine == "" {
		storeLine = "store_path " + t.TempDir() + "/store.db"
	}
	smtp := startPortalStripe(t, storeLine, "open", portalStripeBlock(double.URL))
	b := newBrowser(t)
	b.signIn(smtp, "dev@example.com", 1)
	return b, csrf(t, b.do("/plans", nil))
}

// choosePro posts "Choose pro" and returns the Checkout Session id it was
// sent to.
func choosePro(t *testing.T, b *browser, double *stripedouble.Double, token string) string {
	t.Helper()
	res := b.do("/plans/pro/checkout", url.Values{"csrf": {token}})
	loc := res.header.Get("Location")
	if res.status != http.StatusSeeOther || !strings.HasPrefix(loc, double.URL+"/pay/") {
		t.Fatalf("Choose pro: %d Location %q %s", res.status, loc, res.body)
	}
	return strings.TrimPrefix(loc, double.URL+"/pay/")
}

// completeCheckout sends Stripe's signed checkout.session.completed.
func completeCheckout(t *testing.T, event, session, customer, stripeCustomer, subscription string) {
	t.Helper()
	obj := fmt.Sprintf(`{"id":%q,"object":"checkout.session","mode":"subscription","client_reference_id":%q,"metadata":{"api_monetize_customer":%q},"customer":%q,"subscription":%q}`,
		session, customer, customer, stripeCustomer, subscription)
	if r := sendStripeEvent(t, "whsec_test_secret", event, "checkout.session.completed", obj); r.status != http.StatusOK {
		t.Fatalf("completion %s: %d %s", event, r.status, r.body)
	}
}

// TestPortalResubscribeAfterSubscriptionEnded: a customer whose
// subscription was canceled (its Stripe customer has no live subscription
// left) is offered the plans again, and Choose opens a Checkout Session
// for the same Stripe customer (the customer parameter, no second Stripe
// customer, no Billing Portal). Its completion keeps the link and moves
// the tier; from then Choose opens the Billing Portal again. A further
// subscription of the same Stripe customer completing later (a second
// checkout) is the duplicate and is canceled, the older one kept, even
// when the completions are delivered again. With Stripe unreachable, the
// plans page still answers (Manage billing only) and Choose and Manage
// billing answer 502.
func TestPortalResubscribeAfterSubscriptionEnded(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	b, token := startCheckoutPortal(t, double, "")
	first := choosePro(t, b, double, token)
	customer := double.CheckoutSessions()[0]["client_reference_id"]
	double.SetSubscription("sub_1", "cus_X", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	completeCheckout(t, "evt_done_1", first, customer, "cus_X", "sub_1")
	key := b.createKey("ci")
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusOK {
		t.Fatalf("after the first checkout: %d", res.status)
	}

	// The subscription is canceled (Billing Portal, dunning): back to free.
	double.SetSubscription("sub_1", "cus_X", "canceled", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	if r := sendStripeEvent(t, "whsec_test_secret", "evt_deleted_1", "customer.subscription.deleted", `{"id":"sub_1","object":"subscription"}`); r.status != http.StatusOK {
		t.Fatalf("deletion event: %d %s", r.status, r.body)
	}
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusForbidden {
		t.Fatalf("after the cancellation: %d", res.status)
	}
	plans := b.do("/plans", nil)
	if !strings.Contains(plans.body, `id="upgrade-pro"`) || !strings.Contains(plans.body, `id="manage-billing"`) || !strings.Contains(plans.body, "Your subscription has ended") {
		t.Fatalf("plans page of a customer whose subscription ended: %s", plans.body)
	}
	portals := len(double.PortalSessions())
	second := choosePro(t, b, double, token)
	sessions := double.CheckoutSessions()
	if len(sessions) != 2 || len(double.PortalSessions()) != portals {
		t.Fatalf("Choose after the subscription ended: %d checkouts, %d portal sessions", len(sessions), len(double.PortalSessions()))
	}
	cs := sessions[1]
	if cs["customer"] != "cus_X" || cs["client_reference_id"] != customer || cs["line_items[0][price]"] != "price_pro_base" {
		t.Fatalf("the new Checkout Session is not for the existing Stripe customer: %v", cs)
	}
	if _, ok := cs["customer_email"]; ok {
		t.Errorf("customer_email sent with customer (Stripe would make or prefill another customer): %v", cs)
	}
	if !strings.Contains(b.do("/plans", nil).body, `id="pending"`) {
		t.Fatal("the new checkout is not shown as pending")
	}
	// Still one open checkout per customer.
	if again := choosePro(t, b, double, token); again != second || len(double.CheckoutSessions()) != 2 {
		t.Fatalf("a second click opened %s (open %s), %d checkouts", again, second, len(double.CheckoutSessions()))
	}

	double.SetSubscription("sub_2", "cus_X", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	completeCheckout(t, "evt_done_2", second, customer, "cus_X", "sub_2")
	if res := call(t, "/v1/pro-only", key); res.status != http.StatusOK || !strings.HasSuffix(res.body, "tier=pro") {
		t.Fatalf("after subscribing again: %d %s", res.status, res.body)
	}
	if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); !strings.Contains(c.body, `"stripe_customer_id":"cus_X"`) || !strings.Contains(c.body, `"tier":"pro"`) {
		t.Fatalf("customer after subscribing again: %s", c.body)
	}
	if len(double.Canceled()) != 0 {
		t.Fatalf("canceled %v", double.Canceled())
	}
	plans = b.do("/plans", nil)
	if strings.Contains(plans.body, `id="pending"`) || strings.Contains(plans.body, `id="upgrade-`) || strings.Contains(plans.body, "Your subscription has ended") {
		t.Fatalf("plans page after subscribing again: %s", plans.body)
	}
	if res := b.do("/plans/pro/checkout", url.Values{"csrf": {token}}); res.status != http.StatusSeeOther || len(double.CheckoutSessions()) != 2 || len(double.PortalSessions()) != portals+1 ||
		double.PortalSessions()[portals]["customer"] != "cus_X" {
		t.Fatalf("Choose with a live subscription: %d, %d checkouts, portal %v", res.status, len(double.CheckoutSessions()), double.PortalSessions())
	}

	// A later subscription of the same Stripe customer is the duplicate,
	// in whichever order the completions arrive.
	double.SetSubscription("sub_3", "cus_X", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	completeCheckout(t, "evt_done_3", "cs_other", customer, "cus_X", "sub_3")
	completeCheckout(t, "evt_done_2_again", second, customer, "cus_X", "sub_2")
	if got := double.Canceled(); len(got) != 1 || got[0] != "sub_3" {
		t.Fatalf("canceled %v, want [sub_3]", got)
	}
	audit := admin(t, http.MethodGet, "/api_monetize/audit?customer="+customer, "")
	if !strings.Contains(audit.body, `"action":"stripe.duplicate_subscription_canceled"`) || !strings.Contains(audit.body, "sub_3") {
		t.Fatalf("audit trail: %s", audit.body)
	}
	if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); !strings.Contains(c.body, `"stripe_customer_id":"cus_X"`) || !strings.Contains(c.body, `"tier":"pro"`) {
		t.Fatalf("customer after the duplicate: %s", c.body)
	}

	// Stripe unreachable: the plans page still answers, with Manage
	// billing only; Choose and Manage billing say the payment provider
	// is not answering (502), and nothing is opened.
	double.Close()
	plans = b.do("/plans", nil)
	if plans.status != http.StatusOK || strings.Contains(plans.body, `id="upgrade-`) || !strings.Contains(plans.body, `id="manage-billing"`) {
		t.Fatalf("plans page with Stripe unreachable: %d %s", plans.status, plans.body)
	}
	for _, path := range []string{"/plans/pro/checkout", "/billing"} {
		res := b.do(path, url.Values{"csrf": {token}})
		if res.status != http.StatusBadGateway || !strings.Contains(res.body, "payment provider is not answering") || len(double.CheckoutSessions()) != 2 {
			t.Fatalf("%s with Stripe unreachable: %d %s", path, res.status, res.body)
		}
	}
	if strings.Contains(b.do("/plans", nil).body, `id="pending"`) {
		t.Fatal("a checkout that could not be opened is pending")
	}
}

var cancelFormPattern = regexp.MustCompile(`name="checkout" value="([^"]+)"`)

// TestPortalCancelCheckout: the plans page of a customer with an open
// checkout offers "Cancel this checkout"; it expires the Checkout Session
// at Stripe and frees the claim, so a plan can be chosen again at once
// (a new Checkout Session). It needs the CSRF token, and a page showing
// an older checkout cancels nothing. A checkout paid before the cancel
// reaches Stripe cannot be expired: it stays pending (409 with the
// reason), choosing again still goes to it, and its completion moves the
// tier. A checkout that expired at Stripe meanwhile frees the claim. On
// the embedded store and Redis.
func TestPortalCancelCheckout(t *testing.T) {
	portalStores(t, testPortalCancelCheckout)
}

func testPortalCancelCheckout(t *testing.T, storeLine string) {
	double := stripedouble.New()
	defer double.Close()
	b, token := startCheckoutPortal(t, double, storeLine)
	// A plan that cannot be bought is refused before it holds the
	// customer's one open checkout.
	if res := b.do("/plans/nosuch/checkout", url.Values{"csrf": {token}}); res.status != http.StatusBadRequest || len(double.CheckoutSessions()) != 0 {
		t.Fatalf("Choose of an unknown plan: %d, %d checkouts", res.status, len(double.CheckoutSessions()))
	}
	first := choosePro(t, b, double, token)
	customer := double.CheckoutSessions()[0]["client_reference_id"]
	plans := b.do("/plans", nil)
	m := cancelFormPattern.FindStringSubmatch(plans.body)
	if m == nil || m[1] != first || !strings.Contains(plans.body, `id="cancel-checkout"`) {
		t.Fatalf("the plans page offers no cancel for %s: %s", first, plans.body)
	}
	cancel := func(t *testing.T, form url.Values) response {
		t.Helper()
		return b.do("/plans/checkout/cancel", form)
	}
	if res := cancel(t, url.Values{"checkout": {first}}); res.status != http.StatusForbidden || len(double.ExpiredCheckouts()) != 0 {
		t.Fatalf("cancel without CSRF: %d, expired %v", res.status, double.ExpiredCheckouts())
	}
	if res := cancel(t, url.Values{"csrf": {"forged"}, "checkout": {first}}); res.status != http.StatusForbidden || len(double.ExpiredCheckouts()) != 0 {
		t.Fatalf("cancel with a wrong CSRF token: %d", res.status)
	}
	cross := b.tab()
	cross.origin = "https://evil.example"
	if res := cross.do("/plans/checkout/cancel", url.Values{"csrf": {token}, "checkout": {first}}); res.status != http.StatusForbidden || len(double.ExpiredCheckouts()) != 0 {
		t.Fatalf("cross-origin cancel: %d", res.status)
	}
	if res := cancel(t, url.Values{"csrf": {token}, "checkout": {"cs_older"}}); res.status != http.StatusSeeOther || len(double.ExpiredCheckouts()) != 0 {
		t.Fatalf("cancel of another checkout: %d, expired %v", res.status, double.ExpiredCheckouts())
	}
	res := cancel(t, url.Values{"csrf": {token}, "checkout": {first}})
	if res.status != http.StatusSeeOther || !strings.HasSuffix(res.header.Get("Location"), "/plans") {
		t.Fatalf("cancel: %d %q %s", res.status, res.header.Get("Location"), res.body)
	}
	if got := double.ExpiredCheckouts(); len(got) != 1 || got[0] != first {
		t.Fatalf("expired at Stripe: %v", got)
	}
	if audit := admin(t, http.MethodGet, "/api_monetize/audit?customer="+customer, ""); !strings.Contains(audit.body, `"action":"stripe.checkout_canceled"`) || !strings.Contains(audit.body, first) {
		t.Fatalf("the canceled checkout is not in the audit trail: %s", audit.body)
	}
	if strings.Contains(b.do("/plans", nil).body, `id="pending"`) {
		t.Fatal("a canceled checkout is still pending")
	}
	second := choosePro(t, b, double, token)
	if second == first || len(double.CheckoutSessions()) != 2 {
		t.Fatalf("Choose after the cancel: %s (first %s), %d checkouts", second, first, len(double.CheckoutSessions()))
	}

	// Paid at Stripe a moment before the cancel: it cannot be expired.
	double.CompleteCheckout(second)
	res = cancel(t, url.Values{"csrf": {token}, "checkout": {second}})
	if res.status != http.StatusConflict || !strings.Contains(res.body, "already paid") || !strings.Contains(res.body, `id="pending"`) {
		t.Fatalf("cancel of a paid checkout: %d %s", res.status, res.body)
	}
	if again := choosePro(t, b, double, token); again != second || len(double.CheckoutSessions()) != 2 || len(double.ExpiredCheckouts()) != 1 {
		t.Fatalf("Choose after a refused cancel: %s (paid %s), %d checkouts", again, second, len(double.CheckoutSessions()))
	}
	double.SetSubscription("sub_P", "cus_P", "active", stripereport.BaseLookupKey("pro"), stripereport.UsageLookupKey("pro"))
	completeCheckout(t, "evt_done_P", second, customer, "cus_P", "sub_P")
	if c := admin(t, http.MethodGet, "/api_monetize/customers/"+customer, ""); !strings.Contains(c.body, `"tier":"pro"`) || !strings.Contains(c.body, `"stripe_customer_id":"cus_P"`) {
		t.Fatalf("customer after the paid checkout: %s", c.body)
	}

	// Expired at Stripe meanwhile (its event not delivered yet): the
	// cancel frees the claim.
	double.SetSubscription("sub_P", "cus_P", "canceled", stripereport.BaseLookupKey("pro"))
	if r := sendStripeEvent(t, "whsec_test_secret", "evt_deleted_P", "customer.subscription.deleted", `{"id":"sub_P","object":"subscription"}`); r.status != http.StatusOK {
		t.Fatalf("deletion event: %d", r.status)
	}
	third := choosePro(t, b, double, token)
	req, _ := http.NewRequest(http.MethodPost, double.URL+"/v1/checkout/sessions/"+third+"/expire", nil)
	req.Header.Set("Authorization", "Bearer sk_test_123")
	if r, err := http.DefaultClient.Do(req); err != nil || r.StatusCode != http.StatusOK {
		t.Fatalf("expiring at Stripe: %v %v", err, r)
	} else {
		r.Body.Close()
	}
	if res := cancel(t, url.Values{"csrf": {token}, "checkout": {third}}); res.status != http.StatusSeeOther {
		t.Fatalf("cancel of an expired checkout: %d %s", res.status, res.body)
	}
	if fourth := choosePro(t, b, double, token); fourth == third || len(double.CheckoutSessions()) != 4 {
		t.Fatalf("Choose after canceling an expired checkout: %s, %d checkouts", fourth, len(double.CheckoutSessions()))
	}
}

// TestPortalCheckoutBusyIsRetryable: two requests of one checkout attempt
// reaching Stripe at the same moment (same idempotency key) get Stripe's
// 409 for the second; the portal answers it with 503, Retry-After: 1 and
// "being prepared" instead of a 500, keeps the claim, and the retry lands
// on the one Checkout Session. A cancel while the checkout is being
// opened gets the same retryable answer.
func TestPortalCheckoutBusyIsRetryable(t *testing.T) {
	double := stripedouble.New()
	defer double.Close()
	b, token := startCheckoutPortal(t, double, "")
	held, release := double.HoldNextCheckout()
	defer release()
	done := make(chan response, 1)
	tab := b.tab()
	go func() { done <- tab.do("/plans/pro/checkout", url.Values{"csrf": {token}}) }()
	<-held
	res := b.do("/plans/pro/checkout", url.Values{"csrf": {token}})
	if res.status != http.StatusServiceUnavailable || res.header.Get("Retry-After") != "1" || !strings.Contains(res.body, "being prepared") {
		t.Fatalf("a click racing the first to Stripe: %d Retry-After %q %s", res.status, res.header.Get("Retry-After"), res.body)
	}
	if res := b.do("/plans/checkout/cancel", url.Values{"csrf": {token}}); res.status != http.StatusServiceUnavailable || res.header.Get("Retry-After") != "1" {
		t.Fatalf("a cancel while the checkout is being opened: %d %s", res.status, res.body)
	}
	release()
	first := <-done
	if first.status != http.StatusSeeOther || !strings.HasPrefix(first.header.Get("Location"), double.URL+"/pay/") {
		t.Fatalf("the first click: %d %s", first.status, first.body)
	}
	if retry := choosePro(t, b, double, token); double.URL+"/pay/"+retry != first.header.Get("Location") || len(double.CheckoutSessions()) != 1 {
		t.Fatalf("the retry: %s, first %s, %d checkouts", retry, first.header.Get("Location"), len(double.CheckoutSessions()))
	}
}
