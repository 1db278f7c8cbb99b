package stripereport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/stripe/stripe-go/v86"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// Record kinds and the lease the reporter keeps in the store.
const (
	// KindSent marks an hour Stripe accepted, or one that can never be
	// sent (too old); id "<customer>|<hourID>".
	KindSent = "stripe_sent"
	// KindFailed holds the last error of an hour not yet accepted; it is
	// removed once the hour is accepted.
	KindFailed = "stripe_failed"
	// KindTry pins the identifier of an hour before its first try, so
	// every later try (after a crash, a restart, a new namespace or a new
	// version) sends the hour under the same identifier; it is removed
	// once the hour's mark is written.
	KindTry = "stripe_try"
	// LeaseName is the lease one reporter at a time holds.
	LeaseName = "stripe_reporter"
)

// Hour states, as the reconciliation reports them.
const (
	StateSent    = "sent"
	StatePending = "pending"
	StateFailed  = "failed"
	StateTooOld  = "too_old"
)

// MaxAge is how old an event's timestamp may be for Stripe to accept it
// (35 days), less an hour of margin for clock skew and retries.
const MaxAge = 35*24*time.Hour - time.Hour

// markTTL is how long marks are kept: longer than any hour of the current
// and previous period can be old, so a marked hour is never seen unmarked.
const markTTL = 100 * 24 * time.Hour

// Store is what the reporter needs from the store.
type Store interface {
	ListCustomers(ctx context.Context) ([]store.Customer, error)
	Usage(ctx context.Context, subject, periodID string) (store.PeriodUsage, error)
	store.Records
}

// Mark is the content of a KindSent record.
type Mark struct {
	// State is StateSent or StateTooOld.
	State string `json:"state"`
	// Units is the value Stripe accepted (or, too old, the ledger's units
	// that could not be sent).
	Units int64 `json:"units"`
	// Identifier is the meter event identifier.
	Identifier string `json:"identifier"`
	// At is when the mark was written.
	At time.Time `json:"at"`
}

// failure is the content of a KindFailed record.
type failure struct {
	Error string    `json:"error"`
	At    time.Time `json:"at"`
}

// try is the content of a KindTry record.
type try struct {
	Identifier string    `json:"identifier"`
	At         time.Time `json:"at"`
}

// Reporter sends each closed ledger hour of every Stripe customer to a
// Billing Meter once. Run Tick periodically; it does nothing unless it
// holds the lease.
type Reporter struct {
	// Client talks to Stripe (see NewClient).
	Client *stripe.Client
	// Store holds the ledger, the marks and the lease.
	Store Store
	// Meter is the default meter's event name.
	Meter string
	// Meters are the other meters to report, each under its own event
	// name (see docs/meters.md): an hour of each is one meter event, and
	// its mark is "<customer>|<meter>|<hour>".
	Meters []MeterEvent
	// Namespace sets this deployment's meter event identifiers apart from
	// those of other deployments reporting to the same Stripe account.
	// Empty: the namespace kept in the store (see StoredNamespace).
	Namespace string
	// SettleGrace is how long after its end an hour is reported.
	SettleGrace time.Duration
	// Holder identifies this reporter in the lease; unique per instance.
	Holder string
	// LeaseTTL is how long the lease lasts without renewal; longer than
	// the interval between ticks.
	LeaseTTL time.Duration
	// Periods returns the ids of the periods whose hours to report for a
	// customer at now: the current and the previous one.
	Periods func(c store.Customer, now time.Time) []string
	// Retry is the retry policy per event (DefaultRetry when zero).
	Retry Retry
	// MinInterval spaces meter event requests, to stay under Stripe's rate
	// limits (25 requests/s in test mode, shared with other calls).
	MinInterval time.Duration
	// Now returns the time; nil is time.Now.
	Now func() time.Time
	// Logger logs errors; nil logs nothing.
	Logger *zap.Logger
}

// MeterEvent is a meter other than the default one and its Stripe event
// name.
type MeterEvent struct {
	// Meter is the meter's name (store.MeterUsage.Meter).
	Meter string
	// Event is its Stripe meter event name.
	Event string
}

