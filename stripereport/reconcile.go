package stripereport

import (
	"context"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// ReconcileRow is one customer hour of the reconciliation.
type ReconcileRow struct {
	// Customer is the customer id; StripeCustomerID its Stripe id.
	Customer         string `json:"customer"`
	StripeCustomerID string `json:"stripe_customer_id"`
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
	// Identifier is the hour's meter event identifier.
	Identifier string `json:"identifier"`
	// Error is the last error of a failed hour.
	Error string `json:"error,omitempty"`
	// SentAt is when Stripe accepted the hour.
	SentAt time.Time `json:"sent_at,omitzero"`
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
				Customer: c.ID, StripeCustomerID: c.StripeCustomerID, Hour: h.hourID,
				LedgerUnits: h.billed, Identifier: Identifier(c.ID, r.Meter, h.hourID), State: StatePending,
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
