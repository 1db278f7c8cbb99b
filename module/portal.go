package module

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/portal"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/stripereport"
)

func init() {
	caddy.RegisterModule(new(PortalHandler))
}

// portalRequestTimeout bounds the store work of one portal request.
const portalRequestTimeout = 10 * time.Second

// PortalHandler serves the developer portal (package portal), where the
// API's customers sign in by email link, manage their keys, watch their
// usage and compare the plans. Mount it at a site's root or with
// handle_path, e.g. `handle_path /portal/* { api_monetize_portal { … } }`.
type PortalHandler struct {
	// BaseURL is the portal's public address, e.g.
	// https://portal.example.com or https://example.com/portal (required;
	// https, or http on localhost). Sign-in links are built from it.
	BaseURL string `json:"base_url"`
	// ProductName is the API's name shown on every page. Default: "API".
	ProductName string `json:"product_name,omitempty"`
	// LogoURL is an image shown in the header: an https URL or a path.
	LogoURL string `json:"logo_url,omitempty"`
	// AccentColor is the colour of buttons and links, as #rrggbb.
	AccentColor string `json:"accent_color,omitempty"`
	// DocsURL links to the API's documentation or OpenAPI file.
	DocsURL string `json:"docs_url,omitempty"`
	// Signup decides who becomes a customer by signing in: "open" (every
	// verified email gets a customer on SignupTier), "invite" (default:
	// only emails of customers in the store, or existing members) or
	// "off" (existing members only).
	Signup string `json:"signup,omitempty"`
	// SignupTier is the tier of customers created by open signup.
	// Default: the first tier.
	SignupTier string `json:"signup_tier,omitempty"`
	// Email sends the sign-in links. Default: the api_monetize notify
	// email settings.
	Email *EmailConfig `json:"email,omitempty"`
	// OIDC adds sign-in with an OpenID Connect provider.
	OIDC *PortalOIDC `json:"oidc,omitempty"`
	// SessionIdleTimeout ends a member's session unused for this long
	// (from 5m up to the sessions' absolute lifetime of 12h). Default: 1h.
	SessionIdleTimeout caddy.Duration `json:"session_idle_timeout,omitempty"`

	portal *portal.Handler
}

// CaddyModule returns the Caddy module information.
func (*PortalHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.api_monetize_portal",
		New: func() caddy.Module { return new(PortalHandler) },
	}
}

// Provision checks the options and builds the portal over the
// api_monetize app.
func (p *PortalHandler) Provision(ctx caddy.Context) error {
	app, err := ctx.AppIfConfigured("api_monetize")
	if err != nil {
		return fmt.Errorf("api_monetize_portal needs the api_monetize global option: %w", err)
	}
	a := app.(*App)
	tier := p.SignupTier
	if tier == "" {
		tier = a.tiers[0].Name
	}
	if a.tierByName[tier] == nil {
		return fmt.Errorf("api_monetize_portal: signup_tier %q is not a configured tier", tier)
	}
	e := p.Email
	if e == nil && a.Notify != nil {
		e = a.Notify.Email
	}
	if e == nil {
		return fmt.Errorf("api_monetize_portal: no email sender for sign-in links: add an email { smtp …; from … } block to the directive or to the api_monetize notify option")
	}
	repl := caddy.NewReplacer()
	sender := notify.SMTP{
		Addr: repl.ReplaceAll(e.SMTP, ""), From: repl.ReplaceAll(e.From, ""),
		Username: repl.ReplaceAll(e.Username, ""), Password: repl.ReplaceAll(e.Password, ""),
	}
	if err := notify.CheckSMTP(sender.Addr, sender.From); err != nil {
		return fmt.Errorf("api_monetize_portal: email: %v", err)
	}
	var billing portal.Billing
	if a.Stripe != nil {
		s, err := a.stripeSettings()
		if err != nil {
			return fmt.Errorf("api_monetize_portal: %w", err)
		}
		billing = portalBilling{app: a, client: stripereport.NewClient(s.secretKey, s.apiBase, stripeRequestTimeout)}
	}
	var oidc *portal.OIDC
	if o := p.OIDC; o != nil {
		oidc = &portal.OIDC{Issuer: repl.ReplaceAll(o.Issuer, ""), ClientID: repl.ReplaceAll(o.ClientID, ""), ClientSecret: repl.ReplaceAll(o.ClientSecret, "")}
	}
	p.portal, err = portal.New(portal.Config{
		Billing: billing, OIDC: oidc,
		BaseURL: repl.ReplaceAll(p.BaseURL, ""), ProductName: p.ProductName, LogoURL: p.LogoURL,
		AccentColor: p.AccentColor, DocsURL: p.DocsURL, Signup: p.Signup,
		SessionIdleTimeout: time.Duration(p.SessionIdleTimeout), Now: clockNow,
		ClientIP: func(r *http.Request) string {
			ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
			return ip
		},
	}, portalBackend{app: a, tier: tier}, portalMailer{sender}, ctx.Logger())
	if err != nil {
		return fmt.Errorf("api_monetize_portal: %w", err)
	}
	return nil
}