// Result is what one Tick did.
type Result struct {
	// Leader reports that this reporter held the lease.
	Leader bool
	// Sent is the number of hours Stripe accepted in this tick.
	Sent int
	// Failed is the number of hours that failed in this tick.
	Failed int
	// TooOld is the number of hours newly found too old to send.
	TooOld int
	// Unreported is the number of closed units not accepted by Stripe
	// after this tick: hours that failed, were left for the next tick after
	// Stripe stopped answering, or are too old, and the growth of sent
	// hours since they were sent.
	Unreported int64
	// UnreportedByMeter splits Unreported by meter: "" for the default
	// meter, a meter's name for another (MeterEvent.Meter); meters without
	// unreported units are absent. Nil when Unreported is 0.
	UnreportedByMeter map[string]int64
	// Hours are the hours this tick tried or found too old, in order.
	Hours []HourResult
}

// unreport counts n unreported units of meter ("" for the default one).
func (res *Result) unreport(meter string, n int64) {
	if n == 0 {
		return
	}
	res.Unreported += n
	if res.UnreportedByMeter == nil {
		res.UnreportedByMeter = make(map[string]int64)
	}
	res.UnreportedByMeter[meter] += n
}

// HourResult is one hour a tick handled.
type HourResult struct {
	// Customer is the customer id; StripeCustomerID its Stripe id.
	Customer         string `json:"customer"`
	StripeCustomerID string `json:"stripe_customer_id"`
	// Meter names the meter the hour is of; empty for the default meter.
	Meter string `json:"meter,omitempty"`
	// Hour is the UTC hour (metering.TimeID form).
	Hour string `json:"hour"`
	// Units is the hour's billed units: the event's value.
	Units int64 `json:"units"`
	// Identifier is the event's identifier.
	Identifier string `json:"identifier"`
	// Outcome is sent (Stripe accepted it, now or earlier), failed
	// (retried on the next tick) or too_old (never sent).
	Outcome string `json:"outcome"`
	// Error is why a failed hour failed.
	Error string `json:"error,omitempty"`
}

// ErrLeaseLost is returned when another reporter took the lease during a
// tick.
var ErrLeaseLost = errors.New("stripe reporter lease lost")

// Lease is the reporter's lease.
func (r *Reporter) Lease() store.Lease {
	return store.Lease{Name: LeaseName, Holder: r.Holder, TTL: r.LeaseTTL}
}

func (r *Reporter) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

func (r *Reporter) logger() *zap.Logger {
	if r.Logger == nil {
		return zap.NewNop()
	}
	return r.Logger
}

