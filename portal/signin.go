package portal

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"net/http"
	"net/mail"
	"net/url"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// recordKindLink holds unused sign-in links by the SHA-256 of their
	// token; recordKindLinkUsed marks a token consumed (written only if
	// absent, so one POST wins).
	recordKindLink     = "portal_link"
	recordKindLinkUsed = "portal_link_used"
	// recordKindMember maps a member's email to their customer.
	recordKindMember = "portal_member"
	// recordKindThrottle holds one record per counted sign-in attempt.
	recordKindThrottle = "portal_throttle"

	// linkLifetime is how long a sign-in link works.
	linkLifetime = 15 * time.Minute
	// Sign-in emails per email address and per client address within
	// throttleWindow.
	throttleWindow   = 15 * time.Minute
	throttlePerEmail = 5
	throttlePerIP    = 30
	// mailTimeout bounds the sending of one sign-in email.
	mailTimeout = 30 * time.Second
	// Member roles.
	roleOwner = "owner"
)

// link is a stored sign-in link.
type link struct {
	Email   string    `json:"email"`
	Created time.Time `json:"created"`
}

// memberRecord is a member of a customer.
type memberRecord struct {
	Customer string    `json:"customer"`
	Role     string    `json:"role"`
	Created  time.Time `json:"created"`
}

// errNotAllowed: the signup policy does not let this email in.
var errNotAllowed = errors.New("signup not allowed")

// normalizeEmail returns the address in lower case, or "" when s is not a
// plain address.
func normalizeEmail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 254 {
		return ""
	}
	a, err := mail.ParseAddress(s)
	if err != nil || a.Name != "" || a.Address != s || !strings.Contains(s, "@") {
		return ""
	}
	return strings.ToLower(s)
}

func (h *Handler) signinPage(w http.ResponseWriter, r *http.Request) {
	if s, _ := h.currentSession(r); s != nil {
		http.Redirect(w, r, h.link("/keys"), http.StatusSeeOther)
		return
	}
	h.render(w, r, http.StatusOK, "signin", nil, h.signinData(w, r))
}

// signinData is what the sign-in page shows: the form's CSRF token and the
// OpenID Connect provider, if any.
func (h *Handler) signinData(w http.ResponseWriter, r *http.Request) map[string]any {
	data := map[string]any{"CSRF": h.anonymousCSRF(w, r)}
	if h.oidc != nil {
		data["OIDC"] = oidcLabel(h.oidc.cfg.Issuer)
	}
	return data
}

// signinSend sends a sign-in link. Known and unknown addresses get the
// same page, and the email goes out in the background so that the answer
// takes the same time either way.
func (h *Handler) signinSend(w http.ResponseWriter, r *http.Request) {
	if !h.checkAnonymousCSRF(r) {
		h.fail(w, r, nil, http.StatusForbidden, "This form has expired. Please go back, reload the page and try again.")
		return
	}
	email := normalizeEmail(r.PostFormValue("email"))
	if email == "" {
		data := h.signinData(w, r)
		data["Error"], data["Email"] = "Enter an email address such as dev@example.com.", r.PostFormValue("email")
		h.render(w, r, http.StatusBadRequest, "signin", nil, data)
		return
	}
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	now := time.Now()
	for _, t := range []struct {
		scope, subject string
		limit          int
	}{{"ip", h.cfg.ClientIP(r), throttlePerIP}, {"email", email, throttlePerEmail}} {
		ok, err := allow(ctx, recs, t.scope, t.subject, t.limit, now)
		if err != nil {
			h.failErr(w, r, nil, err)
			return
		}
		if !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(throttleWindow/time.Second)))
			h.fail(w, r, nil, http.StatusTooManyRequests, "Too many sign-in attempts. Please wait a few minutes and try again.")
			return
		}
	}
	send, err := h.mayEnter(ctx, recs, email)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	if send {
		if err := h.emailLink(ctx, recs, email, "Sign in to "+h.cfg.ProductName+":"); err != nil {
			h.failErr(w, r, nil, err)
			return
		}
	}
	h.render(w, r, http.StatusOK, "sent", nil, map[string]any{"Email": email})
}

// allow counts one attempt of subject in scope and reports whether it is
// within limit attempts per throttleWindow. Each attempt takes a numbered
// slot written only if absent, so concurrent attempts (on any instance)
// never share one.
func allow(ctx context.Context, recs store.Records, scope, subject string, limit int, now time.Time) (bool, error) {
	window := now.Truncate(throttleWindow)
	prefix := fmt.Sprintf("%s|%s|%d|", scope, hashToken(subject)[:32], window.Unix())
	used, err := recs.ListRecords(ctx, recordKindThrottle, prefix)
	if err != nil {
		return false, err
	}
	for i := len(used); i < limit; i++ {
		ok, err := recs.PutRecord(ctx, store.Record{
			Kind: recordKindThrottle, ID: fmt.Sprintf("%s%03d", prefix, i), Expires: window.Add(throttleWindow),
		}, true)
		if err != nil {
			return false, err
		}
		if ok {
			return true, nil
		}
	}
	return false, nil
}

// mayEnter reports whether the signup policy lets email sign in.
func (h *Handler) mayEnter(ctx context.Context, recs store.Records, email string) (bool, error) {
	if h.cfg.Signup == SignupOpen {
		return true, nil
	}
	if _, err := readMember(ctx, recs, email); err == nil {
		return true, nil
	} else if !errors.Is(err, store.ErrNotFound) {
		return false, err
	}
	if h.cfg.Signup == SignupOff {
		return false, nil
	}
	if _, err := h.be.CustomerByEmail(ctx, email); err == nil {
		return true, nil
	} else if !errors.Is(err, store.ErrNotFound) {
		return false, err
	}
	return false, nil
}