// ServeHTTP serves the portal; it never calls next.
func (p *PortalHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ctx, cancel := context.WithTimeout(r.Context(), portalRequestTimeout)
	defer cancel()
	p.portal.ServeHTTP(w, r.WithContext(ctx))
	return nil
}

// Cleanup waits for sign-in emails in flight.
func (p *PortalHandler) Cleanup() error {
	if p.portal != nil {
		p.portal.Close()
	}
	return nil
}

// PortalOIDC is an OpenID Connect provider for portal sign-in. Register
// <base_url>/oidc/callback as the client's redirect URI.
type PortalOIDC struct {
	// Issuer is the provider's issuer URL (https).
	Issuer string `json:"issuer"`
	// ClientID is the portal's client id at the provider.
	ClientID string `json:"client_id"`
	// ClientSecret is the client's secret; use {env.*}.
	ClientSecret string `json:"client_secret"`
}

// portalMailer sends the portal's emails through SMTP.
type portalMailer struct{ smtp notify.SMTP }

func (m portalMailer) Send(ctx context.Context, to, subject, text, html string) error {
	id := fmt.Sprintf("portal-%x", newSecret()[:12])
	return m.smtp.Send(ctx, to, id, notify.Email{Subject: subject, Text: text, HTML: html})
}

// portalBackend gives the portal the app's store, key lifecycle (the same
// functions as the admin API, audited with actor "portal") and tiers. Every
// key operation checks that the key belongs to the customer it is asked
// for.
type portalBackend struct {
	app  *App
	tier string // the signup tier
}

func (b portalBackend) Records(context.Context) (store.Records, error) { return b.app.store() }

func (b portalBackend) Customer(ctx context.Context, id string) (store.Customer, error) {
	st, err := b.app.store()
	if err != nil {
		return store.Customer{}, err
	}
	return st.GetCustomer(ctx, id)
}

func (b portalBackend) CustomerByEmail(ctx context.Context, email string) (store.Customer, error) {
	st, err := b.app.store()
	if err != nil {
		return store.Customer{}, err
	}
	cs, err := st.ListCustomers(ctx)
	if err != nil {
		return store.Customer{}, err
	}
	for _, c := range cs {
		if c.Email != "" && strings.EqualFold(c.Email, email) {
			return c, nil
		}
	}
	return store.Customer{}, store.ErrNotFound
}

func (b portalBackend) CreateCustomer(ctx context.Context, id, email string) error {
	st, err := b.app.store()
	if err != nil {
		return err
	}
	if _, err := st.GetCustomer(ctx, id); !errors.Is(err, store.ErrNotFound) {
		return err
	}
	now := time.Now().UTC()
	err = st.CreateCustomer(ctx, store.Customer{ID: id, Tier: b.tier, Email: email, Anchor: now.Truncate(24 * time.Hour), CreatedAt: now})
	if err != nil {
		if _, getErr := st.GetCustomer(ctx, id); getErr == nil {
			return nil // created at the same moment by another sign-in
		}
		return err
	}
	b.app.shared.registry.invalidate()
	return nil
}

func (b portalBackend) Keys(ctx context.Context, customerID string) ([]store.Key, error) {
	st, err := b.app.store()
	if err != nil {
		return nil, err
	}
	keys, err := st.ListKeys(ctx, customerID)
	if err != nil {
		return nil, err
	}
	// Uses this process has not written to the store yet (at most one
	// write per key per minute) are shown too.
	for i := range keys {
		if t := b.app.shared.registry.uses.lastUse(keys[i].ID); t.After(keys[i].LastUsedAt) {
			keys[i].LastUsedAt = t
		}
	}
	return keys, nil
}

