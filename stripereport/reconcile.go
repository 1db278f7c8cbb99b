package stripereport

import (
	"context"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// ReconcileRow is one customer hour of one meter in the reconciliation.
type ReconcileRow struct {
	// Customer is the customer id; StripeCustomerID its Stripe id.
	Customer         string `json:"customer"`
	StripeCustomerID string `json:"stripe_customer_id"`
	// Meter names the row's meter; empty for the default meter.
	Meter string `json:"meter,omitempty"`
	// Hour is the UTC hour (metering.TimeID form).
	Hour string `json:"hour"`
	// LedgerUnits is the hour's billed units in the ledger.
	LedgerUnits int64 `json:"ledger_units"`
	// ReportedUnits is the value Stripe accepted for the hour (0 unless
	// sent).
	ReportedUnits int64 `json:"reported_units"`
	// State is sent, pending (not yet closed or not yet tried), failed
	// (last try failed; retried on the next tick) or too_old (outside
	// Stripe's 35-day window, never sent).
	State string `json:"state"`
	// Closed reports that the hour ended settle_grace ago or more: it is
	// reported on the next tick if it is not yet.
	Closed bool `json:"closed"`
	// Identifier is the hour's meter event identifier: the one it was
	// sent (or first tried) under, else the one it will be sent under.
	Identifier string `json:"identifier"`
	// Error is the last error of a failed hour.
	Error string `json:"error,omitempty"`
	// SentAt is when Stripe accepted the hour.
	SentAt time.Time `json:"sent_at,omitzero"`
}

// PendingUnits are the units of a row Stripe is not expected to have yet:
// the whole hour while it is pending (open, or closed and not yet tried).
func (row ReconcileRow) PendingUnits() int64 {
	if row.State == StatePending {
		return row.LedgerUnits
	}
	return 0
}

// UnreportedUnits are the units of a closed row Stripe has not accepted:
// the whole hour when it failed or is too old, and what a sent hour's
// ledger gained after it was sent. These are what the reporter's
// Result.Unreported counts, except that a tick which stopped because Stripe
// stopped answering also counts the closed hours it left for the next tick,
// which are pending here.
func (row ReconcileRow) UnreportedUnits() int64 {
	switch row.State {
	case StateFailed, StateTooOld:
		return row.LedgerUnits
	case StateSent:
		return max(0, row.LedgerUnits-row.ReportedUnits)
	}
	return 0
}

// ReconcileInput is one customer and the period to reconcile.
type ReconcileInput struct {
	Customer store.Customer
	PeriodID string
}

// Reconcile lists, per customer and ledger hour of the given periods, the
// ledger's units, the units Stripe accepted and the hour's state. Hours
// with no billed units and nothing reported are left out, as the reporter
// sends nothing for them. Customers without a Stripe id are left out.
func (r *Reporter) Reconcile(ctx context.Context, in []ReconcileInput) ([]ReconcileRow, error) {
	now := r.now()
	ns, err := r.namespace(ctx)
	if err != nil {
		return nil, err
	}
	rows := []ReconcileRow{}
	for _, ci := range in {
		c := ci.Customer
		if c.StripeCustomerID == "" {
			continue
		}
		hours, err := r.hours(ctx, c, []string{ci.PeriodID}, now)
		if err != nil {
			return nil, err
		}
		for _, h := range hours {
			row := ReconcileRow{
				Customer: c.ID, StripeCustomerID: c.StripeCustomerID, Meter: h.meter, Hour: h.hourID,
				LedgerUnits: h.billed, Identifier: r.identifier(ns, c, h), State: StatePending, Closed: h.closed,
			}
			switch {
			case h.mark != nil && h.mark.State == StateSent:
				row.State, row.ReportedUnits, row.SentAt = StateSent, h.mark.Units, h.mark.At
			case h.mark != nil:
				row.State = StateTooOld
			case h.billed <= 0:
				continue
			case h.failed != nil:
				row.State, row.Error = StateFailed, h.failed.Error
			case h.closed && now.Sub(h.timestamp) > MaxAge:
				row.State = StateTooOld
			}
			rows = append(rows, row)
		}
	}
	return rows, nil
}
