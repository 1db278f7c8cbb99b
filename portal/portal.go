// Package portal is the developer portal: a server-rendered web
// application where an API's customers sign in by email link, manage their
// API keys, watch their usage and compare the plans. It knows nothing of
// Caddy: the api_monetize_portal handler (package module) gives it a
// Backend over the app's store and tiers, and a Mailer.
//
// Security model: sessions live server-side in the store (the cookie holds
// a random id; the store holds only its SHA-256), the cookie is
// __Host-prefixed, HttpOnly, Secure and SameSite=Lax and is replaced at
// sign-in; every state-changing form carries a CSRF token and cross-origin
// POSTs are refused; pages carry a strict Content-Security-Policy without
// inline script (one static file adds optional enhancements, such as copy
// buttons); every page reads only the signed-in member's customer.
package portal

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed assets
var assetFS embed.FS

// Signup policies: who may become a customer by signing in.
const (
	// SignupOpen gives every verified email without an account a new
	// customer on the signup tier.
	SignupOpen = "open"
	// SignupInvite lets in only emails the operator added: the email of a
	// customer in the store, or an existing member.
	SignupInvite = "invite"
	// SignupOff lets in existing members only.
	SignupOff = "off"
)

// Config is the portal's configuration, checked by New.
type Config struct {
	// BaseURL is the portal's public address (https, or http on a loopback
	// host for trials), e.g. https://portal.example.com or
	// https://example.com/portal. Sign-in links and page links are built
	// from it, never from the request's Host.
	BaseURL string
	// ProductName is shown in the header and the page titles.
	ProductName string
	// LogoURL is an image shown in the header (https or a path).
	LogoURL string
	// AccentColor is a #rrggbb colour for buttons and links.
	AccentColor string
	// DocsURL links to the API's documentation or OpenAPI file.
	DocsURL string
	// Signup is SignupOpen, SignupInvite or SignupOff.
	Signup string
	// ClientIP returns the client address sign-in attempts are throttled
	// by; nil uses the request's remote address.
	ClientIP func(*http.Request) string
	// OIDC, when set, adds sign-in with an OpenID Connect provider.
	OIDC *OIDC
	// Billing, when set, lets members buy a plan (Stripe Checkout) and
	// manage their billing (Stripe Billing Portal).
	Billing Billing
	// SessionIdleTimeout ends a session unused for this long, from
	// MinSessionIdle up to the absolute lifetime of 12 hours; zero means
	// DefaultSessionIdle.
	SessionIdleTimeout time.Duration
	// Now is the time sessions are judged by; nil uses time.Now.
	Now func() time.Time
}

// Billing opens the payment provider's hosted pages.
type Billing interface {
	// Checkout opens a checkout moving customerID to tier and returns its
	// id and URL; the member comes back to returnURL. Calls with the same
	// attempt open the same checkout (the attempt is the payment
	// provider's idempotency key), and the checkout expires
	// CheckoutLifetime after attempt.Created. A plan that cannot be
	// bought, or a customer who already pays and must use ManageBilling,
	// is an InputError.
	Checkout(ctx context.Context, customerID, tier, returnURL string, attempt CheckoutAttempt) (id, url string, err error)
	// ManageBilling opens the customer's billing portal (payment method,
	// invoices, plan changes, cancellation) and returns its URL; a
	// customer without a billing account is an InputError.
	ManageBilling(ctx context.Context, customerID, returnURL string) (string, error)
	// Subscribed reports whether the customer has a live subscription
	// (one that is not canceled or expired) at the payment provider: then
	// plan changes go through ManageBilling, otherwise through Checkout
	// (for the customer's existing billing account, if it has one).
	Subscribed(ctx context.Context, customerID string) (bool, error)
	// CancelCheckout expires the open checkout id of customerID at the
	// payment provider, so it can no longer be paid. A checkout that
	// expired already is not an error; one that completed meanwhile is
	// ErrCheckoutCompleted.
	CancelCheckout(ctx context.Context, customerID, id string) error
}

