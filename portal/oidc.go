package portal

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"go.uber.org/zap"
	"golang.org/x/oauth2"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// recordKindOIDC holds a started OpenID Connect sign-in (nonce and
	// PKCE verifier) by the SHA-256 of its state; recordKindOIDCUsed marks
	// a state consumed.
	recordKindOIDC     = "portal_oidc"
	recordKindOIDCUsed = "portal_oidc_used"
	// oidcLifetime is how long a started sign-in may take at the provider.
	oidcLifetime = 10 * time.Minute
	// oidcCookie binds a started sign-in to the browser that started it.
	// Lax, not Strict: the provider's redirect back is a cross-site
	// top-level navigation.
	oidcCookie         = "__Host-am_portal_oidc"
	oidcCookieInsecure = "am_portal_oidc"
	// oidcStartsPerIP bounds sign-ins started per client address and
	// throttleWindow (each writes a record).
	oidcStartsPerIP = 60
)

// OIDC is an OpenID Connect provider members may sign in with
// (authorization code flow with PKCE S256 and a nonce).
type OIDC struct {
	// Issuer is the provider's issuer URL (https; http on loopback for
	// trials); its discovery document is read on first use.
	Issuer string
	// ClientID and ClientSecret are the portal's client at the provider;
	// its redirect URI is <base_url>/oidc/callback.
	ClientID, ClientSecret string
}

// oidcClient is the discovered provider, found on first use (discovery
// is network I/O, not done while the configuration loads).
type oidcClient struct {
	cfg OIDC
	mu  sync.Mutex
	p   *oidc.Provider
}

func (o *oidcClient) provider(ctx context.Context) (*oidc.Provider, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.p != nil {
		return o.p, nil
	}
	p, err := oidc.NewProvider(ctx, o.cfg.Issuer)
	if err != nil {
		return nil, fmt.Errorf("OpenID Connect discovery at %s: %w", o.cfg.Issuer, err)
	}
	o.p = p
	return p, nil
}

// checkOIDC validates the provider settings.
func checkOIDC(c *OIDC) error {
	u, err := url.Parse(c.Issuer)
	if err != nil || u.Host == "" {
		return fmt.Errorf("oidc: expected an issuer URL such as https://accounts.example.com, got %q", c.Issuer)
	}
	loopback := u.Hostname() == "localhost" || u.Hostname() == "127.0.0.1" || u.Hostname() == "::1"
	if u.Scheme != "https" && (u.Scheme != "http" || !loopback) {
		return fmt.Errorf("oidc: the issuer must be https (plain http only on localhost), got %q", c.Issuer)
	}
	if c.ClientID == "" || c.ClientSecret == "" {
		return errors.New("oidc: a client id and a client secret are required")
	}
	return nil
}

// oidcFlow is a started sign-in.
type oidcFlow struct {
	Nonce    string `json:"nonce"`
	Verifier string `json:"verifier"`
}

func (h *Handler) oidcCookieName() string {
	if h.secure {
		return oidcCookie
	}
	return oidcCookieInsecure
}

func (h *Handler) oauthConfig(p *oidc.Provider) *oauth2.Config {
	return &oauth2.Config{
		ClientID: h.oidc.cfg.ClientID, ClientSecret: h.oidc.cfg.ClientSecret,
		Endpoint: p.Endpoint(), RedirectURL: h.base.String() + "/oidc/callback",
		Scopes: []string{oidc.ScopeOpenID, "email"},
	}
}

