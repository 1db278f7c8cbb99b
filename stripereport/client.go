// Package stripereport reports metered usage to Stripe Billing Meters
// exactly once, reconciles what was reported against the hourly ledger, and
// plans the Stripe catalog (products, prices, meters) of the configured
// tiers. It holds no Caddy glue; the module package wires it into the app.
//
// Exactly once is built from three parts: each closed ledger hour becomes
// one meter event whose identifier is derived from (deployment namespace,
// customer, Stripe customer, meter, hour) and pinned in the store before
// the first try, so Stripe refuses a second copy for at least 24 hours and
// every retry carries the same identifier; a durable "sent"
// mark in the store is written only after Stripe accepted the event (or
// answered that it already has it), so an hour is never sent again after
// Stripe's memory expires; and a store lease makes one reporter work at a
// time across reloads and clusters.
package stripereport

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"math/big"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v86"
)

// NewClient returns a Stripe client for secretKey. apiBase, when not empty,
// replaces Stripe's API URL (tests against a local double). The SDK's own
// retries are disabled: the reporter retries with its own backoff and
// classification, and stripe-go v86 does not retry 429s or JSON-bodied 5xx
// anyway. Every request is bounded by timeout.
func NewClient(secretKey, apiBase string, timeout time.Duration) *stripe.Client {
	cfg := &stripe.BackendConfig{
		HTTPClient:        &http.Client{Timeout: timeout},
		MaxNetworkRetries: stripe.Int64(0),
		LeveledLogger:     &stripe.LeveledLogger{Level: stripe.LevelNull},
	}
	if apiBase != "" {
		cfg.URL = stripe.String(strings.TrimRight(apiBase, "/"))
	}
	return stripe.NewClient(secretKey, stripe.WithBackends(stripe.NewBackendsWithConfig(cfg)))
}

// Identifier is the meter event identifier of one ledger hour: a
// deterministic hash of (namespace, customer, Stripe customer, meter, hour),
// at most 100 characters as Stripe requires, the same on every instance of a
// deployment and after every restart. Stripe dedupes identifiers across the
// whole account, so the namespace sets apart deployments (production,
// staging) that report to one Stripe account, and the Stripe customer id
// sets apart customers that share an id in two deployments.
func Identifier(namespace, customer, stripeCustomerID, meter, hourID string) string {
	sum := sha256.Sum256([]byte("am2\x00" + namespace + "\x00" + customer + "\x00" + stripeCustomerID + "\x00" + meter + "\x00" + hourID))
	return "am2_" + hex.EncodeToString(sum[:20])
}

// LegacyIdentifier is the identifier versions before namespaces gave an
// hour: a hash of (customer, meter, hour) only, the same in every
// deployment. The reporter still uses it for an hour such a version tried
// and did not see accepted, so a retry after the upgrade is deduped against
// that try.
func LegacyIdentifier(customer, meter, hourID string) string {
	sum := sha256.Sum256([]byte("am1\x00" + customer + "\x00" + meter + "\x00" + hourID))
	return "am1_" + hex.EncodeToString(sum[:20])
}

// Outcome classifies the answer to one request.
type Outcome int

const (
	// Accepted: Stripe has the event (created now, or already there).
	Accepted Outcome = iota
	// Retryable: a rate limit, a server error or a network error; retry
	// later with the same identifier.
	Retryable
	// Permanent: Stripe refused the request (unknown meter or customer,
	// invalid timestamp); retrying the same request will not help.
	Permanent
)

// duplicateIdentifier is how Stripe refuses a meter event whose identifier
// it has already accepted. The error carries no code, only this message.
const duplicateIdentifier = "An event already exists with identifier"

// Classify classifies the error of a meter event request (nil is
// Accepted).
func Classify(err error) Outcome {
	if err == nil {
		return Accepted
	}
	var se *stripe.Error
	if !errors.As(err, &se) {
		return Retryable // network error, timeout, unreadable response
	}
	switch {
	case se.HTTPStatusCode == http.StatusBadRequest && strings.Contains(se.Msg, duplicateIdentifier):
		return Accepted
	case se.HTTPStatusCode == http.StatusTooManyRequests,
		se.HTTPStatusCode == http.StatusConflict,
		se.HTTPStatusCode >= 500,
		se.HTTPStatusCode == 0:
		return Retryable
	}
	return Permanent
}

// Retry is the reporter's retry policy for retryable answers: up to
// Attempts tries per event, waiting a random duration ("full jitter") up to
// min(Max, Base·2^n) before try n+1.
type Retry struct {
	Attempts int
	Base     time.Duration
	Max      time.Duration
	// Sleep waits d or until ctx is done; nil sleeps on a timer. Tests
	// replace it to record the waits instead of sleeping.
	Sleep func(ctx context.Context, d time.Duration) error
}

// DefaultRetry is 6 tries, 500ms doubling up to 30s.
var DefaultRetry = Retry{Attempts: 6, Base: 500 * time.Millisecond, Max: 30 * time.Second}

// delay is the wait before try n+1 (n ≥ 1).
func (r Retry) delay(n int) time.Duration {
	ceiling := r.Max
	if shift := n - 1; shift < 30 && r.Base<<shift < r.Max {
		ceiling = r.Base << shift
	}
	if ceiling <= 0 {
		return 0
	}
	v, err := rand.Int(rand.Reader, big.NewInt(int64(ceiling)+1))
	if err != nil {
		return ceiling
	}
	return time.Duration(v.Int64())
}

func (r Retry) sleep(ctx context.Context, d time.Duration) error {
	if r.Sleep != nil {
		return r.Sleep(ctx, d)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Event is one meter event to send.
type Event struct {
	// Meter is the meter's event name.
	Meter string
	// StripeCustomerID is the customer's Stripe id (cus_…).
	StripeCustomerID string
	// Value is the number of units (> 0).
	Value int64
	// Timestamp is inside the hour the value was used in.
	Timestamp time.Time
	// Identifier is Stripe's dedupe key (see Identifier).
	Identifier string
}

// Send sends ev, retrying retryable answers per r with the same identifier.
// It returns the final outcome and, unless Accepted, the last error.
//
// Every try uses a new Idempotency-Key: the identifier is what dedupes the
// event, and Stripe replays a key's first answer, errors included, for 24
// hours, so reusing a key could replay a cached 500 forever.
func Send(ctx context.Context, sc *stripe.Client, ev Event, r Retry) (Outcome, error) {
	attempts := max(1, r.Attempts)
	var err error
	for n := 1; ; n++ {
		params := &stripe.BillingMeterEventCreateParams{
			EventName:  stripe.String(ev.Meter),
			Identifier: stripe.String(ev.Identifier),
			Payload: map[string]string{
				"stripe_customer_id": ev.StripeCustomerID,
				"value":              strconv.FormatInt(ev.Value, 10),
			},
			Timestamp: stripe.Int64(ev.Timestamp.Unix()),
		}
		params.SetIdempotencyKey(ev.Identifier + "-" + nonce())
		_, err = sc.V1BillingMeterEvents.Create(ctx, params)
		out := Classify(err)
		if out != Retryable {
			if out == Accepted {
				err = nil
			}
			return out, err
		}
		if n >= attempts || ctx.Err() != nil {
			return Retryable, err
		}
		if serr := r.sleep(ctx, r.delay(n)); serr != nil {
			return Retryable, err
		}
	}
}

func nonce() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