// ErrCheckoutCompleted is CancelCheckout's answer for a checkout that was
// paid before it could be canceled.
var ErrCheckoutCompleted = errors.New("portal: the checkout was completed")

// ErrBillingBusy is a Billing answer (wrapped) meaning the payment
// provider is still handling the same request (the same attempt's
// idempotency key) for another request: retrying in a moment gets its
// answer.
var ErrBillingBusy = errors.New("portal: the payment provider is handling the same request")

// ErrBillingUnavailable is a Billing answer (wrapped) meaning the payment
// provider did not answer (unreachable, timed out, overloaded or failing).
var ErrBillingUnavailable = errors.New("portal: the payment provider did not answer")

// CheckoutAttempt is one attempt of a customer to open a checkout. The
// portal keeps at most one per customer, so that two windows (or two
// teammates) choosing a plan at once open one checkout, not two.
type CheckoutAttempt struct {
	// Key identifies the attempt; it is safe to send to the payment
	// provider as an idempotency key.
	Key string
	// Created is when the attempt began.
	Created time.Time
}

// Backend is what the portal needs from the app. Every method that takes
// a customer id acts on that customer only: a key of another customer is
// store.ErrNotFound.
type Backend interface {
	// Records keeps sessions, sign-in links, members and throttles.
	Records(ctx context.Context) (store.Records, error)
	// Customer returns a customer.
	Customer(ctx context.Context, id string) (store.Customer, error)
	// CustomerByEmail returns the customer whose contact email is email
	// (case-insensitive), or store.ErrNotFound.
	CustomerByEmail(ctx context.Context, email string) (store.Customer, error)
	// CreateCustomer creates customer id on the signup tier with this
	// email; creating an existing id is not an error.
	CreateCustomer(ctx context.Context, id, email string) error
	// Keys lists the customer's keys, last use included.
	Keys(ctx context.Context, customerID string) ([]store.Key, error)
	// CreateKey issues a key and returns it and the key itself. A bad
	// name is an InputError.
	CreateKey(ctx context.Context, customerID, name string, expires time.Time, remote string) (store.Key, string, error)
	// RollKey issues a key replacing keyID, which stops working overlap
	// from now.
	RollKey(ctx context.Context, customerID, keyID string, overlap time.Duration, remote string) (store.Key, string, error)
	// RevokeKey revokes keyID at once.
	RevokeKey(ctx context.Context, customerID, keyID, remote string) error
	// Usage is the customer's usage in the period starting in month
	// (YYYY-MM; empty: the current period). A bad or unknown month is an
	// InputError.
	Usage(ctx context.Context, customerID, month string) (Usage, error)
	// Plans are the tiers, in the order they are offered.
	Plans() []Plan
	// OwnerTransferred records in the audit trail that from made to the
	// owner of customerID (a failure is logged: the change is made).
	OwnerTransferred(ctx context.Context, customerID, from, to, remote string)
	// CheckoutCanceled records in the audit trail that member by canceled
	// customerID's open checkout session (a failure is logged: the
	// checkout is canceled).
	CheckoutCanceled(ctx context.Context, customerID, session, by, remote string)
}

// InputError is a mistake in what the member entered; its text is shown.
type InputError string

func (e InputError) Error() string { return string(e) }

// Mailer sends sign-in emails.
type Mailer interface {
	// Send delivers one email with a plain text and an HTML body.
	Send(ctx context.Context, to, subject, text, html string) error
}

// Usage is a customer's usage for one period.
type Usage struct {
	Tier     string
	PeriodID string
	Start    time.Time
	End      time.Time
	// Used is the period's billed units; Requests its billed requests.
	Used     int64
	Requests int64
	// Included and Remaining are nil for a tier without a quota.
	Included  *int64
	Remaining *int64
	// Overage is the units beyond Included; OverageCharge its price as an
	// exact decimal in Currency ("" when the tier has no overage price).
	Overage       int64
	OverageCharge string
	Currency      string
	// OverQuota is what happens beyond Included: block, bill or throttle.
	OverQuota string
	// Thresholds are the percentages of Included crossed this period.
	Thresholds []int
	// Hours are the hours with usage, in order.
	Hours []store.HourUsage
	// Meters are the period's other meters (tokens, bytes…), each with
	// the tier's quota of it; the fields above are the default meter's.
	Meters []MeterUsage
}

