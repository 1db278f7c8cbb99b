package module

import (
	"net/http"
	"time"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

// reconciliationView is the answer of GET
// /api_monetize/stripe/reconciliation.
type reconciliationView struct {
	// Period is the month asked for ("" = each customer's current period).
	Period string `json:"period,omitempty"`
	// LedgerUnits, ReportedUnits and UnreportedUnits total the rows.
	LedgerUnits     int64 `json:"ledger_units"`
	ReportedUnits   int64 `json:"reported_units"`
	UnreportedUnits int64 `json:"unreported_units"`
	// Hours are the customer hours, by customer then hour.
	Hours []stripereport.ReconcileRow `json:"hours"`
}

// stripeReconciliation lists, per customer with a Stripe id and ledger
// hour of the period starting in ?period=YYYY-MM (default: the current
// period), the ledger's units, the units Stripe accepted and the state.
func (a *adminAPI) stripeReconciliation(w http.ResponseWriter, r *http.Request) {
	if a.app.Stripe == nil {
		writeAdminError(w, http.StatusNotFound, "stripe is not configured")
		return
	}
	s, err := a.app.stripeSettings()
	if err != nil {
		writeAdminError(w, http.StatusInternalServerError, err.Error())
		return
	}
	month := r.URL.Query().Get("period")
	var y int
	var m time.Month
	if month != "" {
		if y, m, err = metering.ParseMonth(month); err != nil {
			writeAdminError(w, http.StatusBadRequest, "period: expected YYYY-MM")
			return
		}
	}
	st, ok := a.store(w)
	if !ok {
		return
	}
	customers, err := st.ListCustomers(r.Context())
	if err != nil {
		writeStoreError(w, err)
		return
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
		writeStoreError(w, err)
		return
	}
	v := reconciliationView{Period: month, Hours: rows}
	for _, row := range rows {
		v.LedgerUnits += row.LedgerUnits
		v.ReportedUnits += row.ReportedUnits
		if row.State != stripereport.StateSent {
			v.UnreportedUnits += row.LedgerUnits
		}
	}
	writeJSON(w, http.StatusOK, v)
}