// emailLink stores a new sign-in link for email and emails it in the
// background, after intro (one line of plain text).
func (h *Handler) emailLink(ctx context.Context, recs store.Records, email, intro string) error {
	token := randomToken()
	now := time.Now()
	data, _ := json.Marshal(link{Email: email, Created: now.UTC()})
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindLink, ID: hashToken(token), Data: data, Expires: now.Add(linkLifetime)}, false); err != nil {
		return err
	}
	u := *h.base
	u.Path = h.basePath + "/signin/confirm"
	u.RawQuery = url.Values{"token": {token}}.Encode()
	text := fmt.Sprintf("%s\n\n%s\n\nThe link works once, for 15 minutes; afterwards, ask for a new one at %s/signin. If you did not expect this email, ignore it.\n", intro, u.String(), h.base.String())
	html := fmt.Sprintf(`<!DOCTYPE html><html><body><p>%s</p><p><a href="%s">Continue to sign in</a></p><p>The link works once, for 15 minutes; afterwards, ask for a new one at %s/signin. If you did not expect this email, ignore it.</p></body></html>`,
		template.HTMLEscapeString(intro), template.HTMLEscapeString(u.String()), template.HTMLEscapeString(h.base.String()))
	h.sending.Add(1)
	go func() {
		defer h.sending.Done()
		ctx, cancel := context.WithTimeout(context.Background(), mailTimeout)
		defer cancel()
		if err := h.mail.Send(ctx, email, "Sign in to "+h.cfg.ProductName, text, html); err != nil {
			h.log.Error("could not send a sign-in email", zap.Error(err))
		}
	}()
	return nil
}

// confirmPage shows the button that consumes a sign-in link. Opening the
// link changes nothing, so mail scanners that fetch links do not burn it.
func (h *Handler) confirmPage(w http.ResponseWriter, r *http.Request) {
	h.render(w, r, http.StatusOK, "confirm", nil, map[string]any{
		"CSRF": h.anonymousCSRF(w, r), "Token": r.URL.Query().Get("token"),
	})
}

// confirm consumes a sign-in link and starts a session.
func (h *Handler) confirm(w http.ResponseWriter, r *http.Request) {
	if !h.checkAnonymousCSRF(r) {
		h.fail(w, r, nil, http.StatusForbidden, "This form has expired. Please open the link from your email again.")
		return
	}
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	invalid := func() {
		h.fail(w, r, nil, http.StatusBadRequest, "This sign-in link is invalid, used or expired. Please ask for a new one.")
	}
	token := r.PostFormValue("token")
	if len(token) != 43 {
		invalid()
		return
	}
	id := hashToken(token)
	rec, err := recs.GetRecord(ctx, recordKindLink, id)
	if errors.Is(err, store.ErrNotFound) {
		invalid()
		return
	}
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	won, err := recs.PutRecord(ctx, store.Record{Kind: recordKindLinkUsed, ID: id, Expires: time.Now().Add(linkLifetime)}, true)
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	if !won {
		invalid()
		return
	}
	_ = recs.DeleteRecord(ctx, recordKindLink, id)
	var l link
	if err := json.Unmarshal(rec.Data, &l); err != nil || l.Email == "" {
		invalid()
		return
	}
	h.signIn(w, r, recs, l.Email, "email")
}

// signIn lets a verified email in by the signup policy: it starts a new
// session for its customer and goes to the keys page.
func (h *Handler) signIn(w http.ResponseWriter, r *http.Request, recs store.Records, email, method string) {
	customer, err := h.enter(r.Context(), recs, email)
	if errors.Is(err, errNotAllowed) {
		h.fail(w, r, nil, http.StatusForbidden, "Sign-ups are closed for this address. Ask the API's provider for an invitation.")
		return
	}
	if err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	if err := h.startSession(r.Context(), w, r, customer, email); err != nil {
		h.failErr(w, r, nil, err)
		return
	}
	h.log.Info("portal sign-in", zap.String("customer", customer), zap.String("method", method))
	http.Redirect(w, r, h.link("/keys"), http.StatusSeeOther)
}

// enter returns the customer a verified email belongs to, making it a
// member (and, under the open policy, creating its customer) if the
// policy allows.
func (h *Handler) enter(ctx context.Context, recs store.Records, email string) (string, error) {
	read := func() (string, error) {
		m, err := readMember(ctx, recs, email)
		return m.Customer, err
	}
	if c, err := read(); err == nil {
		return c, h.be.CreateCustomer(ctx, c, email)
	} else if !errors.Is(err, store.ErrNotFound) {
		return "", err
	}
	if h.cfg.Signup == SignupOff {
		return "", errNotAllowed
	}
	var customer string
	c, err := h.be.CustomerByEmail(ctx, email)
	switch {
	case err == nil:
		customer = c.ID
	case !errors.Is(err, store.ErrNotFound):
		return "", err
	case h.cfg.Signup != SignupOpen:
		return "", errNotAllowed
	default:
		b := make([]byte, 8)
		_, _ = rand.Read(b)
		customer = "c-" + hex.EncodeToString(b)
	}
	data, _ := json.Marshal(memberRecord{Customer: customer, Role: roleOwner, Created: time.Now().UTC()})
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindMember, ID: email, Data: data}, true); err != nil {
		return "", err
	}
	// Two first sign-ins at once: the member record written first wins.
	if customer, err = read(); err != nil {
		return "", err
	}
	return customer, h.be.CreateCustomer(ctx, customer, email)
}