// MeterUsage is one other meter's usage for a period.
type MeterUsage struct {
	// Meter is the meter's name.
	Meter string
	// Used is the meter's units this period.
	Used int64
	// Included and Remaining are nil when the tier only meters it.
	Included  *int64
	Remaining *int64
	// Overage and OverageCharge are as in Usage; OverQuota is what
	// happens beyond Included.
	Overage       int64
	OverageCharge string
	OverQuota     string
	// Hours are the meter's hours with usage, in order.
	Hours []store.HourUsage
}

// Plan is a tier as the plans page shows it, every field already
// formatted for people.
type Plan struct {
	Name, Price, Included, Rate, Endpoints, OverQuota, OveragePrice, Support, SLA string
	// Purchasable marks a plan members can buy through Billing (a fixed,
	// non-zero price).
	Purchasable bool
	// Meters are the plan's other meters (tokens, bytes…), in
	// configuration order.
	Meters []PlanMeter
}

// PlanMeter is one other meter of a plan, formatted for people.
type PlanMeter struct {
	// Name is the meter's name.
	Name string
	// Included is the meter's included units ("2000000 tokens per billing
	// period"), or that the plan only counts it.
	Included string
	// OverQuota is what happens beyond the included units ("" when the
	// plan only counts the meter); OveragePrice the price of a unit
	// beyond them, if any.
	OverQuota, OveragePrice string
}

// Handler serves the portal.
type Handler struct {
	cfg      Config
	be       Backend
	mail     Mailer
	log      *zap.Logger
	base     *url.URL
	basePath string // base URL path without the trailing slash
	secure   bool
	csp      string
	pages    map[string]*template.Template
	oidc     *oidcClient // nil without OIDC
	handler  http.Handler
	// sending counts sign-in emails in flight; Close waits for them.
	sending sync.WaitGroup
}

var accentPattern = regexp.MustCompile(`^#[0-9a-fA-F]{6}$`)

