package module

import (
	"github.com/caddyserver/caddy/v2"
)

// Tier is a named plan: what it costs, what it includes, how fast its
// customers may call, and which endpoints they may reach.
type Tier struct {
	// Name identifies the tier (e.g. "free", "pro"). Unique.
	Name string `json:"name"`
	// Price is the tier's flat base price. Nil means free (price 0).
	Price *Price `json:"price,omitempty"`
	// Included is the number of cost units included per billing period.
	// Parsed and stored; enforced by quotas.
	Included *Included `json:"included,omitempty"`
	// Rate is the tier's rate limit. Nil means no rate limit.
	Rate *Rate `json:"rate,omitempty"`
	// Endpoints are the path patterns (Caddy path-matcher syntax) this tier
	// may call. Empty means every path.
	Endpoints []string `json:"endpoints,omitempty"`
	// Exclude are path patterns this tier may not call, even when they
	// match Endpoints.
	Exclude []string `json:"exclude,omitempty"`
	// Features are the names of the features this tier includes (e.g.
	// "bulk_export"): the upstream learns them from the
	// {http.api_monetize.features} placeholder, the api_monetize_feature
	// matcher routes by them and the handler's require_feature refuses
	// requests of tiers without them. Each name is 1 to 64 ASCII letters,
	// digits, '.', '_' or '-', listed once.
	Features []string `json:"features,omitempty"`
	// Support is the support level shown to customers (e.g. "email").
	Support string `json:"support,omitempty"`
	// SLA is the availability commitment, as written (e.g. "99.9%").
	SLA string `json:"sla,omitempty"`
	// OverQuota decides what happens once the period's Included units are
	// used up. Default: block.
	OverQuota *OverQuota `json:"over_quota,omitempty"`
	// Period is the billing period. Default: calendar months in UTC.
	Period *Period `json:"period,omitempty"`
	// Thresholds override the app's thresholds for this tier: percentages
	// of Included whose crossing is recorded once per period. An empty,
	// non-nil list disables them: it is written as [] in JSON (omitzero
	// omits only a nil list), so that it survives a round trip.
	Thresholds []int `json:"thresholds,omitzero"`
	// Meters give the tier included units and an over-quota behaviour for
	// meters declared in the app's Meters, each at most once. A meter
	// without one is counted, never limited.
	Meters []TierMeter `json:"meters,omitempty"`
	// OnStoreError decides admission when the store cannot be reached:
	// "local" (default) decides with in-process rate-limit state, "allow"
	// admits without limiting, "deny" answers 503.
	OnStoreError string `json:"on_store_error,omitempty"`
}

// Price is an exact amount of money per interval.
type Price struct {
	// Custom marks a negotiated price ("price custom"); AmountMicros is then
	// zero.
	Custom bool `json:"custom,omitempty"`
	// AmountMicros is the amount in millionths of the currency unit
	// (49.00 USD = 49000000).
	AmountMicros int64 `json:"amount_micros,omitempty"`
	// Interval is the billing interval: "month" or "year". Empty for a free
	// or custom price.
	Interval string `json:"interval,omitempty"`
}

// Included is an allowance of cost units per billing period.
type Included struct {
	// Units is the number of cost units included.
	Units int64 `json:"units"`
	// Interval is the period the units renew over; "month".
	Interval string `json:"interval"`
}

// Rate is a GCRA rate limit: Limit units per Window, in bursts of at most
// Burst units.
type Rate struct {
	// Limit is the number of cost units per Window.
	Limit int64 `json:"limit"`
	// Window is the duration Limit applies to (1s, 1m, 1h or 24h when
	// written in a Caddyfile).
	Window caddy.Duration `json:"window"`
	// Burst is the largest number of units admitted at once. Default: Limit.
	Burst int64 `json:"burst,omitempty"`
}

// CustomerConfig declares a customer in the configuration. Declared
// customers are upserted into the store at start.
type CustomerConfig struct {
	// ID is the customer's identifier.
	ID string `json:"id"`
	// Tier is the customer's tier. When the configuration changes it, the
	// stored tier follows; a tier changed at runtime (admin API, billing)
	// is kept while the configuration keeps declaring the same tier.
	Tier string `json:"tier"`
	// StripeCustomerID is the customer's Stripe id (cus_…).
	StripeCustomerID string `json:"stripe_customer_id,omitempty"`
	// Email is where usage notifications go.
	Email string `json:"email,omitempty"`
	// Anchor is the billing anchor date, YYYY-MM-DD. Default: the day the
	// customer was first stored.
	Anchor string `json:"anchor,omitempty"`
}

// KeyConfig declares an API key in the configuration. Use a placeholder such
// as {env.PRO_KEY} so the key never appears in the config itself.
type KeyConfig struct {
	// Key is the API key (at least 20 characters once placeholders are
	// replaced). Only its keyed hash is stored.
	Key string `json:"key"`
	// Customer is the id of the customer the key belongs to.
	Customer string `json:"customer"`
	// Expires, when set, is when the key stops working: an RFC 3339 date
	// (e.g. 2027-01-31T00:00:00Z). A runtime change (a roll, or PATCH on
	// the admin API) is kept until the configuration declares another
	// expiry.
	Expires string `json:"expires,omitempty"`
}