// Tick takes or renews the lease and, when it holds it, reports every
// closed, unsent hour with billed units of every customer with a Stripe
// id. When Stripe stays unreachable for an event, the tick stops and the
// rest waits for the next one. With a store that indexes the customers
// metered per hour, a tick reads only the customers that may have such an
// hour (see active.go).
func (r *Reporter) Tick(ctx context.Context) (Result, error) {
	var res Result
	ok, err := r.Lease().Renew(ctx, r.Store)
	if err != nil || !ok {
		return res, err
	}
	res.Leader = true
	ns, err := r.namespace(ctx)
	if err != nil {
		return res, err
	}
	customers, commit, err := r.customers(ctx) // see active.go
	if err != nil {
		return res, err
	}
	retry := r.Retry
	if retry.Attempts == 0 {
		retry = DefaultRetry
	}
	halted := false // Stripe unreachable: count the rest as unreported
	var last time.Time
	for _, c := range customers {
		if c.StripeCustomerID == "" {
			continue
		}
		now := r.now()
		hours, err := r.hours(ctx, c, r.Periods(c, now), now)
		if err != nil {
			return res, err
		}
		for _, h := range hours {
			if h.mark != nil || !h.closed || h.billed <= 0 {
				res.unreport(h.meter, h.unreported())
				continue
			}
			id := c.ID + "|" + h.key()
			ident := r.identifier(ns, c, h)
			hr := HourResult{Customer: c.ID, StripeCustomerID: c.StripeCustomerID, Meter: h.meter, Hour: h.hourID, Units: h.billed, Identifier: ident}
			if now.Sub(h.timestamp) > MaxAge {
				res.TooOld++
				res.unreport(h.meter, h.billed)
				hr.Outcome = StateTooOld
				res.Hours = append(res.Hours, hr)
				r.logger().Error("usage hour is too old for Stripe and was never reported",
					zap.String("customer", c.ID), zap.String("meter", h.meter), zap.String("hour", h.hourID), zap.Int64("units", h.billed))
				if err := r.putMark(ctx, id, Mark{State: StateTooOld, Units: h.billed, Identifier: ident, At: now}, h.start); err != nil {
					return res, err
				}
				if h.failed != nil {
					// Settled: the index of failed hours need not bring
					// this customer back every run.
					_ = r.Store.DeleteRecord(ctx, KindFailed, id)
				}
				continue
			}
			if halted {
				res.unreport(h.meter, h.billed)
				continue
			}
			// Renew the lease before each event, so a long backlog never
			// outlives it, and stop if another reporter took over.
			if ok, err := r.Lease().Renew(ctx, r.Store); err != nil || !ok {
				if err == nil {
					err = ErrLeaseLost
				}
				return res, err
			}
			if wait := r.MinInterval - time.Since(last); r.MinInterval > 0 && wait > 0 {
				if err := retry.sleep(ctx, wait); err != nil {
					return res, err
				}
			}
			if h.tried == "" {
				// Pin the identifier before the first try: whatever
				// changes before the hour is accepted, it is sent
				// under this one.
				data, _ := json.Marshal(try{Identifier: ident, At: r.now()})
				if _, err := r.Store.PutRecord(ctx, store.Record{Kind: KindTry, ID: id, Data: data, Expires: h.start.Add(markTTL)}, false); err != nil {
					return res, fmt.Errorf("writing the Stripe identifier of %s: %w", id, err)
				}
			}
			last = time.Now()
			out, sendErr := Send(ctx, r.Client, Event{
				Meter: h.event, StripeCustomerID: c.StripeCustomerID, Value: h.billed,
				Timestamp: h.timestamp, Identifier: ident,
			}, retry)
			if out == Accepted {
				if err := r.putMark(ctx, id, Mark{State: StateSent, Units: h.billed, Identifier: ident, At: r.now()}, h.start); err != nil {
					return res, err
				}
				if h.failed != nil {
					_ = r.Store.DeleteRecord(ctx, KindFailed, id)
				}
				_ = r.Store.DeleteRecord(ctx, KindTry, id) // the mark holds the identifier now
				res.Sent++
				hr.Outcome = StateSent
				res.Hours = append(res.Hours, hr)
				continue
			}
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			res.Failed++
			res.unreport(h.meter, h.billed)
			hr.Outcome, hr.Error = StateFailed, sendErr.Error()
			res.Hours = append(res.Hours, hr)
			r.logger().Error("reporting usage to Stripe failed",
				zap.String("customer", c.ID), zap.String("meter", h.meter), zap.String("hour", h.hourID), zap.Int64("units", h.billed),
				zap.Bool("will_retry", true), zap.Error(sendErr))
			data, _ := json.Marshal(failure{Error: sendErr.Error(), At: r.now()})
			if _, err := r.Store.PutRecord(ctx, store.Record{Kind: KindFailed, ID: id, Data: data, Expires: h.start.Add(markTTL)}, false); err != nil {
				return res, err
			}
			halted = out == Retryable
		}
	}
	if !halted {
		return res, commit(ctx)
	}
	return res, nil
}

func (r *Reporter) putMark(ctx context.Context, id string, m Mark, hour time.Time) error {
	data, _ := json.Marshal(m)
	_, err := r.Store.PutRecord(ctx, store.Record{Kind: KindSent, ID: id, Data: data, Expires: hour.Add(markTTL)}, false)
	if err != nil {
		return fmt.Errorf("writing the Stripe mark of %s: %w", id, err)
	}
	return nil
}

// hourState is one ledger hour of a customer's meter with its report
// state.
type hourState struct {
	// meter is the meter's name, "" for the default meter; event its
	// Stripe event name.
	meter     string
	event     string
	hourID    string
	start     time.Time
	timestamp time.Time // the event timestamp: the hour's last second
	closed    bool
	billed    int64
	mark      *Mark
	failed    *failure
	tried     string // the identifier pinned before the first try
}

// key identifies the hour among the customer's records: "<hour>" for the
// default meter (as before meters existed), "<meter>|<hour>" for another.
func (h hourState) key() string {
	if h.meter == "" {
		return h.hourID
	}
	return h.meter + "|" + h.hourID
}

