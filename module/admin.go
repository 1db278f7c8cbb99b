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
	route := func(pattern string, h adminHandler) { mux.HandleFunc(pattern, serveAdmin(h)) }
	route("GET /api_monetize/tiers", a.listTiers)
	route("GET /api_monetize/customers", a.withStore(a.listCustomers))
	route("POST /api_monetize/customers", a.writable(a.createCustomer))
	route("GET /api_monetize/customers/{id}", a.withStore(a.getCustomer))
	route("PUT /api_monetize/customers/{id}/tier", a.writable(a.setTier))
	route("GET /api_monetize/customers/{id}/keys", a.withStore(a.listKeys))
	route("POST /api_monetize/customers/{id}/keys", a.writable(a.createKey))
	route("GET /api_monetize/keys/{id}", a.withStore(a.getKey))
	route("PATCH /api_monetize/keys/{id}", a.writable(a.patchKey))
	route("POST /api_monetize/keys/{id}/roll", a.writable(a.rollKey))
	route("DELETE /api_monetize/keys/{id}", a.writable(a.withStore(a.revokeKey)))
	route("GET /api_monetize/audit", a.listAudit)
	route("GET /api_monetize/customers/{id}/usage", a.withStore(a.usage))
	route("GET /api_monetize/thresholds", a.withStore(a.thresholds))
	route("GET /api_monetize/customers/{id}/thresholds", a.withStore(a.thresholds))
	route("GET /api_monetize/stripe/reconciliation", a.stripeReconciliation)
	route("POST /api_monetize/stripe/report", a.writable(a.stripeReport))
	route("GET /api_monetize/notifications", a.withStore(a.listNotifications))
	route("POST /api_monetize/notifications/{id}/replay", a.writable(a.withStore(a.replayNotification)))
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

// adminHandler is an admin endpoint, as Caddy's own (caddy.AdminHandler):
// it writes its answer, or returns the error to answer with (see
// writeAPIError).
type adminHandler func(w http.ResponseWriter, r *http.Request) error

// storeHandler is an admin endpoint that works on the store (see
// withStore).
type storeHandler func(w http.ResponseWriter, r *http.Request, st store.Store) error

// serveAdmin adapts h to the mux, answering its error with the body Caddy
// writes for a caddy.APIError, {"error": "…"}. It writes the error itself,
// rather than handing it back to Caddy's admin server, because Caddy logs
// every error it answers at error level: a client's 400 or a store outage's
// 503 is not an error of this process.
func serveAdmin(h adminHandler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := h(w, r); err != nil {
			writeAPIError(w, err)
		}
	}
}

// withStore opens the store before h runs: 503 while it is unavailable.
func (a *adminAPI) withStore(h storeHandler) adminHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		st, err := a.app.store()
		if err != nil {
			return err
		}
		return h(w, r, st)
	}
}

// writable refuses changes unless admin_api is read_write.
func (a *adminAPI) writable(next adminHandler) adminHandler {
	return func(w http.ResponseWriter, r *http.Request) error {
		if a.app.AdminAPI != "read_write" {
			return apiError(http.StatusForbidden, "changes through the admin API are disabled; set `admin_api read_write` in the api_monetize global option to enable them")
		}
		return next(w, r)
	}
}

// apiError is an admin answer with status and message.
func apiError(status int, msg string) error {
	return caddy.APIError{HTTPStatus: status, Err: errors.New(msg)}
}