func (b portalBackend) CreateKey(ctx context.Context, customerID, name string, expires time.Time, remote string) (store.Key, string, error) {
	if msg := checkKeyName(name); msg != "" {
		return store.Key{}, "", portal.InputError(msg)
	}
	st, err := b.app.store()
	if err != nil {
		return store.Key{}, "", err
	}
	c, err := st.GetCustomer(ctx, customerID)
	if err != nil {
		return store.Key{}, "", err
	}
	return b.app.issueKey(ctx, st, c, name, expires, actorPortal, remote)
}

// ownKey returns the key keyID when it belongs to customerID, else
// store.ErrNotFound (the same answer as for a key that does not exist).
func (b portalBackend) ownKey(ctx context.Context, customerID, keyID string) (store.Store, error) {
	st, err := b.app.store()
	if err != nil {
		return nil, err
	}
	k, err := st.KeyByID(ctx, keyID)
	if err != nil {
		return nil, err
	}
	if k.CustomerID != customerID {
		return nil, store.ErrNotFound
	}
	return st, nil
}

func (b portalBackend) RollKey(ctx context.Context, customerID, keyID string, overlap time.Duration, remote string) (store.Key, string, error) {
	st, err := b.ownKey(ctx, customerID, keyID)
	if err != nil {
		return store.Key{}, "", err
	}
	k, key, _, err := b.app.rollKey(ctx, st, keyID, nil, time.Time{}, overlap, clockNow(), actorPortal, remote)
	if errors.Is(err, errKeyRevoked) {
		return store.Key{}, "", portal.InputError("This key is revoked; create a new key instead.")
	}
	return k, key, err
}

func (b portalBackend) RevokeKey(ctx context.Context, customerID, keyID, remote string) error {
	st, err := b.ownKey(ctx, customerID, keyID)
	if err != nil {
		return err
	}
	_, err = b.app.revokeKeyAs(ctx, st, keyID, actorPortal, remote)
	return err
}

func (b portalBackend) Usage(ctx context.Context, customerID, month string) (portal.Usage, error) {
	st, err := b.app.store()
	if err != nil {
		return portal.Usage{}, err
	}
	c, err := st.GetCustomer(ctx, customerID)
	if err != nil {
		return portal.Usage{}, err
	}
	v, status, msg := b.app.usageView(ctx, st, c, month)
	switch status {
	case http.StatusOK:
	case http.StatusBadRequest, http.StatusNotFound:
		return portal.Usage{}, portal.InputError("No billing period of yours starts in that month (expected YYYY-MM).")
	case http.StatusServiceUnavailable:
		return portal.Usage{}, fmt.Errorf("%w: %s", store.ErrUnavailable, msg)
	default:
		return portal.Usage{}, errors.New(msg)
	}
	u := portal.Usage{
		Tier: v.Tier, PeriodID: v.Period.ID, Start: v.Period.Start, End: v.Period.End,
		Used: v.Billed, Requests: v.Requests, Included: v.Included, Remaining: v.Remaining,
		Overage: v.Overage, OverageCharge: v.OverageCharge, Currency: strings.ToUpper(b.app.currency()),
		OverQuota: v.OverQuota, Thresholds: v.Thresholds, Hours: v.Hours,
	}
	for _, m := range v.Meters {
		u.Meters = append(u.Meters, portal.MeterUsage{
			Meter: m.Meter, Used: m.Billed, Included: m.Included, Remaining: m.Remaining,
			Overage: m.Overage, OverageCharge: m.OverageCharge, OverQuota: m.OverQuota, Hours: m.Hours,
		})
	}
	return u, nil
}

func (b portalBackend) OwnerTransferred(ctx context.Context, customerID, from, to, remote string) {
	st, err := b.app.store()
	if err != nil {
		b.app.logger.Error("could not record an ownership transfer in the audit trail", zap.String("customer", customerID), zap.Error(err))
		return
	}
	b.app.audit(ctx, st, auditEntry{Actor: actorPortal, RemoteAddr: remote, Action: auditOwnerTransferred, Customer: customerID,
		Detail: from + " made " + to + " the owner"})
}

