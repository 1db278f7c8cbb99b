package portal

import (
	"bytes"
	"context"
	"fmt"
	"html/template"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

// pageNames are the pages, each templates/<name>.html on top of
// templates/layout.html.
var pageNames = []string{"error", "signin", "sent", "confirm", "keys", "key_shown", "usage", "plans", "team", "account"}

func (h *Handler) parseTemplates() error {
	funcs := template.FuncMap{
		"link": h.link,
		"date": func(t time.Time) string {
			if t.IsZero() {
				return "—"
			}
			return t.UTC().Format("2006-01-02")
		},
		"datetime": func(t time.Time) string {
			if t.IsZero() {
				return "never"
			}
			return t.UTC().Format("2006-01-02 15:04 UTC")
		},
		"deref": func(p *int64) int64 { return *p },
	}
	h.pages = make(map[string]*template.Template, len(pageNames))
	for _, name := range pageNames {
		t, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/"+name+".html")
		if err != nil {
			return fmt.Errorf("portal template %s: %w", name, err)
		}
		h.pages[name] = t
	}
	return nil
}

// page is what the layout shows around every page.
type page struct {
	Product, Logo, Docs string
	// Nav is the current section (keys, usage, plans); empty before
	// sign-in.
	Nav string
	// Session is the signed-in member, nil before sign-in.
	Session *session
	// Data is the page's own content.
	Data map[string]any
}

// render writes a page. Pages are never cached: they show a member's data
// or a one-time token.
func (h *Handler) render(w http.ResponseWriter, r *http.Request, status int, name string, s *session, data map[string]any) {
	var buf bytes.Buffer
	p := page{Product: h.cfg.ProductName, Logo: h.cfg.LogoURL, Docs: h.cfg.DocsURL, Session: s, Data: data}
	if s != nil {
		p.Nav = name
	}
	if err := h.pages[name].Execute(&buf, p); err != nil {
		h.log.Error("rendering a portal page", zap.String("page", name), zap.Error(err))
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// keyView is a key as the keys page lists it.
type keyView struct {
	store.Key
	// Status is active, expiring (with an expiry), expired or revoked.
	Status string
}

func (h *Handler) keysPage(w http.ResponseWriter, r *http.Request, s *session) {
	h.showKeys(w, r, s, http.StatusOK, "")
}

func (h *Handler) showKeys(w http.ResponseWriter, r *http.Request, s *session, status int, formError string) {
	keys, err := h.be.Keys(r.Context(), s.Customer)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	now := time.Now()
	views := make([]keyView, 0, len(keys))
	for i := len(keys) - 1; i >= 0; i-- { // newest first
		k := keys[i]
		v := keyView{Key: k, Status: "active"}
		switch {
		case !k.Active():
			v.Status = "revoked"
		case !k.ExpiresAt.IsZero() && !k.ExpiresAt.After(now):
			v.Status = "expired"
		case !k.ExpiresAt.IsZero():
			v.Status = "expiring"
		}
		views = append(views, v)
	}
	h.render(w, r, status, "keys", s, map[string]any{"Keys": views, "Error": formError, "Today": now.UTC().Format("2006-01-02")})
}

// createKey issues a key named by the form, expiring at the start (UTC)
// of the day given, if any.
func (h *Handler) createKey(w http.ResponseWriter, r *http.Request, s *session) {
	var expires time.Time
	if v := strings.TrimSpace(r.PostFormValue("expires")); v != "" {
		t, err := time.Parse("2006-01-02", v)
		if err != nil || !t.After(time.Now()) {
			h.showKeys(w, r, s, http.StatusBadRequest, "The expiry must be a date after today (YYYY-MM-DD).")
			return
		}
		expires = t
	}
	k, key, err := h.be.CreateKey(r.Context(), s.Customer, strings.TrimSpace(r.PostFormValue("name")), expires, h.cfg.ClientIP(r))
	if _, bad := err.(InputError); bad {
		h.showKeys(w, r, s, http.StatusBadRequest, err.Error())
		return
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	h.render(w, r, http.StatusCreated, "key_shown", s, map[string]any{"Key": k, "Secret": key})
}

// rollOverlaps are the overlaps the roll form offers.
var rollOverlaps = map[string]time.Duration{"0s": 0, "1h": time.Hour, "24h": 24 * time.Hour, "168h": 7 * 24 * time.Hour}

func (h *Handler) rollKey(w http.ResponseWriter, r *http.Request, s *session) {
	overlap, ok := rollOverlaps[r.PostFormValue("overlap")]
	if !ok {
		h.fail(w, r, s, http.StatusBadRequest, "Choose how long the old key keeps working.")
		return
	}
	k, key, err := h.be.RollKey(r.Context(), s.Customer, r.PathValue("id"), overlap, h.cfg.ClientIP(r))
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	h.render(w, r, http.StatusCreated, "key_shown", s, map[string]any{"Key": k, "Secret": key, "Rolled": true, "Overlap": overlap.String()})
}

func (h *Handler) revokeKey(w http.ResponseWriter, r *http.Request, s *session) {
	if err := h.be.RevokeKey(r.Context(), s.Customer, r.PathValue("id"), h.cfg.ClientIP(r)); err != nil {
		h.failErr(w, r, s, err)
		return
	}
	http.Redirect(w, r, h.link("/keys"), http.StatusSeeOther)
}

func (h *Handler) usagePage(w http.ResponseWriter, r *http.Request, s *session) {
	month := r.URL.Query().Get("period")
	u, err := h.be.Usage(r.Context(), s.Customer, month)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if month == "" {
		month = u.Start.UTC().Format("2006-01")
	}
	h.render(w, r, http.StatusOK, "usage", s, map[string]any{"Usage": u, "Chart": dailyChart(u, time.Now()), "Hourly": hourlyChart(u, time.Now()), "MeterCharts": meterCharts(u, time.Now()), "Month": month})
}

// subscribedTimeout bounds how long the plans page waits for the payment
// provider to say whether a subscription is live.
const subscribedTimeout = 5 * time.Second

func (h *Handler) plansPage(w http.ResponseWriter, r *http.Request, s *session) {
	h.showPlans(w, r, s, http.StatusOK, "")
}

// showPlans renders the plans page with a status and a message. A
// customer with a billing account gets Manage billing; one with a live
// subscription changes plans there, any other chooses a plan (Checkout).
// When the payment provider cannot say within subscribedTimeout whether
// the subscription is live, the page offers Manage billing only.
func (h *Handler) showPlans(w http.ResponseWriter, r *http.Request, s *session, status int, message string) {
	c, err := h.be.Customer(r.Context(), s.Customer)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	linked := c.StripeCustomerID != ""
	data := map[string]any{"Plans": h.be.Plans(), "Current": c.Tier, "Billing": h.cfg.Billing != nil, "Linked": linked, "Paying": linked, "Message": message}
	if h.cfg.Billing != nil {
		if linked {
			ctx, cancel := context.WithTimeout(r.Context(), subscribedTimeout)
			live, err := h.cfg.Billing.Subscribed(ctx, s.Customer)
			cancel()
			if err != nil {
				h.log.Warn("could not tell whether a customer's subscription is live", zap.String("customer", s.Customer), zap.Error(err))
				live = true
			}
			data["Paying"] = live
		}
		p, err := h.openCheckout(r.Context(), s.Customer)
		if err != nil {
			h.failErr(w, r, s, err)
			return
		}
		if p != nil && p.Tier != c.Tier {
			data["Pending"], data["PendingURL"], data["PendingSession"] = p.Tier, p.URL, p.Session
		}
	}
	h.render(w, r, status, "plans", s, data)
}
