package store

import (
	"context"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
)

// Over-quota modes of a Quota.
const (
	// QuotaMeter only meters: no included quota is enforced.
	QuotaMeter = ""
	// QuotaBlock denies a reservation that would exceed the included units.
	QuotaBlock = "block"
	// QuotaBill admits beyond the included units and records the excess as
	// overage.
	QuotaBill = "bill"
	// QuotaThrottle admits beyond the included units at the Throttle rate
	// (instead of the tier's rate) and records the excess as overage.
	QuotaThrottle = "throttle"
)

// Quota describes the billing period a reservation is counted in and what
// happens beyond its included units. Counters are keyed by subject and
// PeriodID only (never by configuration), so reloads and tier changes keep
// usage.
type Quota struct {
	// PeriodID identifies the period (metering.Period.ID(), the start
	// instant as "20261101T000000Z").
	PeriodID string
	// PeriodEnd is when the period ends (exclusive). Counters are kept until
	// PeriodEnd plus Retention.
	PeriodEnd time.Time
	// HourID identifies the UTC hour of the ledger bucket
	// (metering.TimeID(metering.HourStart(now))).
	HourID string
	// Included is the number of units included in the period; meaningful
	// unless Mode is QuotaMeter.
	Included int64
	// Mode is QuotaMeter, QuotaBlock, QuotaBill or QuotaThrottle.
	Mode string
	// Throttle is the rate applied instead of the tier's once the period's
	// usage has reached Included, in QuotaThrottle mode.
	Throttle limiter.Policy
	// Thresholds are the percentages of Included (ascending, e.g. 80 100
	// 120) whose crossing is written to the threshold outbox, exactly once
	// per (subject, period, threshold).
	Thresholds []int
}

// Retention is how long period and hourly counters are kept after their
// period ends (Stripe accepts meter events up to 35 days old).
const Retention = 35 * 24 * time.Hour

// IdempotencyWindow is how long an Idempotency-Key is remembered when a
// reservation does not say (Reservation.IdempotencyWindow zero).
const IdempotencyWindow = 24 * time.Hour

// MaxIdempotencyFingerprintLen is the longest fingerprint a store keeps.
const MaxIdempotencyFingerprintLen = 64

// Reservation asks to admit a request: its rate limit and its quota are
// decided and its cost is reserved in one atomic step.
type Reservation struct {
	// Subject is the customer id.
	Subject string
	// Rate is the tier's rate limit; a zero Limit means none.
	Rate limiter.Policy
	// Cost is the number of units to reserve (≥ 1).
	Cost int64
	// Quota is the period the cost is counted in.
	Quota Quota
	// IdempotencyKey, when set, identifies a client retry. The first
	// reservation of a key (or the first after its record expired) stores
	// it with IdempotencyFingerprint for IdempotencyWindow. A later
	// reservation of the same subject and key is a repeat: it is decided
	// exactly like any reservation (block quota, rate limit or throttle,
	// whose units it spends), and, when admitted, it is a Duplicate (not
	// counted, not billed) only if its fingerprint is the stored one and
	// fewer than IdempotencyRepeats repeats were Duplicates before it;
	// otherwise it is counted and billed like any request, and the stored
	// record is left as it is.
	IdempotencyKey string
	// IdempotencyFingerprint identifies what the request is (the caller's
	// method, path, query and cost): a repeat with another fingerprint is
	// another request. An empty fingerprint never matches. At most
	// MaxIdempotencyFingerprintLen bytes.
	IdempotencyFingerprint string
	// IdempotencyRepeats is how many repeats of a key are Duplicates at
	// most (0: none).
	IdempotencyRepeats int64
	// IdempotencyWindow is how long a key is remembered after the
	// reservation that stored it; zero means the IdempotencyWindow
	// constant.
	IdempotencyWindow time.Duration
	// Origin identifies the Caddy instance making the reservation, and Seq
	// numbers its reservations of Subject (strictly increasing per
	// (Origin, Subject), dense). A shared store remembers, per (Subject,
	// Origin), which of the last SeqWindow sequence numbers it reserved and
	// settled, so a Replay is applied exactly once.
	Origin string
	Seq    int64
	// Replay marks a reservation written to the local spool because the
	// store was unreachable or the outcome of the original call is unknown
	// (a timeout after sending). It is never denied (the request was
	// already served), is applied only if (Origin, Seq) was not applied,
	// and does not touch rate-limit state.
	Replay bool
}

// IdempotencyTTL is how long r's idempotency key is remembered:
// r.IdempotencyWindow, or the IdempotencyWindow constant when it is zero.
func (r Reservation) IdempotencyTTL() time.Duration {
	if r.IdempotencyWindow > 0 {
		return r.IdempotencyWindow
	}
	return IdempotencyWindow
}