// writeAPIError answers err as Caddy's admin server answers an error: a
// caddy.APIError with its status and message; any other error with the
// status of a store error (404 not found, 503 unavailable, else 500).
func writeAPIError(w http.ResponseWriter, err error) {
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
		switch {
		case errors.Is(err, store.ErrNotFound):
			apiErr.HTTPStatus = http.StatusNotFound
		case errors.Is(err, store.ErrUnavailable):
			apiErr.HTTPStatus = http.StatusServiceUnavailable
		}
	}
	if apiErr.HTTPStatus == 0 {
		apiErr.HTTPStatus = http.StatusInternalServerError
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	writeJSON(w, apiErr.HTTPStatus, apiErr)
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

func (a *adminAPI) listTiers(w http.ResponseWriter, _ *http.Request) error {
	writeJSON(w, http.StatusOK, a.app.Tiers)
	return nil
}

func (a *adminAPI) listCustomers(w http.ResponseWriter, r *http.Request, st store.Store) error {
	cs, err := st.ListCustomers(r.Context())
	if err != nil {
		return err
	}
	if cs == nil {
		cs = []store.Customer{}
	}
	writeJSON(w, http.StatusOK, cs)
	return nil
}

func (a *adminAPI) createCustomer(w http.ResponseWriter, r *http.Request) error {
	var in struct {
		ID               string `json:"id"`
		Tier             string `json:"tier"`
		Email            string `json:"email"`
		StripeCustomerID string `json:"stripe_customer_id"`
		Anchor           string `json:"anchor"`
	}
	if err := decodeJSON(w, r, &in); err != nil {
		return err
	}
	if !customerIDPattern.MatchString(in.ID) {
		return apiError(http.StatusBadRequest, "id: expected 1-128 characters of letters, digits, and _ . @ - (starting with a letter or digit)")
	}
	if err := a.checkTier(in.Tier); err != nil {
		return err
	}
	if in.Email != "" {
		if err := checkEmail(in.Email); err != nil {
			return apiError(http.StatusBadRequest, "email: "+err.Error())
		}
	}
	if in.StripeCustomerID != "" {
		if err := checkStripeCustomerID(in.StripeCustomerID); err != nil {
			return apiError(http.StatusBadRequest, "stripe_customer_id: "+err.Error())
		}
	}
	now := time.Now().UTC()
	anchor := now.Truncate(24 * time.Hour)
	if in.Anchor != "" {
		t, err := time.Parse(time.DateOnly, in.Anchor)
		if err != nil {
			return apiError(http.StatusBadRequest, "anchor: expected a date as YYYY-MM-DD")
		}
		anchor = t
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	c := store.Customer{ID: in.ID, Tier: in.Tier, Email: in.Email, StripeCustomerID: in.StripeCustomerID, Anchor: anchor, CreatedAt: now}
	if err := st.CreateCustomer(r.Context(), c); err != nil {
		if _, getErr := st.GetCustomer(r.Context(), in.ID); getErr == nil {
			return apiError(http.StatusConflict, fmt.Sprintf("customer %q already exists", in.ID))
		}
		return err
	}
	a.app.invalidateKeys()
	writeJSON(w, http.StatusCreated, c)
	return nil
}

func (a *adminAPI) getCustomer(w http.ResponseWriter, r *http.Request, st store.Store) error {
	c, err := st.GetCustomer(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	keys, err := st.ListKeys(r.Context(), c.ID)
	if err != nil {
		return err
	}
	v := customerView{Customer: c}
	for _, k := range keys {
		v.Keys = append(v.Keys, newKeyView(k))
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (a *adminAPI) setTier(w http.ResponseWriter, r *http.Request) error {
	var in struct {
		Tier string `json:"tier"`
	}
	if err := decodeJSON(w, r, &in); err != nil {
		return err
	}
	if err := a.checkTier(in.Tier); err != nil {
		return err
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	c, err := st.SetTier(r.Context(), r.PathValue("id"), in.Tier)
	if err != nil {
		return err
	}
	a.app.invalidateKeys()
	writeJSON(w, http.StatusOK, c)
	return nil
}

func (a *adminAPI) listKeys(w http.ResponseWriter, r *http.Request, st store.Store) error {
	id := r.PathValue("id")
	if _, err := st.GetCustomer(r.Context(), id); err != nil {
		return err
	}
	keys, err := st.ListKeys(r.Context(), id)
	if err != nil {
		return err
	}
	views := make([]keyView, 0, len(keys))
	for _, k := range keys {
		views = append(views, newKeyView(k))
	}
	writeJSON(w, http.StatusOK, views)
	return nil
}

func (a *adminAPI) revokeKey(w http.ResponseWriter, r *http.Request, st store.Store) error {
	k, err := a.app.revokeKeyAs(r.Context(), st, r.PathValue("id"), actorAdminAPI, r.RemoteAddr)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, newKeyView(k))
	return nil
}

func (a *adminAPI) usage(w http.ResponseWriter, r *http.Request, st store.Store) error {
	c, err := st.GetCustomer(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	view, status, msg := a.app.usageView(r.Context(), st, c, r.URL.Query().Get("period"))
	if status != http.StatusOK {
		return apiError(status, msg)
	}
	writeJSON(w, http.StatusOK, view)
	return nil
}

// thresholds lists the threshold outbox: every (customer, period,
// threshold) crossed, once each.
func (a *adminAPI) thresholds(w http.ResponseWriter, r *http.Request, st store.Store) error {
	events, err := st.ThresholdEvents(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	if events == nil {
		events = []store.ThresholdEvent{}
	}
	writeJSON(w, http.StatusOK, events)
	return nil
}

// checkTier refuses (400) a tier that is not configured.
func (a *adminAPI) checkTier(tier string) error {
	if _, ok := a.app.tierByName[tier]; ok {
		return nil
	}
	names := make([]string, 0, len(a.app.tiers))
	for _, t := range a.app.tiers {
		names = append(names, t.Name)
	}
	return apiError(http.StatusBadRequest, fmt.Sprintf("tier: expected one of %q, got %q", names, tier))
}

// decodeJSON reads a JSON body of at most 1 MiB into v: 400 when it is not
// valid or has unknown fields.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return apiError(http.StatusBadRequest, "invalid JSON body: "+err.Error())
	}
	return nil
}

// writeAdminError answers status with {"error": msg}, as writeAPIError.
func writeAdminError(w http.ResponseWriter, status int, msg string) {
	writeAPIError(w, apiError(status, msg))
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