// New checks cfg and returns the portal's handler.
func New(cfg Config, be Backend, mail Mailer, log *zap.Logger) (*Handler, error) {
	base, err := url.Parse(cfg.BaseURL)
	if err != nil || base.Host == "" || base.RawQuery != "" || base.Fragment != "" || base.User != nil {
		return nil, fmt.Errorf("base_url: expected an absolute URL such as https://portal.example.com or https://example.com/portal, got %q", cfg.BaseURL)
	}
	loopback := base.Hostname() == "localhost" || base.Hostname() == "127.0.0.1" || base.Hostname() == "::1"
	if base.Scheme != "https" && (base.Scheme != "http" || !loopback) {
		return nil, fmt.Errorf("base_url: must be https (plain http only on localhost), got %q", cfg.BaseURL)
	}
	switch cfg.Signup {
	case "":
		cfg.Signup = SignupInvite
	case SignupOpen, SignupInvite, SignupOff:
	default:
		return nil, fmt.Errorf("signup: expected open, invite or off, got %q", cfg.Signup)
	}
	if cfg.AccentColor == "" {
		cfg.AccentColor = "#1f5fbf"
	}
	if !accentPattern.MatchString(cfg.AccentColor) {
		return nil, fmt.Errorf("accent_color: expected a colour as #rrggbb, got %q", cfg.AccentColor)
	}
	if cfg.ProductName == "" {
		cfg.ProductName = "API"
	}
	formAction := "'self'"
	if cfg.Billing != nil {
		// Chrome applies form-action to the redirect after a POST.
		formAction += " https://checkout.stripe.com https://billing.stripe.com"
	}
	imgSrc := "'self' data:"
	if cfg.LogoURL != "" {
		u, err := url.Parse(cfg.LogoURL)
		if err != nil || (u.Host != "" && u.Scheme != "https") || (u.Host == "" && !strings.HasPrefix(u.Path, "/")) || strings.ContainsAny(cfg.LogoURL, " ;'\"") {
			return nil, fmt.Errorf("logo_url: expected an https URL or an absolute path, got %q", cfg.LogoURL)
		}
		if u.Host != "" {
			imgSrc += " https://" + u.Host
		}
	}
	if cfg.DocsURL != "" {
		u, err := url.Parse(cfg.DocsURL)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http" && !(u.Host == "" && strings.HasPrefix(u.Path, "/"))) {
			return nil, fmt.Errorf("docs_url: expected an http(s) URL or an absolute path, got %q", cfg.DocsURL)
		}
	}
	var oc *oidcClient
	if cfg.OIDC != nil {
		if err := checkOIDC(cfg.OIDC); err != nil {
			return nil, err
		}
		oc = &oidcClient{cfg: *cfg.OIDC}
	}
	if cfg.SessionIdleTimeout == 0 {
		cfg.SessionIdleTimeout = DefaultSessionIdle
	}
	if cfg.SessionIdleTimeout < MinSessionIdle || cfg.SessionIdleTimeout > sessionLifetime {
		return nil, fmt.Errorf("session_idle_timeout: expected from %v to %v, got %v", MinSessionIdle, sessionLifetime, cfg.SessionIdleTimeout)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.ClientIP == nil {
		cfg.ClientIP = remoteHost
	}
	if log == nil {
		log = zap.NewNop()
	}
	h := &Handler{
		cfg: cfg, be: be, mail: mail, log: log, base: base,
		basePath: strings.TrimSuffix(base.Path, "/"), secure: base.Scheme == "https",
		csp: "default-src 'none'; script-src 'self'; style-src 'self'; img-src " + imgSrc +
			"; base-uri 'none'; frame-ancestors 'none'; form-action " + formAction,
		oidc: oc,
	}
	if err := h.parseTemplates(); err != nil {
		return nil, err
	}
	h.handler = http.NewCrossOriginProtection().Handler(h.routes())
	return h, nil
}

// Close waits for the sign-in emails in flight (each bounded by a
// timeout).
func (h *Handler) Close() {
	h.sending.Wait()
}

// ServeHTTP serves the portal. The request path is relative to the
// portal's base (mount it at a site's root or with handle_path).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hd := w.Header()
	hd.Set("Content-Security-Policy", h.csp)
	hd.Set("X-Content-Type-Options", "nosniff")
	hd.Set("X-Frame-Options", "DENY")
	hd.Set("Referrer-Policy", "no-referrer")
	hd.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.handler.ServeHTTP(w, r)
}

func (h *Handler) routes() *http.ServeMux {
	mux := http.NewServeMux()
	assets, _ := fs.Sub(assetFS, "assets")
	static := http.StripPrefix("/assets/", http.FileServerFS(assets))
	mux.Handle("GET /assets/{file}", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "public, max-age=3600")
		static.ServeHTTP(w, r)
	}))
	mux.HandleFunc("GET /theme.css", h.theme)
	mux.HandleFunc("GET /{$}", h.home)
	mux.HandleFunc("GET /signin", h.signinPage)
	mux.HandleFunc("POST /signin", h.signinSend)
	mux.HandleFunc("GET /signin/confirm", h.confirmPage)
	mux.HandleFunc("POST /signin/confirm", h.confirm)
	mux.HandleFunc("POST /signout", h.member(h.signout))
	if h.oidc != nil {
		mux.HandleFunc("GET /oidc/start", h.oidcStart)
		mux.HandleFunc("GET /oidc/callback", h.oidcCallback)
	}
	mux.HandleFunc("GET /keys", h.member(h.keysPage))
	mux.HandleFunc("POST /keys", h.member(h.createKey))
	mux.HandleFunc("POST /keys/{id}/roll", h.member(h.rollKey))
	mux.HandleFunc("POST /keys/{id}/revoke", h.member(h.revokeKey))
	mux.HandleFunc("GET /usage", h.member(h.usagePage))
	mux.HandleFunc("GET /plans", h.member(h.plansPage))
	mux.HandleFunc("GET /team", h.member(h.teamPage))
	mux.HandleFunc("POST /team", h.member(h.invite))
	mux.HandleFunc("POST /team/remove", h.member(h.removeMember))
	mux.HandleFunc("POST /team/transfer", h.member(h.transferOwnership))
	mux.HandleFunc("GET /account", h.member(h.accountPage))
	mux.HandleFunc("POST /account/sessions/end-others", h.member(h.endOtherSessions))
	mux.HandleFunc("POST /account/sessions/{id}/end", h.member(h.endOneSession))
	if h.cfg.Billing != nil {
		mux.HandleFunc("POST /plans/{tier}/checkout", h.member(h.checkout))
		mux.HandleFunc("POST /billing", h.member(h.manageBilling))
		mux.HandleFunc("POST /plans/checkout/cancel", h.member(h.cancelCheckout))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		h.fail(w, r, nil, http.StatusNotFound, "There is no such page.")
	})
	return mux
}

