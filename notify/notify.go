// Package notify builds and delivers quota threshold notifications: the
// JSON payload and its human message, Standard Webhooks signing and
// delivery, email over SMTP, and the retry schedule. It keeps no state:
// package notifier (notify/notifier) decides what to send and records
// delivery state in the store.
package notify

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"time"
)

// EventType is the type of a threshold notification.
const EventType = "usage.threshold_crossed"

// Over-quota policies as they appear in a payload.
const (
	PolicyBlock    = "block"
	PolicyBill     = "bill"
	PolicyThrottle = "throttle"
	// PolicyNone is a tier that only meters.
	PolicyNone = "none"
)

// Payload is the JSON body of a notification, shaped as the Standard
// Webhooks spec recommends: type, timestamp and data.
type Payload struct {
	// Type is EventType.
	Type string `json:"type"`
	// Timestamp is when the threshold was crossed.
	Timestamp time.Time `json:"timestamp"`
	// Data describes the crossing.
	Data Data `json:"data"`
}

// Data is the content of a threshold notification.
type Data struct {
	// Customer is the customer's id.
	Customer string `json:"customer"`
	// Tier is the customer's tier when the notification was created.
	Tier string `json:"tier"`
	// Period is the billing period the usage counts in.
	Period Period `json:"period"`
	// Usage is the number of units used in the period when the threshold
	// was crossed.
	Usage int64 `json:"usage"`
	// Included is the number of units included in the period.
	Included int64 `json:"included"`
	// Percentage is Usage as a whole percentage of Included, rounded down.
	Percentage int64 `json:"percentage"`
	// Threshold is the percentage threshold crossed.
	Threshold int `json:"threshold"`
	// OverQuota is what happens beyond Included: block, bill, throttle or
	// none.
	OverQuota string `json:"over_quota"`
	// Message is a sentence for humans.
	Message string `json:"message"`
	// Meter names the meter whose threshold was crossed (e.g. "tokens");
	// absent for the default meter (API calls, in cost units), so a
	// receiver written before meters existed sees the same payload.
	Meter string `json:"meter,omitempty"`
}

// Period is a billing period: Start <= t < End.
type Period struct {
	// Start is the period's first instant.
	Start time.Time `json:"start"`
	// End is the first instant after the period; zero (omitted) when it
	// is not known.
	End time.Time `json:"end,omitzero"`
}

// NewPayload builds the payload of a crossing of threshold by a customer
// with used of included units under the given over-quota policy.
func NewPayload(customer, tier string, period Period, used, included int64, threshold int, overQuota string, at time.Time) Payload {
	if overQuota == "" {
		overQuota = PolicyNone
	}
	var pct int64
	if included > 0 {
		pct = percentage(used, included)
	}
	return Payload{
		Type:      EventType,
		Timestamp: at.UTC(),
		Data: Data{
			Customer: customer, Tier: tier,
			Period:     Period{Start: period.Start.UTC(), End: period.End.UTC()},
			Usage:      used,
			Included:   included,
			Percentage: pct,
			Threshold:  threshold,
			OverQuota:  overQuota,
			Message:    Message(threshold, included, overQuota),
		},
	}
}

// percentage is used*100/included rounded down; dividing first keeps
// used*100 from overflowing, and a quotient too large for the product
// saturates at math.MaxInt64 instead of wrapping negative.
func percentage(used, included int64) int64 {
	q, r := used/included, used%included
	if q > (math.MaxInt64-100)/100 || q < (math.MinInt64+100)/100 {
		if (used < 0) != (included < 0) {
			return math.MinInt64
		}
		return math.MaxInt64
	}
	return q*100 + r*100/included
}

// Message is the human sentence of a notification: below 100 % it names
// the threshold; at or above it, it names the included units and what the
// over-quota policy does now.
func Message(threshold int, included int64, overQuota string) string {
	return message("API calls", threshold, included, overQuota)
}

// message is Message for units named noun.
func message(noun string, threshold int, included int64, overQuota string) string {
	if threshold < 100 {
		return "You have used " + strconv.Itoa(threshold) + "% of your included " + noun + "."
	}
	n := strconv.FormatInt(included, 10)
	switch overQuota {
	case PolicyBill:
		return "You have exceeded your included " + n + " " + noun + ". Overage billing is active."
	case PolicyThrottle:
		return "You have exceeded your included " + n + " " + noun + ". Requests are now throttled until the period ends."
	case PolicyBlock:
		return "You have used all of your included " + n + " " + noun + ". Further requests are blocked until the period ends."
	}
	return "You have used " + strconv.Itoa(threshold) + "% of your included " + n + " " + noun + "."
}

// ForMeter makes p the notification of a meter other than the default
// one: Data.Meter names it and the message counts its units. Characters
// other than ASCII letters, digits, '.', '_' and '-' are dropped from the
// name (meter names have no others), so it can never add a header to an
// email.
func (p Payload) ForMeter(meter string) Payload {
	meter = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-' {
			return r
		}
		return -1
	}, meter)
	if meter == "" {
		return p
	}
	p.Data.Meter = meter
	p.Data.Message = message(meter, p.Data.Threshold, p.Data.Included, p.Data.OverQuota)
	return p
}

// units names what a payload counts: its meter, or API calls.
func (d Data) units() string {
	if d.Meter != "" {
		return d.Meter
	}
	return "API calls"
}

// Marshal encodes a payload as its webhook body.
func (p Payload) Marshal() []byte {
	b, _ := json.Marshal(p) // plain fields: cannot fail
	return b
}