// Cost assigns a cost in units to requests whose path matches Path.
type Cost struct {
	// Path is a path pattern (Caddy path-matcher syntax).
	Path string `json:"path"`
	// Units is what a matching request costs; 0 means neither limited nor
	// counted.
	Units int64 `json:"units"`
}

// KeySource names where the handler looks for the API key. Exactly one
// field is set.
type KeySource struct {
	// Header is a request header holding the key as its whole value.
	Header string `json:"header,omitempty"`
	// Query is a URL query parameter holding the key.
	Query string `json:"query,omitempty"`
	// Bearer takes the key from "Authorization: Bearer <key>".
	Bearer bool `json:"bearer,omitempty"`

	// canonical is Header in canonical form, the request's header map key.
	canonical string
}

// OverQuota is what a tier does beyond its included units.
type OverQuota struct {
	// Mode is "block" (429 until the period ends), "bill" (allowed; the
	// excess is recorded as overage) or "throttle" (allowed at the Throttle
	// rate; with PriceMicros the excess is billed too).
	Mode string `json:"mode"`
	// PriceMicros is the price of one unit beyond the quota, in millionths
	// of the currency unit (0.002 USD = 2000).
	PriceMicros int64 `json:"price_micros,omitempty"`
	// Throttle is the rate applied beyond the quota in throttle mode.
	Throttle *Rate `json:"throttle,omitempty"`
}

// Period is a tier's billing period.
type Period struct {
	// Anniversary starts periods on each customer's anchor day instead of
	// the first of the month (days 29–31 clamp to the month's last day).
	Anniversary bool `json:"anniversary,omitempty"`
	// Zone is the IANA time zone of calendar months. Default: UTC.
	Zone string `json:"zone,omitempty"`
}

// StripeConfig connects the app to Stripe: usage is reported to a Billing
// Meter, tiers are synced as products and prices, and subscription
// webhooks change customers' tiers.
type StripeConfig struct {
	// SecretKey is the Stripe secret key; use {env.STRIPE_SECRET_KEY}.
	SecretKey string `json:"secret_key,omitempty"`
	// Meter is the meter's event name. Default: "api_calls".
	Meter string `json:"meter,omitempty"`
	// ReportEvery is how often closed hours are reported. Default: 1h.
	ReportEvery caddy.Duration `json:"report_every,omitempty"`
	// SettleGrace is how long after an hour ends it is reported, so that
	// late settlements land first. Nil means the default, 2m; 0 reports an
	// hour as soon as it ends.
	SettleGrace *caddy.Duration `json:"settle_grace,omitempty"`
	// Namespace sets this deployment's meter event identifiers apart from
	// those of other deployments (staging, another region) that report to
	// the same Stripe account, since Stripe dedupes identifiers account-wide.
	// Empty: a random namespace generated once and kept in the store, which
	// every instance sharing the store uses. Set it when a store is copied
	// into another deployment. May use placeholders.
	Namespace string `json:"namespace,omitempty"`
	// WebhookSecret is the webhook endpoint's signing secret (whsec_…);
	// use {env.STRIPE_WEBHOOK_SECRET}.
	WebhookSecret string `json:"webhook_secret,omitempty"`
	// PastDueGrace is how long a customer keeps their tier after a failed
	// payment before falling back to DowngradeTo. Default: 72h.
	PastDueGrace caddy.Duration `json:"past_due_grace,omitempty"`
	// DowngradeTo is the tier a customer falls back to when their
	// subscription ends or stays unpaid.
	DowngradeTo string `json:"downgrade_to,omitempty"`
	// APIBase overrides Stripe's API URL (https://api.stripe.com); only for
	// tests against stripe-mock or a local Stripe double.
	APIBase string `json:"api_base,omitempty"`
}

// NotifyConfig delivers quota threshold notifications.
type NotifyConfig struct {
	// Webhooks receive signed (Standard Webhooks) JSON notifications.
	Webhooks []WebhookTarget `json:"webhooks,omitempty"`
	// Email sends notifications to customers' email addresses.
	Email *EmailConfig `json:"email,omitempty"`
}

// WebhookTarget is a URL notifications are POSTed to.
type WebhookTarget struct {
	// URL is the receiver's endpoint (https:// in production).
	URL string `json:"url"`
	// Secret is the Standard Webhooks signing secret (whsec_…); use an
	// {env.*} placeholder.
	Secret string `json:"secret"`
}

// EmailConfig sends notifications over SMTP.
type EmailConfig struct {
	// SMTP is the server's host:port.
	SMTP string `json:"smtp"`
	// Username and Password authenticate to the server, when set; use
	// {env.*} placeholders.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// From is the sender, e.g. "API Billing <billing@example.com>".
	From string `json:"from"`
}