// now is the current time, as sessions are judged.
func (h *Handler) now() time.Time { return h.cfg.Now() }

// link returns the public path of a portal page.
func (h *Handler) link(p string) string { return h.basePath + p }

// theme serves the accent colour as a stylesheet (no inline style).
func (h *Handler) theme(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/css; charset=utf-8")
	w.Header().Set("Cache-Control", "public, max-age=300")
	fmt.Fprintf(w, ":root{--accent:%s}\n", h.cfg.AccentColor)
}

func (h *Handler) home(w http.ResponseWriter, r *http.Request) {
	if s, _ := h.currentSession(r); s != nil {
		http.Redirect(w, r, h.link("/keys"), http.StatusSeeOther)
		return
	}
	http.Redirect(w, r, h.link("/signin"), http.StatusSeeOther)
}

// fail answers with an error page; err, when set, is logged (and a store
// outage becomes 503).
func (h *Handler) fail(w http.ResponseWriter, r *http.Request, s *session, status int, msg string) {
	h.render(w, r, status, "error", s, map[string]any{"Message": msg})
}

// failErr answers for a backend error.
func (h *Handler) failErr(w http.ResponseWriter, r *http.Request, s *session, err error) {
	var in InputError
	switch {
	case errors.As(err, &in):
		h.fail(w, r, s, http.StatusBadRequest, string(in))
	case errors.Is(err, store.ErrNotFound):
		h.fail(w, r, s, http.StatusNotFound, "There is no such key.")
	case errors.Is(err, store.ErrUnavailable):
		h.fail(w, r, s, http.StatusServiceUnavailable, "The service is briefly unavailable. Please try again in a moment.")
	case errors.Is(err, ErrBillingBusy):
		// Two requests of one checkout attempt reached the payment
		// provider at the same moment; the other one is opening it.
		h.log.Debug("checkout being opened by a concurrent request", zap.String("path", r.URL.Path), zap.Error(err))
		w.Header().Set("Retry-After", "1")
		h.fail(w, r, s, http.StatusServiceUnavailable, "Your checkout is being prepared. Please try again in a moment.")
	case errors.Is(err, ErrBillingUnavailable):
		h.log.Warn("the payment provider did not answer", zap.String("path", r.URL.Path), zap.Error(err))
		h.fail(w, r, s, http.StatusBadGateway, "The payment provider is not answering. Please try again in a minute.")
	default:
		h.log.Error("portal request failed", zap.String("path", r.URL.Path), zap.Error(err))
		h.fail(w, r, s, http.StatusInternalServerError, "Something went wrong. Please try again.")
	}
}

func remoteHost(r *http.Request) string {
	host := r.RemoteAddr
	if i := strings.LastIndexByte(host, ':'); i >= 0 {
		host = host[:i]
	}
	return strings.Trim(host, "[]")
}
