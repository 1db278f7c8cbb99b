package stripereport

import (
	"context"
	"testing"
	"time"

	"github.com/stripe/stripe-go/v86"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
)

// TestMeterEventRequestIsValidForStripe sends the reporter's meter event
// request to stripe-mock, which checks it against Stripe's API spec.
func TestMeterEventRequestIsValidForStripe(t *testing.T) {
	base := stripedouble.StripeMock(t)
	sc := NewClient("sk_test_123", base, 10*time.Second)
	out, err := Send(context.Background(), sc, Event{
		Meter: "api_calls", StripeCustomerID: "cus_ACME", Value: 1234,
		Timestamp: time.Now().Add(-2 * time.Hour), Identifier: Identifier("gen_0123456789abcdef0123456789abcdef", "acme", "cus_ACME", "api_calls", "20261110T100000Z"),
	}, Retry{Attempts: 1})
	if out != Accepted || err != nil {
		t.Fatalf("stripe-mock refused the meter event: %v", err)
	}
}

// TestStripeMockRefusesAMalformedMeterEvent shows the validation above is
// real: an event without its required payload is refused.
func TestStripeMockRefusesAMalformedMeterEvent(t *testing.T) {
	base := stripedouble.StripeMock(t)
	sc := NewClient("sk_test_123", base, 10*time.Second)
	_, err := sc.V1BillingMeterEvents.Create(context.Background(), &stripe.BillingMeterEventCreateParams{EventName: stripe.String("api_calls")})
	if Classify(err) != Permanent {
		t.Fatalf("stripe-mock answered %v; want a refusal", err)
	}
}