// oidcStart starts a sign-in at the provider. It changes nothing but a
// short-lived record, so a plain link (GET) starts it.
func (h *Handler) oidcStart(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	if ok, err := allow(ctx, recs, "oidc", h.cfg.ClientIP(r), oidcStartsPerIP, time.Now()); err != nil || !ok {
		if err != nil {
			h.failErr(w, r, nil, err)
			return
		}
		h.fail(w, r, nil, http.StatusTooManyRequests, "Too many sign-in attempts. Please wait a few minutes and try again.")
		return
	}
	p, err := h.oidc.provider(ctx)
	if err != nil {
		h.log.Error("OpenID Connect provider unavailable", zap.Error(err))
		h.fail(w, r, nil, http.StatusBadGateway, "The sign-in provider cannot be reached. Please try again later or sign in by email.")
		return
	}
	state, flow := randomToken(), oidcFlow{Nonce: randomToken(), Verifier: oauth2.GenerateVerifier()}
	data, _ := json.Marshal(flow)
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindOIDC, ID: hashToken(state), Data: data, Expires: time.Now().Add(oidcLifetime)}, false); err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	http.SetCookie(w, h.cookie(h.oidcCookieName(), state, int(oidcLifetime/time.Second)))
	u := h.oauthConfig(p).AuthCodeURL(state, oauth2.S256ChallengeOption(flow.Verifier), oidc.Nonce(flow.Nonce))
	http.Redirect(w, r, u, http.StatusSeeOther)
}

// oidcCallback finishes a sign-in: the state must be the one this browser
// started (its cookie) and unused; the code is exchanged with the PKCE
// verifier; the ID token must be valid for this client, carry the nonce
// and a verified email.
func (h *Handler) oidcCallback(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	q := r.URL.Query()
	refused := func(reason string) {
		h.log.Info("OpenID Connect sign-in refused", zap.String("reason", reason))
		h.fail(w, r, nil, http.StatusBadRequest, "The sign-in could not be completed. Please start again.")
	}
	if e := q.Get("error"); e != "" {
		refused("provider error: " + e)
		return
	}
	state := q.Get("state")
	c, err := r.Cookie(h.oidcCookieName())
	if err != nil || len(state) != 43 || !tokensEqual(c.Value, state) {
		refused("state does not match this browser's")
		return
	}
	http.SetCookie(w, h.cookie(h.oidcCookieName(), "", -1))
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	id := hashToken(state)
	rec, err := recs.GetRecord(ctx, recordKindOIDC, id)
	if errors.Is(err, store.ErrNotFound) {
		refused("unknown or expired state")
		return
	}
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	if won, err := recs.PutRecord(ctx, store.Record{Kind: recordKindOIDCUsed, ID: id, Expires: time.Now().Add(oidcLifetime)}, true); err != nil || !won {
		if err != nil {
			h.failErr(w, r, nil, err)
			return
		}
		refused("state already used")
		return
	}
	_ = recs.DeleteRecord(ctx, recordKindOIDC, id)
	var flow oidcFlow
	if err := json.Unmarshal(rec.Data, &flow); err != nil {
		refused("damaged state record")
		return
	}
	p, err := h.oidc.provider(ctx)
	if err != nil {
		h.fail(w, r, nil, http.StatusBadGateway, "The sign-in provider cannot be reached. Please try again later.")
		return
	}
	tok, err := h.oauthConfig(p).Exchange(ctx, q.Get("code"), oauth2.VerifierOption(flow.Verifier))
	if err != nil {
		refused("code exchange: " + err.Error())
		return
	}
	raw, _ := tok.Extra("id_token").(string)
	idt, err := p.Verifier(&oidc.Config{ClientID: h.oidc.cfg.ClientID}).Verify(ctx, raw)
	if err != nil {
		refused("ID token: " + err.Error())
		return
	}
	if !tokensEqual(idt.Nonce, flow.Nonce) {
		refused("nonce mismatch")
		return
	}
	var claims struct {
		Email         string `json:"email"`
		EmailVerified *bool  `json:"email_verified"`
	}
	if err := idt.Claims(&claims); err != nil || claims.EmailVerified == nil || !*claims.EmailVerified {
		refused("no verified email")
		return
	}
	email := normalizeEmail(claims.Email)
	if email == "" {
		refused("invalid email claim")
		return
	}
	h.signIn(w, r, recs, email, "oidc")
}

// oidcLabel names the provider on the sign-in button: its host.
func oidcLabel(issuer string) string {
	u, err := url.Parse(issuer)
	if err != nil {
		return "your organisation"
	}
	return strings.TrimPrefix(u.Hostname(), "www.")
}