func (b portalBackend) CheckoutCanceled(ctx context.Context, customerID, session, by, remote string) {
	st, err := b.app.store()
	if err != nil {
		b.app.logger.Error("could not record a canceled checkout in the audit trail", zap.String("customer", customerID), zap.Error(err))
		return
	}
	b.app.audit(ctx, st, auditEntry{Actor: actorPortal, RemoteAddr: remote, Action: auditCheckoutCanceled, Customer: customerID,
		Detail: by + " canceled checkout " + session})
}

func (b portalBackend) Plans() []portal.Plan {
	cur := strings.ToUpper(b.app.currency())
	plans := make([]portal.Plan, 0, len(b.app.tiers))
	for _, t := range b.app.tiers {
		p := portal.Plan{Name: t.Name, Support: t.Support, SLA: t.SLA, Purchasable: purchasable(t), Price: "Free", Included: "Pay as you go", Rate: "No limit", Endpoints: "All endpoints"}
		switch {
		case t.Price != nil && t.Price.Custom:
			p.Price = "Custom pricing"
		case t.Price != nil && t.Price.AmountMicros > 0:
			p.Price = displayMoney(t.Price.AmountMicros) + " " + cur + " per " + t.Price.Interval
		}
		if t.quotaMode != store.QuotaMeter {
			p.Included, p.OverQuota, p.OveragePrice = planQuota(t, "units", cur)
		} else {
			p.OverQuota = "metered"
		}
		for _, tm := range t.meters {
			pm := portal.PlanMeter{Name: tm.name, Included: "Counted, not limited"}
			if tm.hasQuota() {
				pm.Included, pm.OverQuota, pm.OveragePrice = planQuota(tm.quota, tm.name, cur)
			}
			p.Meters = append(p.Meters, pm)
		}
		if t.hasRate {
			p.Rate = fmt.Sprintf("%d units per %s", t.policy.Limit, windowName(t.policy.Period))
			if t.policy.Burst > 0 && t.policy.Burst != t.policy.Limit {
				p.Rate += fmt.Sprintf(" (bursts of %d)", t.policy.Burst)
			}
		}
		if len(t.Endpoints) > 0 {
			p.Endpoints = strings.Join(t.Endpoints, " ")
		}
		if len(t.Exclude) > 0 {
			p.Endpoints += " except " + strings.Join(t.Exclude, " ")
		}
		plans = append(plans, p)
	}
	return plans
}

// planQuota describes for people the quota q (a tier's, or a tier's view
// of a meter) counting unit: its included units, what happens beyond them
// and the price of a unit beyond them, if any.
func planQuota(q *tierRuntime, unit, cur string) (included, overQuota, price string) {
	included = strconv.FormatInt(q.included, 10) + " " + unit + " per billing period"
	if q.Tier.Included != nil && q.Tier.Included.Interval != "" {
		included = strconv.FormatInt(q.included, 10) + " " + unit + " per " + q.Tier.Included.Interval
	}
	overQuota = map[string]string{store.QuotaBlock: "blocked", store.QuotaBill: "billed", store.QuotaThrottle: "slowed down"}[q.quotaMode]
	if q.quotaMode == store.QuotaThrottle {
		overQuota += fmt.Sprintf(" to %d units per %s", q.throttle.Limit, windowName(q.throttle.Period))
	}
	if q.overagePriceMic > 0 {
		price = metering.FormatMicros(q.overagePriceMic) + " " + cur + " per unit"
	}
	return included, overQuota, price
}

// displayMoney formats an amount in micro-units with at least two
// decimals (49000000 → "49.00", 2000 → "0.002").
func displayMoney(micros int64) string {
	s := metering.FormatMicros(micros)
	switch i := strings.IndexByte(s, '.'); {
	case i < 0:
		return s + ".00"
	case len(s)-i == 2:
		return s + "0"
	}
	return s
}

// Interface guards
var (
	_ caddy.Provisioner           = (*PortalHandler)(nil)
	_ caddy.CleanerUpper          = (*PortalHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*PortalHandler)(nil)
	_ portal.Backend              = portalBackend{}
	_ portal.Mailer               = portalMailer{}
)
