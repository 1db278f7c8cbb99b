package module

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves /api_monetize/ on Caddy's admin endpoint: customers,
// tiers and keys. Reads are always available; changes only when the app's
// admin_api is read_write.
type adminAPI struct {
	app *App
	mux *http.ServeMux
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.api_monetize",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision finds the api_monetize app of the config being loaded, if any.
// Caddy provisions admin modules on every config load and never cleans them
// up, so this holds nothing that needs releasing.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	if app, err := ctx.AppIfConfigured("api_monetize"); err == nil {
		a.app = app.(*App)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api_monetize/tiers", a.listTiers)
	mux.HandleFunc("GET /api_monetize/customers", a.listCustomers)
	mux.HandleFunc("POST /api_monetize/customers", a.writable(a.createCustomer))
	mux.HandleFunc("GET /api_monetize/customers/{id}", a.getCustomer)
	mux.HandleFunc("PUT /api_monetize/customers/{id}/tier", a.writable(a.setTier))
	mux.HandleFunc("GET /api_monetize/customers/{id}/keys", a.listKeys)
	mux.HandleFunc("POST /api_monetize/customers/{id}/keys", a.writable(a.createKey))
	mux.HandleFunc("GET /api_monetize/keys/{id}", a.getKey)
	mux.HandleFunc("PATCH /api_monetize/keys/{id}", a.writable(a.patchKey))
	mux.HandleFunc("POST /api_monetize/keys/{id}/roll", a.writable(a.rollKey))
	mux.HandleFunc("DELETE /api_monetize/keys/{id}", a.writable(a.revokeKey))
	mux.HandleFunc("GET /api_monetize/audit", a.listAudit)
	mux.HandleFunc("GET /api_monetize/customers/{id}/usage", a.usage)
	mux.HandleFunc("GET /api_monetize/thresholds", a.thresholds)
	mux.HandleFunc("GET /api_monetize/customers/{id}/thresholds", a.thresholds)
	mux.HandleFunc("GET /api_monetize/stripe/reconciliation", a.stripeReconciliation)
	mux.HandleFunc("POST /api_monetize/stripe/report", a.writable(a.stripeReport))
	mux.HandleFunc("GET /api_monetize/notifications", a.listNotifications)
	mux.HandleFunc("POST /api_monetize/notifications/{id}/replay", a.writable(a.replayNotification))
	a.mux = mux
	return nil
}

// Routes returns the admin routes.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{
		Pattern: "/api_monetize/",
		Handler: caddy.AdminHandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			if a.app == nil {
				return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("the api_monetize app is not configured")}
			}
			a.mux.ServeHTTP(w, r)
			return nil
		}),
	}}
}

// writable refuses changes unless admin_api is read_write.
func (a *adminAPI) writable(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if a.app.AdminAPI != "read_write" {
			writeAdminError(w, http.StatusForbidden, "changes through the admin API are disabled; set `admin_api read_write` in the api_monetize global option to enable them")
			return
		}
		next(w, r)
	}
}

// customerView is a customer as the admin API shows it.
type customerView struct {
	store.Customer
	Keys []keyView `json:"keys,omitempty"`
}

// keyView is a key as the admin API lists it: never the key or its hash.
type keyView struct {
	ID         string     `json:"id"`
	CustomerID string     `json:"customer_id"`
	Prefix     string     `json:"prefix"`
	Name       string     `json:"name"`
	CreatedAt  time.Time  `json:"created_at"`
	ExpiresAt  *time.Time `json:"expires_at"`
	RevokedAt  *time.Time `json:"revoked_at"`
	LastUsedAt *time.Time `json:"last_used_at"`
	// Status is active, expiring (within 7 days), expired or revoked.
	Status string `json:"status"`
	// Key is the key itself, present only in the response that issued it.
	Key string `json:"key,omitempty"`
	// Replaces is the key a roll replaced, in the roll's response.
	Replaces string `json:"replaces,omitempty"`
}

func newKeyView(k store.Key) keyView {
	return keyView{
		ID: k.ID, CustomerID: k.CustomerID, Prefix: k.Prefix, Name: k.Name, CreatedAt: k.CreatedAt,
		ExpiresAt: timeOrNil(k.ExpiresAt), RevokedAt: timeOrNil(k.RevokedAt), LastUsedAt: timeOrNil(k.LastUsedAt),
		Status: k.Status(clockNow()),
	}
}

// timeOrNil is nil for the zero time, so that JSON shows null.
func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

var customerIDPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$`)

func (a *adminAPI) listTiers(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, a.app.Tiers)
}

func (a *adminAPI) listCustomers(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	cs, err := st.ListCustomers(r.Context())
	if err != nil {
		writeStoreError(w, err)
		return
	}
	if cs == nil {
		cs = []store.Customer{}
	}
	writeJSON(w, http.StatusOK, cs)
}

func (a *adminAPI) createCustomer(w http.ResponseWriter, r *http.Request) {
	var in struct {
		ID               string `json:"id"`
		Tier             string `json:"tier"`
		Email            string `json:"email"`
		StripeCustomerID string `json:"stripe_customer_id"`
		Anchor           string `json:"anchor"`
	}
	if !decodeJSON(w, r, &in) {
		return
	}
	if !customerIDPattern.MatchString(in.ID) {
		writeAdminError(w, http.StatusBadRequest, "id: expected 1-128 characters of letters, digits, and _ . @ - (starting with a letter or digit)")
		return
	}
	if !a.checkTier(w, in.Tier) {
		return
	}
	if in.Email != "" {
		if err := checkEmail(in.Email); err != nil {
			writeAdminError(w, http.StatusBadRequest, "email: "+err.Error())
			return
		}
	}
	if in.StripeCustomerID != "" {
		if err := checkStripeCustomerID(in.StripeCustomerID); err != nil {
			writeAdminError(w, http.StatusBadRequest, "stripe_customer_id: "+err.Error())
			return
		}
	}
	now := time.Now().UTC()
	anchor := now.Truncate(24 * time.Hour)
	if in.Anchor != "" {
		t, err := time.Parse(time.DateOnly, in.Anchor)
		if err != nil {
			writeAdminError(w, http.StatusBadRequest, "anchor: expected a date as YYYY-MM-DD")
			return
		}
		anchor = t
	}
	st, ok := a.store(w)
	if !ok {
		return
	}
	c := store.Customer{ID: in.ID, Tier: in.Tier, Email: in.Email, StripeCustomerID: in.StripeCustomerID, Anchor: anchor, CreatedAt: now}
	if err := st.CreateCustomer(r.Context(), c); err != nil {
		if _, getErr := st.GetCustomer(r.Context(), in.ID); getErr == nil {
			writeAdminError(w, http.StatusConflict, fmt.Sprintf("customer %q already exists", in.ID))
			return
		}
		writeStoreError(w, err)
		return
	}
	a.app.shared.registry.invalidate()
	writeJSON(w, http.StatusCreated, c)
}

func (a *adminAPI) getCustomer(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	c, err := st.GetCustomer(r.Context(), r.PathValue("id"))
	if err != nil {
		writeStoreError(w, err)
		return
	}
	keys, err := st.ListKeys(r.Context(), c.ID)
	if err != nil {
		writeStoreError(w, err)
		return
	}
	v := customerView{Customer: c}
	for _, k := range keys {
		v.Keys = append(v.Keys, newKeyView(k))
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *adminAPI) setTier(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Tier string `json:"tier"`
	}
	if !decodeJSON(w, r, &in) || !a.checkTier(w, in.Tier) {
		return
	}
	st, ok := a.store(w)
	if !ok {
		return
	}
	c, err := st.SetTier(r.Context(), r.PathValue("id"), in.Tier)
	if err != nil {
		writeStoreError(w, err)
		return
	}
	a.app.shared.registry.invalidate()
	writeJSON(w, http.StatusOK, c)
}

func (a *adminAPI) listKeys(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	id := r.PathValue("id")
	if _, err := st.GetCustomer(r.Context(), id); err != nil {
		writeStoreError(w, err)
		return
	}
	keys, err := st.ListKeys(r.Context(), id)
	if err != nil {
		writeStoreError(w, err)
		return
	}
	views := make([]keyView, 0, len(keys))
	for _, k := range keys {
		views = append(views, newKeyView(k))
	}
	writeJSON(w, http.StatusOK, views)
}

func (a *adminAPI) revokeKey(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	k, err := a.app.revokeKeyAs(r.Context(), st, r.PathValue("id"), actorAdminAPI, r.RemoteAddr)
	if err != nil {
		writeStoreError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, newKeyView(k))
}

func (a *adminAPI) usage(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	c, err := st.GetCustomer(r.Context(), r.PathValue("id"))
	if err != nil {
		writeStoreError(w, err)
		return
	}
	view, status, msg := a.app.usageView(r.Context(), st, c, r.URL.Query().Get("period"))
	if status != http.StatusOK {
		writeAdminError(w, status, msg)
		return
	}
	writeJSON(w, http.StatusOK, view)
}

// thresholds lists the threshold outbox: every (customer, period,
// threshold) crossed, once each.
func (a *adminAPI) thresholds(w http.ResponseWriter, r *http.Request) {
	st, ok := a.store(w)
	if !ok {
		return
	}
	events, err := st.ThresholdEvents(r.Context(), r.PathValue("id"))
	if err != nil {
		writeStoreError(w, err)
		return
	}
	if events == nil {
		events = []store.ThresholdEvent{}
	}
	writeJSON(w, http.StatusOK, events)
}

// checkTier answers 400 unless tier is configured.
func (a *adminAPI) checkTier(w http.ResponseWriter, tier string) bool {
	if _, ok := a.app.tierByName[tier]; ok {
		return true
	}
	names := make([]string, 0, len(a.app.tiers))
	for _, t := range a.app.tiers {
		names = append(names, t.Name)
	}
	writeAdminError(w, http.StatusBadRequest, fmt.Sprintf("tier: expected one of %q, got %q", names, tier))
	return false
}

func (a *adminAPI) store(w http.ResponseWriter) (store.Store, bool) {
	st, err := a.app.store()
	if err != nil {
		writeStoreError(w, err)
		return nil, false
	}
	return st, true
}

func decodeJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeAdminError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		return false
	}
	return true
}

func writeStoreError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, store.ErrNotFound):
		writeAdminError(w, http.StatusNotFound, err.Error())
	case errors.Is(err, store.ErrUnavailable):
		writeAdminError(w, http.StatusServiceUnavailable, err.Error())
	default:
		writeAdminError(w, http.StatusInternalServerError, err.Error())
	}
}

func writeAdminError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// Interface guards
var (
	_ caddy.Provisioner = (*adminAPI)(nil)
	_ caddy.AdminRouter = (*adminAPI)(nil)
)