// SeqWindow is how many recent sequence numbers per (Subject, Origin) a
// shared store remembers for Replay.
const SeqWindow = 64

// Reserved is the outcome of a reservation.
type Reserved struct {
	// Allowed reports whether the request was admitted.
	Allowed bool
	// Rate is the decision of the rate policy that applied: the tier's
	// rate, or the throttle rate once the quota is used up in throttle
	// mode. Zero when no rate policy applied.
	Rate limiter.Decision
	// Throttled reports that the throttle rate applied.
	Throttled bool
	// QuotaExceeded reports a denial because a block quota would be
	// exceeded.
	QuotaExceeded bool
	// Used is the period's billed units after this reservation (before it
	// when denied).
	Used int64
	// Overage is the part of this reservation counted beyond Included.
	Overage int64
	// Duplicate reports an idempotent repeat: admitted (its rate units
	// spent), nothing counted or billed, nothing to settle.
	Duplicate bool
	// Crossed lists the thresholds this reservation crossed; each was
	// written to the outbox in the same atomic step.
	Crossed []int
}

// Settlement corrects a reservation once the response is known. It is only
// needed when the billed cost differs from the reserved one.
type Settlement struct {
	// Subject, Quota, IdempotencyKey and IdempotencyFingerprint are those
	// of the reservation.
	Subject                string
	Quota                  Quota
	IdempotencyKey         string
	IdempotencyFingerprint string
	// Reserved and Overage are what the reservation recorded.
	Reserved int64
	Overage  int64
	// Actual is the cost to bill: 0 releases the reservation entirely (the
	// response was not billable: the request count is taken back too, and
	// the idempotency key is forgotten when its stored fingerprint is this
	// settlement's, so a retry is billed).
	Actual int64
	// Origin, Seq and Replay are those of the reservation; a replayed
	// settlement is applied only if (Origin, Seq) was reserved and not yet
	// settled.
	Origin string
	Seq    int64
	Replay bool
}

// Counters are billed units, overage units and billable requests.
type Counters struct {
	// Billed is the number of billed cost units.
	Billed int64 `json:"billed_units"`
	// Overage is the part of Billed beyond the included units.
	Overage int64 `json:"overage_units"`
	// Requests is the number of billed requests.
	Requests int64 `json:"requests"`
}

// HourUsage is one hour of a subject's ledger.
type HourUsage struct {
	// HourID is the UTC hour (metering.TimeID form).
	HourID string `json:"hour"`
	Counters
}

// PeriodUsage is a subject's ledger for one period.
type PeriodUsage struct {
	// PeriodID identifies the period.
	PeriodID string `json:"period"`
	// Counters are the period's totals.
	Counters
	// Thresholds are the thresholds already crossed in this period.
	Thresholds []int `json:"thresholds_crossed,omitempty"`
	// Hours are the hours with usage, in order.
	Hours []HourUsage `json:"hours,omitempty"`
}

// ThresholdEvent is an outbox entry: a subject crossed a threshold of its
// included units in a period. Each (Subject, PeriodID, Threshold) is
// written exactly once.
type ThresholdEvent struct {
	// ID is "<subject>|<period>|<threshold>", unique per event.
	ID string `json:"id"`
	// Subject is the customer id.
	Subject string `json:"customer"`
	// PeriodID identifies the period.
	PeriodID string `json:"period"`
	// Threshold is the percentage crossed.
	Threshold int `json:"threshold"`
	// Used and Included are the units when it was crossed.
	Used     int64 `json:"used_units"`
	Included int64 `json:"included_units"`
	// At is when it was crossed.
	At time.Time `json:"at"`
}

// Meter is the metering part of a store: atomic reservations against rate
// limits and quotas, their settlement, the hourly and period ledger, and the
// threshold outbox.
type Meter interface {
	// Reserve decides and reserves one request atomically (one round trip
	// for a shared store): the idempotency check, the rate limit or the
	// throttle, the quota, the period and hourly ledger and the threshold
	// outbox. A zero Cost only reports the rate and quota state: it is
	// neither limited nor counted. A denied reservation changes nothing.
	Reserve(ctx context.Context, r Reservation) (Reserved, error)
	// Settle corrects a reservation (see Settlement).
	Settle(ctx context.Context, s Settlement) error
	// Usage returns a subject's ledger for a period, with zero counters
	// when there is none.
	Usage(ctx context.Context, subject, periodID string) (PeriodUsage, error)
	// ThresholdEvents returns the outbox entries of subject (all subjects
	// when empty), oldest first.
	ThresholdEvents(ctx context.Context, subject string) ([]ThresholdEvent, error)
}
