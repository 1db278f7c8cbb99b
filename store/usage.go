package store

import (
	"context"
	"fmt"
	"strconv"
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
	// Cost is the number of units to reserve. A zero Cost makes the
	// default meter free: without Meters the reservation only reports the
	// rate and quota state (neither limited nor counted); with Meters it
	// is decided and counted as any other for its meters only (see
	// Meter.Reserve).
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
	// Meters are the request's other meters (besides the default one that
	// Cost and Quota describe), in configuration order, each named once.
	// Empty without meter blocks: then nothing else changes what a store
	// does. A reservation's meters share its Quota's period and hour, its
	// idempotency and its replay window: the whole request is admitted or
	// denied, applied or deduplicated, as one. At most MaxMeters.
	Meters []MeterReservation `json:"Meters,omitempty"`
}

// DefaultMeter is the name the default meter (cost units) goes by where a
// name is needed; no other meter may take it.
const DefaultMeter = "cost"

// MaxMeters is the most meters a reservation carries besides the default
// one.
const MaxMeters = 16

// MaxMeterNameLen is the longest meter name.
const MaxMeterNameLen = 64

// ValidMeterName reports whether name can name a meter other than the
// default one: 1 to MaxMeterNameLen bytes of [A-Za-z0-9._-], and not
// DefaultMeter. (A store keys a meter's counters by its name, so its
// characters never collide with a store's separators.)
func ValidMeterName(name string) bool {
	if name == "" || len(name) > MaxMeterNameLen || name == DefaultMeter {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// MeterReservation is one meter of a reservation besides the default one.
type MeterReservation struct {
	// Meter is the meter's name (see ValidMeterName).
	Meter string
	// Amount is the number of units known before the upstream answers
	// (e.g. a request's Content-Length), reserved like Cost; 0 for a meter
	// known only after the response (its units come with the Settlement).
	// With a block quota, a positive Amount is denied when used + Amount
	// would exceed Included; a zero Amount is denied once used ≥ Included.
	Amount int64
	// Included is the number of the meter's units included in the period;
	// meaningful unless Mode is QuotaMeter.
	Included int64
	// Mode is QuotaMeter, QuotaBlock, QuotaBill or QuotaThrottle, as for
	// Quota.Mode.
	Mode string
	// Throttle is the rate applied instead of the tier's once the meter is
	// used up, in QuotaThrottle mode. When several meters (the default one
	// included) are used up in throttle mode, the slowest of their
	// throttles applies.
	Throttle limiter.Policy
	// Thresholds are the percentages of Included (ascending) whose
	// crossing is written to the threshold outbox exactly once per
	// (subject, period, meter, threshold).
	Thresholds []int
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
	// Meters are the outcomes of Reservation.Meters, in the same order
	// (nil without them). When the reservation is denied, each holds the
	// meter's usage before it.
	Meters []MeterReserved
	// QuotaExceededMeter names the meter whose block quota denied the
	// reservation when QuotaExceeded is set: "" for the default meter.
	QuotaExceededMeter string
}

// MeterReserved is the outcome of a reservation for one of its meters.
type MeterReserved struct {
	// Used is the meter's units in the period after the reservation
	// (before it when denied).
	Used int64
	// Overage is the part of the reserved Amount counted beyond Included.
	Overage int64
	// Crossed lists the meter's thresholds this reservation crossed; each
	// was written to the outbox in the same atomic step.
	Crossed []int
	// Throttled reports that the meter was used up in QuotaThrottle mode,
	// so a throttle rate applied (Reserved.Throttled is set too).
	Throttled bool
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
	// Void marks a replayed release of a reservation whose outcome is
	// unknown (its call failed after it may have been sent) and whose
	// request was not served: Replay is set, Actual is 0, Overage is 0
	// (the store's split is not known; the release rule of Actual 0
	// applies) and each meter settles its Amount to 0. A shared store
	// applies it once per (Origin, Seq): if the reservation was reserved
	// and not settled, it is released (units, request, overage, hour and
	// meters, as a Settlement with Actual 0); if (Origin, Seq) was never
	// seen, it is marked settled, so the original, should it run later,
	// counts nothing; otherwise (already settled or voided, or more than
	// SeqWindow below the highest Seq seen) nothing changes. A reservation
	// whose idempotency key (this fingerprint) already served a Duplicate
	// stays counted: it pays for that repeat. A store that never loses a
	// reply (the embedded one) ignores it.
	Void bool `json:"Void,omitempty"`
	// Meters are the settlements of the reservation's other meters: only
	// those whose final amount differs from the reserved one, each named
	// once. A Settlement whose Actual equals Reserved changes only these.
	Meters []MeterSettlement `json:"Meters,omitempty"`
}

// VoidOf returns the void of r (see Settlement.Void): the release of all
// it would have counted, its default meter and each meter with an Amount,
// as a Replay of its (Origin, Seq).
func VoidOf(r Reservation) Settlement {
	s := Settlement{
		Subject: r.Subject, Quota: r.Quota,
		IdempotencyKey: r.IdempotencyKey, IdempotencyFingerprint: r.IdempotencyFingerprint,
		Reserved: r.Cost, Origin: r.Origin, Seq: r.Seq, Replay: true, Void: true,
	}
	for _, m := range r.Meters {
		if m.Amount > 0 {
			s.Meters = append(s.Meters, MeterSettlement{Meter: m.Meter, Reserved: m.Amount, Quota: m})
		}
	}
	return s
}

// MeterSettlement corrects one meter of a reservation.
type MeterSettlement struct {
	// Meter is the meter's name.
	Meter string
	// Reserved and Overage are what the reservation recorded for the
	// meter (MeterReservation.Amount and MeterReserved.Overage).
	Reserved int64
	Overage  int64
	// Actual is the meter's final amount: the reported value, the bytes
	// counted, 0 when the response is not billable. Units added beyond
	// Reserved are counted after the period's current usage (their overage
	// follows Quota's Included and Mode) and may cross Quota's thresholds;
	// units taken back come off the reservation's overage first.
	Actual int64
	// Quota is the meter's quota as the reservation carried it (its Amount
	// is ignored), for the overage and thresholds of added units.
	Quota MeterReservation
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
	// Meters are the period's other meters with any usage or crossed
	// threshold, ordered by name. Counters, Thresholds and Hours above are
	// the default meter's.
	Meters []MeterUsage `json:"meters,omitempty"`
}

// MeterUsage is one meter's ledger for a period. A meter's Requests counts
// the requests that added units to it.
type MeterUsage struct {
	// Meter is the meter's name.
	Meter string `json:"meter"`
	// Counters are the meter's period totals.
	Counters
	// Thresholds are the meter's thresholds already crossed.
	Thresholds []int `json:"thresholds_crossed,omitempty"`
	// Hours are the hours with usage of the meter, in order.
	Hours []HourUsage `json:"hours,omitempty"`
}

// Meter returns the ledger of the meter named name ("" or DefaultMeter:
// the default meter's), with zero counters when the period has none.
func (u PeriodUsage) Meter(name string) MeterUsage {
	if name == "" || name == DefaultMeter {
		return MeterUsage{Meter: DefaultMeter, Counters: u.Counters, Thresholds: u.Thresholds, Hours: u.Hours}
	}
	for _, m := range u.Meters {
		if m.Meter == name {
			return m
		}
	}
	return MeterUsage{Meter: name}
}

// ThresholdEvent is an outbox entry: a subject crossed a threshold of its
// included units in a period. Each (Subject, PeriodID, Meter, Threshold)
// is written exactly once.
type ThresholdEvent struct {
	// ID is "<subject>|<period>|<threshold>" for the default meter and
	// "<subject>|<period>|<threshold>|<meter>" for another (see
	// ThresholdEventID), unique per event.
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
	// Meter names the meter whose threshold was crossed; empty for the
	// default meter (so its events read as before meters existed).
	Meter string `json:"meter,omitempty"`
}

// ThresholdEventID is the ID of the event of subject crossing threshold of
// meter ("" for the default meter) in period.
func ThresholdEventID(subject, periodID string, threshold int, meter string) string {
	id := subject + "|" + periodID + "|" + strconv.Itoa(threshold)
	if meter != "" {
		id += "|" + meter
	}
	return id
}

// MaxMeterAmount bounds a meter's amount, included units, reserved and
// actual amounts: both stores count exactly up to it (Redis's scripts
// compute in doubles), and no sum of two of them overflows an int64.
const MaxMeterAmount = 1<<53 - 1

// CheckMeters validates the meters of a reservation: valid distinct names,
// at most MaxMeters, known modes, amounts and included units from 0 to
// MaxMeterAmount,
// thresholds ascending and positive.
func CheckMeters(ms []MeterReservation) error {
	if len(ms) > MaxMeters {
		return fmt.Errorf("%d meters, at most %d", len(ms), MaxMeters)
	}
	for i, m := range ms {
		if !ValidMeterName(m.Meter) {
			return fmt.Errorf("invalid meter name %q", m.Meter)
		}
		for _, o := range ms[:i] {
			if o.Meter == m.Meter {
				return fmt.Errorf("meter %q named twice", m.Meter)
			}
		}
		if err := checkMeterQuota(m); err != nil {
			return err
		}
	}
	return nil
}

// checkMeterQuota validates one meter's amount, included units, mode and
// thresholds.
func checkMeterQuota(m MeterReservation) error {
	switch m.Mode {
	case QuotaMeter, QuotaBlock, QuotaBill, QuotaThrottle:
	default:
		return fmt.Errorf("meter %q: unknown over-quota mode %q", m.Meter, m.Mode)
	}
	if m.Amount < 0 || m.Included < 0 || m.Amount > MaxMeterAmount || m.Included > MaxMeterAmount {
		return fmt.Errorf("meter %q: amount %d or included %d out of range (0 to %d)", m.Meter, m.Amount, m.Included, MaxMeterAmount)
	}
	for i, t := range m.Thresholds {
		if t < 1 || i > 0 && t <= m.Thresholds[i-1] {
			return fmt.Errorf("meter %q: thresholds %v not ascending and positive", m.Meter, m.Thresholds)
		}
	}
	return nil
}

// CheckMeterSettlements validates the meters of a settlement: valid
// distinct names, at most MaxMeters, 0 ≤ Overage ≤ Reserved ≤
// MaxMeterAmount, 0 ≤ Actual ≤ MaxMeterAmount, and a valid Quota.
func CheckMeterSettlements(ms []MeterSettlement) error {
	if len(ms) > MaxMeters {
		return fmt.Errorf("%d meters, at most %d", len(ms), MaxMeters)
	}
	for i, m := range ms {
		if !ValidMeterName(m.Meter) {
			return fmt.Errorf("invalid meter name %q", m.Meter)
		}
		for _, o := range ms[:i] {
			if o.Meter == m.Meter {
				return fmt.Errorf("meter %q named twice", m.Meter)
			}
		}
		if m.Reserved < 0 || m.Actual < 0 || m.Overage < 0 || m.Overage > m.Reserved || m.Reserved > MaxMeterAmount || m.Actual > MaxMeterAmount {
			return fmt.Errorf("meter %q: settlement amounts out of range (reserved %d, overage %d, actual %d)", m.Meter, m.Reserved, m.Overage, m.Actual)
		}
		q := m.Quota
		q.Meter, q.Amount = m.Meter, 0
		if err := checkMeterQuota(q); err != nil {
			return err
		}
	}
	return nil
}

// Meter is the metering part of a store: atomic reservations against rate
// limits and quotas, their settlement, the hourly and period ledger, and the
// threshold outbox.
type Meter interface {
	// Reserve decides and reserves one request atomically (one round trip
	// for a shared store): the idempotency check, the rate limit or the
	// throttle, the quota, the period and hourly ledger and the threshold
	// outbox. A zero Cost without Meters only reports the rate and quota
	// state: it is neither limited nor counted. A zero Cost with Meters
	// leaves the default meter alone (no units, request, overage or
	// threshold; its block quota does not refuse; the tier's rate is not
	// spent) and reserves, refuses and counts its other meters as with
	// any Cost, its idempotency and replay window included; when a meter's
	// throttle applies (see AdmitMeters) it spends one unit of it. A
	// denied reservation changes nothing.
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
