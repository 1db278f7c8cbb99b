package module

// MeterConfig declares a meter besides the default one (the request's cost
// units): what it counts and the event name it is reported to Stripe
// under. Tiers give it included units and an over-quota behaviour with a
// TierMeter; a tier without one only meters it. See docs/meters.md.
type MeterConfig struct {
	// Name identifies the meter (e.g. "tokens"): 1 to 64 ASCII letters,
	// digits, '.', '_' or '-', unique, and not "cost" (the default
	// meter's name).
	Name string `json:"name"`
	// Source is what the meter counts.
	Source MeterSource `json:"source"`
	// StripeEvent is the meter's Stripe event name. Default: the meter's
	// name. Distinct across meters and from the default meter's
	// (stripe.meter, default api_calls).
	StripeEvent string `json:"stripe_event,omitempty"`
}

// Kinds of MeterSource.
const (
	// sourceCost counts the request's cost units, as the default meter.
	sourceCost = "cost"
	// sourceHeader counts what a trusted upstream reports in a response
	// header.
	sourceHeader = "header"
	// sourceRequestBytes counts the request body's bytes.
	sourceRequestBytes = "request_bytes"
	// sourceResponseBytes counts the response body's bytes.
	sourceResponseBytes = "response_bytes"
)

// MeterSource is what a meter counts per request.
type MeterSource struct {
	// Kind is "cost" (the request's cost units, as the default meter),
	// "header" (the whole number a trusted upstream sets in Header; the
	// header is removed from the client's response), "request_bytes" (the
	// request body's bytes: its Content-Length, or the bytes read when it
	// has none) or "response_bytes" (the response body's bytes).
	Kind string `json:"kind"`
	// Header is the response header of a "header" source, named as
	// usage_cost_header is.
	Header string `json:"header,omitempty"`
	// Max caps what one request adds to the meter: required (≥ 1) for a
	// "header" source, optional for bytes (0: no cap), none for "cost". A
	// larger value counts as Max.
	Max int64 `json:"max,omitempty"`
}

// TierMeter is what a tier includes of a meter and what it does beyond
// it, as Included, OverQuota and Thresholds do for the default meter.
type TierMeter struct {
	// Meter names a meter declared in the app's Meters, once per tier.
	Meter string `json:"meter"`
	// Included is the number of the meter's units included per billing
	// period. Nil: the meter is counted, never limited.
	Included *Included `json:"included,omitempty"`
	// OverQuota decides what happens once Included is used up. Default:
	// block. Needs Included.
	OverQuota *OverQuota `json:"over_quota,omitempty"`
	// Thresholds are percentages of Included whose crossing is recorded
	// once per period. Nil: the tier's thresholds; an empty, non-nil list
	// disables them. Need Included.
	Thresholds []int `json:"thresholds,omitzero"`
}
