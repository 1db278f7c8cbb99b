package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/stripe/stripe-go/v86/webhook"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/store/redisstore"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// sendStripeEvent posts a Stripe event signed with secret to the webhook.
func sendStripeEvent(t *testing.T, secret, id, typ, object string) response {
	t.Helper()
	return sendStripeEventAt(t, secret, id, typ, object, time.Now())
}

// sendStripeEventAt is sendStripeEvent with the signature dated at.
func sendStripeEventAt(t *testing.T, secret, id, typ, object string, at time.Time) response {
	t.Helper()
	payload := fmt.Sprintf(`{"id":%q,"object":"event","type":%q,"api_version":"2026-06-24.dahlia","data":{"object":%s}}`, id, typ, object)
	signed := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: []byte(payload), Secret: secret, Timestamp: at})
	h := http.Header{"Stripe-Signature": {signed.Header}, "Content-Type": {"application/json"}}
	return do(t, http.MethodPost, testBase+"/stripe/webhook", h, payload)
}

func tierSeen(t *testing.T) string {
	t.Helper()
	r := call(t, "/v1/anything", proKey)
	_, tier, _ := strings.Cut(r.body, "tier=")
	return strings.TrimSpace(tier)
}

func TestStripeWebhookChangesTiers(t *testing.T) {
	shortenStripeTimings(t)
	double := stripedouble.New()
	defer double.Close()
	prefix := redisTestPrefix(t)
	st, err := redisstore.New(redisstore.Options{URL: testRedisURL, KeyPrefix: prefix})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(stripeCaddyfile(prefix, double.URL, 0), "caddyfile")
	const secret = "whsec_test_secret"
	sub := `{"id":"sub_1","object":"subscription","customer":"cus_ACME"}`
	if got := tierSeen(t); got != "pro" {
		t.Fatalf("tier %q before any event", got)
	}

	// A subscription moved to the free tier's price: the next request sees it.
	double.SetSubscription("sub_1", "cus_ACME", "active", stripereport.BaseLookupKey("free"))
	if r := sendStripeEvent(t, secret, "evt_1", "customer.subscription.updated", sub); r.status != http.StatusOK {
		t.Fatalf("event: %d %s", r.status, r.body)
	}
	if got := tierSeen(t); got != "free" {
		t.Fatalf("tier %q after the update, want free", got)
	}

	// A bad signature is refused and changes nothing.
	double.SetSubscription("sub_1", "cus_ACME", "active", stripereport.BaseLookupKey("pro"))
	if r := sendStripeEvent(t, "whsec_wrong", "evt_2", "customer.subscription.updated", sub); r.status != http.StatusBadRequest {
		t.Fatalf("bad signature: %d %s", r.status, r.body)
	}
	// A replay of a handled event changes nothing either.
	if r := sendStripeEvent(t, secret, "evt_1", "customer.subscription.updated", sub); r.status != http.StatusOK || !strings.Contains(r.body, "replay") {
		t.Fatalf("replay: %d %s", r.status, r.body)
	}
	// A correctly signed event dated beyond the tolerance, in the past or
	// in the future (where it would stay replayable until that date), is
	// refused too.
	for _, at := range []time.Time{time.Now().Add(time.Hour), time.Now().Add(6 * time.Minute), time.Now().Add(-6 * time.Minute), time.Now().Add(100 * 365 * 24 * time.Hour)} {
		if r := sendStripeEventAt(t, secret, "evt_future", "customer.subscription.updated", sub, at); r.status != http.StatusBadRequest {
			t.Fatalf("event signed at now%+v: %d %s, want 400", time.Until(at).Round(time.Minute), r.status, r.body)
		}
	}
	if got := tierSeen(t); got != "free" {
		t.Fatalf("tier %q after a bad signature, a replay and signatures out of tolerance, want free", got)
	}
	fetches := double.Requests("GET /v1/subscriptions/{id}")

	// A new event applies the subscription as Stripe has it now.
	if r := sendStripeEvent(t, secret, "evt_3", "customer.subscription.updated", sub); r.status != http.StatusOK {
		t.Fatalf("event: %d %s", r.status, r.body)
	}
	if got := tierSeen(t); got != "pro" {
		t.Fatalf("tier %q, want pro", got)
	}
	if n := double.Requests("GET /v1/subscriptions/{id}"); n != fetches+1 {
		t.Fatalf("subscription fetched %d times for one new event", n-fetches)
	}

	// A failed payment keeps the tier during past_due_grace, then
	// downgrades; the paid invoice restores it.
	invoice := `{"id":"in_1","object":"invoice","customer":"cus_ACME"}`
	if r := sendStripeEvent(t, secret, "evt_4", "invoice.payment_failed", invoice); r.status != http.StatusOK {
		t.Fatalf("event: %d %s", r.status, r.body)
	}
	if got := tierSeen(t); got != "pro" {
		t.Fatalf("tier %q during the grace, want pro", got)
	}
	// Let the grace (1h) run out by moving the failure's start back.
	rec, err := st.GetRecord(context.Background(), recordKindPastDue, "acme")
	if err != nil {
		t.Fatal(err)
	}
	var pd pastDue
	_ = json.Unmarshal(rec.Data, &pd)
	pd.Since = pd.Since.Add(-2 * time.Hour)
	rec.Data, _ = json.Marshal(pd)
	if _, err := st.PutRecord(context.Background(), rec, false); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "downgrade after the grace", func() bool { return tierSeen(t) == "free" })
	if r := sendStripeEvent(t, secret, "evt_5", "invoice.paid", invoice); r.status != http.StatusOK {
		t.Fatalf("event: %d %s", r.status, r.body)
	}
	if got := tierSeen(t); got != "pro" {
		t.Fatalf("tier %q after payment, want pro restored", got)
	}

	// A canceled subscription downgrades.
	double.SetSubscription("sub_1", "cus_ACME", "canceled", stripereport.BaseLookupKey("pro"))
	if r := sendStripeEvent(t, secret, "evt_6", "customer.subscription.deleted", sub); r.status != http.StatusOK {
		t.Fatalf("event: %d %s", r.status, r.body)
	}
	if got := tierSeen(t); got != "free" {
		t.Fatalf("tier %q after cancellation, want free", got)
	}
	// Unknown event types are acknowledged.
	if r := sendStripeEvent(t, secret, "evt_7", "charge.refunded", `{"id":"ch_1"}`); r.status != http.StatusOK {
		t.Fatalf("unknown event: %d %s", r.status, r.body)
	}
	c, err := st.GetCustomer(context.Background(), "acme")
	if err != nil || c.Tier != "free" {
		t.Fatalf("stored customer %+v, %v", c, err)
	}
}

// TestSubscriptionRetrieveIsValidForStripe sends the webhook's
// subscription fetch to stripe-mock.
func TestSubscriptionRetrieveIsValidForStripe(t *testing.T) {
	base := stripedouble.StripeMock(t)
	sc := stripereport.NewClient("sk_test_123", base, 10*time.Second)
	if _, err := sc.V1Subscriptions.Retrieve(context.Background(), "sub_123", nil); err != nil {
		t.Fatalf("stripe-mock refused the subscription fetch: %v", err)
	}
}