// unreported is the units of the hour Stripe has not accepted, as far as
// its records tell: a too-old hour's units, and what a sent hour's ledger
// gained after it was sent (a settlement later than settle_grace).
func (h hourState) unreported() int64 {
	switch {
	case h.mark == nil:
		return 0
	case h.mark.State == StateTooOld:
		return h.billed
	}
	return max(0, h.billed-h.mark.Units)
}

// namespace is the configured namespace, else the store's.
func (r *Reporter) namespace(ctx context.Context) (string, error) {
	if r.Namespace != "" {
		return r.Namespace, nil
	}
	return StoredNamespace(ctx, r.Store)
}

// identifier is the identifier an hour is (or was) sent under: the one
// its mark or its pinned try records, the legacy one when a version before
// namespaces tried it (it left a failure and no try), else a new one.
func (r *Reporter) identifier(ns string, c store.Customer, h hourState) string {
	switch {
	case h.mark != nil && h.mark.Identifier != "":
		return h.mark.Identifier
	case h.tried != "":
		return h.tried
	case h.failed != nil && h.meter == "":
		return LegacyIdentifier(c.ID, r.Meter, h.hourID)
	}
	return Identifier(ns, c.ID, c.StripeCustomerID, h.event, h.hourID)
}

// hours reads a customer's ledger hours of the given periods with their
// marks and failures.
func (r *Reporter) hours(ctx context.Context, c store.Customer, periods []string, now time.Time) ([]hourState, error) {
	marks, err := r.Store.ListRecords(ctx, KindSent, c.ID+"|")
	if err != nil {
		return nil, fmt.Errorf("listing Stripe marks of %q: %w", c.ID, err)
	}
	fails, err := r.Store.ListRecords(ctx, KindFailed, c.ID+"|")
	if err != nil {
		return nil, fmt.Errorf("listing Stripe failures of %q: %w", c.ID, err)
	}
	markBy := make(map[string]*Mark, len(marks))
	for _, rec := range marks {
		var m Mark
		if json.Unmarshal(rec.Data, &m) == nil {
			markBy[strings.TrimPrefix(rec.ID, c.ID+"|")] = &m
		}
	}
	failBy := make(map[string]*failure, len(fails))
	for _, rec := range fails {
		var f failure
		if json.Unmarshal(rec.Data, &f) == nil {
			failBy[strings.TrimPrefix(rec.ID, c.ID+"|")] = &f
		}
	}
	tries, err := r.Store.ListRecords(ctx, KindTry, c.ID+"|")
	if err != nil {
		return nil, fmt.Errorf("listing Stripe identifiers of %q: %w", c.ID, err)
	}
	triedBy := make(map[string]string, len(tries))
	for _, rec := range tries {
		var t try
		if json.Unmarshal(rec.Data, &t) == nil && t.Identifier != "" {
			triedBy[strings.TrimPrefix(rec.ID, c.ID+"|")] = t.Identifier
		}
	}
	var out []hourState
	index := make(map[string]int)
	for _, pid := range periods {
		u, err := r.Store.Usage(ctx, c.ID, pid)
		if err != nil {
			return nil, fmt.Errorf("reading the usage of %q: %w", c.ID, err)
		}
		add := func(meter, event string, hours []store.HourUsage) {
			for _, h := range hours {
				start, err := metering.ParseTimeID(h.HourID)
				if err != nil {
					continue
				}
				st := hourState{meter: meter, event: event, hourID: h.HourID}
				// A period boundary inside a UTC hour (a zone with a
				// half-hour offset) splits the hour over two periods:
				// it is still one meter event.
				if i, dup := index[st.key()]; dup {
					out[i].billed += h.Billed
					continue
				}
				index[st.key()] = len(out)
				st.start, st.timestamp = start, start.Add(time.Hour-time.Second)
				st.closed = !now.Before(start.Add(time.Hour + r.SettleGrace))
				st.billed, st.mark, st.failed, st.tried = h.Billed, markBy[st.key()], failBy[st.key()], triedBy[st.key()]
				out = append(out, st)
			}
		}
		add("", r.Meter, u.Hours)
		for _, m := range r.Meters {
			add(m.Meter, m.Event, u.Meter(m.Meter).Hours)
		}
	}
	return out, nil
}
