package module

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// reconciliationView is the answer of GET
// /api_monetize/stripe/reconciliation.
type reconciliationView struct {
	// Period is the month asked for ("" = each customer's current period).
	Period string `json:"period,omitempty"`
	// Namespace is the namespace of this deployment's meter event
	// identifiers (configured, or generated and kept in the store).
	Namespace string `json:"namespace"`
	// LedgerUnits and ReportedUnits total the default meter's rows (each
	// other meter's are totalled in Meters).
	LedgerUnits   int64 `json:"ledger_units"`
	ReportedUnits int64 `json:"reported_units"`
	// PendingUnits are units Stripe is not expected to have yet: hours
	// not closed, or closed and not tried yet.
	PendingUnits int64 `json:"pending_units"`
	// UnreportedUnits are closed units Stripe has not accepted: failed and
	// too-old hours, and what sent hours gained after they were sent. It
	// is what the caddy_api_monetize_unreported_units metric counts, so an
	// alert on it does not fire for the hour in progress.
	UnreportedUnits int64 `json:"unreported_units"`
	// Meters total the rows of each other meter (docs/meters.md), in the
	// order their rows come.
	Meters []meterReconciliation `json:"meters,omitempty"`
	// Hours are the customer hours, by customer, then meter (the default
	// meter's first), then hour.
	Hours []stripereport.ReconcileRow `json:"hours"`
}

// meterReconciliation totals one meter's rows of the reconciliation.
type meterReconciliation struct {
	Meter           string `json:"meter"`
	LedgerUnits     int64  `json:"ledger_units"`
	ReportedUnits   int64  `json:"reported_units"`
	PendingUnits    int64  `json:"pending_units"`
	UnreportedUnits int64  `json:"unreported_units"`
}

// stripeReconciliation lists, per customer with a Stripe id and ledger
// hour of the period starting in ?period=YYYY-MM (default: the current
// period), the ledger's units, the units Stripe accepted and the state.
func (a *adminAPI) stripeReconciliation(w http.ResponseWriter, r *http.Request) error {
	if a.app.Stripe == nil {
		return apiError(http.StatusNotFound, "stripe is not configured")
	}
	s, err := a.app.stripeSettings()
	if err != nil {
		return apiError(http.StatusInternalServerError, err.Error())
	}
	month := r.URL.Query().Get("period")
	var y int
	var m time.Month
	if month != "" {
		if y, m, err = metering.ParseMonth(month); err != nil {
			return apiError(http.StatusBadRequest, "period: expected YYYY-MM")
		}
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	customers, err := st.ListCustomers(r.Context())
	if err != nil {
		return err
	}
	now := time.Now()
	var in []stripereport.ReconcileInput
	for _, c := range customers {
		t := a.app.tierByName[c.Tier]
		if t == nil || c.StripeCustomerID == "" {
			continue
		}
		p := t.periodRule.Period(now, c.BillingAnchor())
		if month != "" {
			var ok bool
			if p, ok = t.periodRule.StartingIn(y, m, c.BillingAnchor()); !ok {
				continue
			}
		}
		in = append(in, stripereport.ReconcileInput{Customer: c, PeriodID: p.ID()})
	}
	rep := a.app.newReporter(s)
	rep.Store = st
	rows, err := rep.Reconcile(r.Context(), in)
	if err != nil {
		return err
	}
	ns := s.namespace
	if ns == "" {
		if ns, err = stripereport.StoredNamespace(r.Context(), st); err != nil {
			return err
		}
	}
	v := reconciliationView{Period: month, Namespace: ns, Hours: rows}
	for _, row := range rows {
		if row.Meter == "" {
			v.LedgerUnits += row.LedgerUnits
			v.ReportedUnits += row.ReportedUnits
			v.PendingUnits += row.PendingUnits()
			v.UnreportedUnits += row.UnreportedUnits()
			continue
		}
		i := slices.IndexFunc(v.Meters, func(m meterReconciliation) bool { return m.Meter == row.Meter })
		if i < 0 {
			i = len(v.Meters)
			v.Meters = append(v.Meters, meterReconciliation{Meter: row.Meter})
		}
		m := &v.Meters[i]
		m.LedgerUnits += row.LedgerUnits
		m.ReportedUnits += row.ReportedUnits
		m.PendingUnits += row.PendingUnits()
		m.UnreportedUnits += row.UnreportedUnits()
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

// reportView is the answer of POST /api_monetize/stripe/report.
type reportView struct {
	// Sent, Failed and TooOld count the hours of the pass by outcome.
	Sent   int `json:"sent"`
	Failed int `json:"failed"`
	TooOld int `json:"too_old"`
	// UnreportedUnits are the closed units Stripe has not accepted after
	// the pass (as the caddy_api_monetize_unreported_units metric).
	UnreportedUnits int64 `json:"unreported_units"`
	// Hours are the hours the pass sent, failed or found too old.
	Hours []stripereport.HourResult `json:"hours"`
	// Error is why the pass stopped early, if it did.
	Error string `json:"error,omitempty"`
}

// stripeReport runs one reporter pass now and answers what it did. The
// pass runs in the reporter's own loop, with its lease: on an instance
// that does not hold the lease it answers 409 and sends nothing.
func (a *adminAPI) stripeReport(w http.ResponseWriter, r *http.Request) error {
	run := a.app.stripeRun
	if a.app.Stripe == nil || run == nil {
		return apiError(http.StatusNotFound, "stripe is not configured")
	}
	reply := make(chan stripePass, 1)
	select {
	case run.passes <- func(ctx context.Context) {
		res, err := run.pass(ctx)
		reply <- stripePass{res: res, err: err}
	}:
	case <-run.done:
		return apiError(http.StatusServiceUnavailable, "the Stripe reporter of this configuration has stopped")
	case <-r.Context().Done():
		return nil
	}
	var p stripePass
	select {
	case p = <-reply:
	case <-r.Context().Done():
		return nil // the pass goes on; its result is in the metrics and the reconciliation
	}
	if !p.res.Leader && (p.err == nil || errors.Is(p.err, stripereport.ErrLeaseLost)) {
		return apiError(http.StatusConflict, "another instance holds the Stripe reporter lease and reports; run this on that instance, or wait for its next run")
	}
	v := reportView{Sent: p.res.Sent, Failed: p.res.Failed, TooOld: p.res.TooOld, UnreportedUnits: p.res.Unreported, Hours: p.res.Hours}
	if v.Hours == nil {
		v.Hours = []stripereport.HourResult{}
	}
	status := http.StatusOK
	if p.err != nil {
		v.Error = p.err.Error()
		switch {
		case errors.Is(p.err, stripereport.ErrLeaseLost):
			status = http.StatusConflict
		case errors.Is(p.err, store.ErrUnavailable):
			status = http.StatusServiceUnavailable
		default:
			status = http.StatusInternalServerError
		}
	}
	writeJSON(w, status, v)
	return nil
}
