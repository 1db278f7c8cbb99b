package portal

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"net/http"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// sessionCookie holds the session id. __Host- makes the browser
	// refuse it unless Secure, Path=/ and without Domain, so no sibling
	// subdomain can plant one.
	sessionCookie = "__Host-am_portal"
	// csrfCookie holds the CSRF token of forms shown before sign-in
	// (double submit: the form's token must equal the cookie).
	csrfCookie = "__Host-am_portal_csrf"
	// Over plain http (loopback trials only) browsers refuse __Host-
	// cookies, so these names are used instead.
	sessionCookieInsecure = "am_portal"
	csrfCookieInsecure    = "am_portal_csrf"

	// recordKindSession holds sessions by the SHA-256 of their id.
	recordKindSession = "portal_session"
	// recordKindSeen holds, by "<email>/<public id>", when each session of
	// a member was last used (and from where): the member's sessions list,
	// and the idle timeout (a session whose record is gone or too old has
	// ended). It is a record of its own so that refreshing it never
	// rewrites, and so never revives, a session ended meanwhile.
	recordKindSeen = "portal_seen"
	// sessionLifetime is a session's absolute lifetime.
	sessionLifetime = 12 * time.Hour
	// DefaultSessionIdle is the default idle timeout of a session.
	DefaultSessionIdle = time.Hour
	// MinSessionIdle is the shortest idle timeout allowed.
	MinSessionIdle = 5 * time.Minute
	// seenRefresh is how stale the last-seen time may get before a request
	// writes it again (at most one write per session per refresh).
	seenRefresh = time.Minute
	// csrfField is the form field of the CSRF token.
	csrfField = "csrf"
)

// session is a signed-in member's server-side session.
type session struct {
	// Customer is the customer the member belongs to; every page reads
	// only this customer.
	Customer string `json:"customer"`
	// Email is the member's verified email.
	Email string `json:"email"`
	// CSRF is the token every form of the session carries.
	CSRF    string    `json:"csrf"`
	Created time.Time `json:"created"`
	// Public identifies the session on the member's sessions list (it is
	// not the cookie, nor its hash).
	Public string `json:"public"`

	id   string // the record id (SHA-256 of the cookie value)
	role string // the member's role, read with the session
}

// seen is when and from where a session was last used.
type seen struct {
	// Session is the session's record id.
	Session string `json:"session"`
	// Email is the member's address (the record id's prefix; checked, as
	// an address may itself contain a "/").
	Email    string    `json:"email"`
	Created  time.Time `json:"created"`
	LastSeen time.Time `json:"last_seen"`
	// Remote is the client address; Agent a summary of the User-Agent
	// ("Firefox on Linux").
	Remote string `json:"remote"`
	Agent  string `json:"agent"`
}

func seenID(email, public string) string { return email + "/" + public }

// seenExpiry is when the store may drop a session's last-seen record: at
// its idle timeout, or its absolute end if sooner.
func (h *Handler) seenExpiry(v seen) time.Time {
	end := v.LastSeen.Add(h.cfg.SessionIdleTimeout)
	if abs := v.Created.Add(sessionLifetime); abs.Before(end) {
		return abs
	}
	return end
}

// endSession deletes a session and its last-seen record.
func endSession(ctx context.Context, recs store.Records, id string) error {
	rec, err := recs.GetRecord(ctx, recordKindSession, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil
	}
	if err != nil {
		return err
	}
	var s session
	if json.Unmarshal(rec.Data, &s) == nil && s.Public != "" {
		if err := recs.DeleteRecord(ctx, recordKindSeen, seenID(s.Email, s.Public)); err != nil {
			return err
		}
	}
	return recs.DeleteRecord(ctx, recordKindSession, id)
}

// randomToken returns 32 random bytes, base64url.
func randomToken() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand)
	return base64.RawURLEncoding.EncodeToString(b)
}

// hashToken is the id a token is stored under: only its hash is at rest.
func hashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

func (h *Handler) sessionCookieName() string {
	if h.secure {
		return sessionCookie
	}
	return sessionCookieInsecure
}

func (h *Handler) csrfCookieName() string {
	if h.secure {
		return csrfCookie
	}
	return csrfCookieInsecure
}

func (h *Handler) cookie(name, value string, maxAge int) *http.Cookie {
	return &http.Cookie{
		Name: name, Value: value, Path: "/", MaxAge: maxAge,
		Secure: h.secure, HttpOnly: true, SameSite: http.SameSiteLaxMode,
	}
}

// currentSession returns the request's session, nil when it has none (or
// an unknown, expired or malformed one), and an error when the store
// fails.
func (h *Handler) currentSession(r *http.Request) (*session, error) {
	c, err := r.Cookie(h.sessionCookieName())
	if err != nil || len(c.Value) != 43 {
		return nil, nil
	}
	recs, err := h.be.Records(r.Context())
	if err != nil {
		return nil, err
	}
	id := hashToken(c.Value)
	rec, err := recs.GetRecord(r.Context(), recordKindSession, id)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var s session
	if err := json.Unmarshal(rec.Data, &s); err != nil || s.Customer == "" {
		return nil, nil
	}
	now := h.now()
	// A session of an older version (without a public id, so without a
	// last-seen record) ends, as does one past its absolute lifetime.
	if s.Public == "" || now.Sub(s.Created) >= sessionLifetime {
		_ = recs.DeleteRecord(r.Context(), recordKindSession, id)
		return nil, nil
	}
	// A member removed from the customer (or moved) loses the session.
	m, err := readMember(r.Context(), recs, s.Email)
	if errors.Is(err, store.ErrNotFound) || (err == nil && m.Customer != s.Customer) {
		_ = endSession(r.Context(), recs, id)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	// Idle: the last-seen record is gone (the store dropped it, or the
	// session was ended) or older than the idle timeout.
	sid := seenID(s.Email, s.Public)
	srec, err := recs.GetRecord(r.Context(), recordKindSeen, sid)
	var v seen
	if err == nil && (json.Unmarshal(srec.Data, &v) != nil || v.Session != id || v.Email != s.Email) {
		err = store.ErrNotFound
	}
	if errors.Is(err, store.ErrNotFound) || (err == nil && now.Sub(v.LastSeen) >= h.cfg.SessionIdleTimeout) {
		_ = endSession(r.Context(), recs, id)
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if now.Sub(v.LastSeen) >= seenRefresh {
		v.LastSeen, v.Remote, v.Agent = now.UTC(), h.cfg.ClientIP(r), agentSummary(r.UserAgent())
		data, _ := json.Marshal(v)
		if _, err := recs.PutRecord(r.Context(), store.Record{Kind: recordKindSeen, ID: sid, Data: data, Expires: h.seenExpiry(v)}, false); err != nil {
			return nil, err
		}
	}
	s.id, s.role = id, m.Role
	return &s, nil
}

// startSession replaces the request's session (if any) with a new one for
// the member: a fresh random id, so an id planted before sign-in is
// worthless after it.
func (h *Handler) startSession(ctx context.Context, w http.ResponseWriter, r *http.Request, customer, email string) error {
	recs, err := h.be.Records(ctx)
	if err != nil {
		return err
	}
	if c, err := r.Cookie(h.sessionCookieName()); err == nil {
		_ = endSession(ctx, recs, hashToken(c.Value))
	}
	token := randomToken()
	now := h.now().UTC()
	s := session{Customer: customer, Email: email, CSRF: randomToken(), Created: now, Public: randomToken()[:22]}
	v := seen{Session: hashToken(token), Email: email, Created: now, LastSeen: now, Remote: h.cfg.ClientIP(r), Agent: agentSummary(r.UserAgent())}
	seenData, _ := json.Marshal(v)
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindSeen, ID: seenID(email, s.Public), Data: seenData, Expires: h.seenExpiry(v)}, false); err != nil {
		return err
	}
	data, _ := json.Marshal(s)
	if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindSession, ID: v.Session, Data: data, Expires: now.Add(sessionLifetime)}, false); err != nil {
		return err
	}
	http.SetCookie(w, h.cookie(h.sessionCookieName(), token, int(sessionLifetime/time.Second)))
	return nil
}

// member wraps a page that needs a signed-in member: without a session,
// GET goes to the sign-in page and anything else gets 403; every
// state-changing request must carry the session's CSRF token.
func (h *Handler) member(next func(http.ResponseWriter, *http.Request, *session)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		s, err := h.currentSession(r)
		if err != nil {
			h.failErr(w, r, nil, err)
			return
		}
		if s == nil {
			if r.Method == http.MethodGet {
				http.Redirect(w, r, h.link("/signin"), http.StatusSeeOther)
				return
			}
			h.fail(w, r, nil, http.StatusForbidden, "Your session has ended. Please sign in again.")
			return
		}
		if r.Method != http.MethodGet && !tokensEqual(r.PostFormValue(csrfField), s.CSRF) {
			h.fail(w, r, s, http.StatusForbidden, "This form has expired. Please go back, reload the page and try again.")
			return
		}
		w.Header().Set("Cache-Control", "no-store")
		next(w, r, s)
	}
}

// anonymousCSRF returns the CSRF token of forms shown before sign-in,
// setting its cookie when the browser has none.
func (h *Handler) anonymousCSRF(w http.ResponseWriter, r *http.Request) string {
	if c, err := r.Cookie(h.csrfCookieName()); err == nil && len(c.Value) == 43 {
		return c.Value
	}
	token := randomToken()
	http.SetCookie(w, h.cookie(h.csrfCookieName(), token, 0))
	return token
}

// checkAnonymousCSRF reports whether a form posted before sign-in carries
// the token of its cookie.
func (h *Handler) checkAnonymousCSRF(r *http.Request) bool {
	c, err := r.Cookie(h.csrfCookieName())
	return err == nil && len(c.Value) == 43 && tokensEqual(r.PostFormValue(csrfField), c.Value)
}

func tokensEqual(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func (h *Handler) signout(w http.ResponseWriter, r *http.Request, s *session) {
	if recs, err := h.be.Records(r.Context()); err == nil {
		_ = endSession(r.Context(), recs, s.id)
	}
	http.SetCookie(w, h.cookie(h.sessionCookieName(), "", -1))
	http.Redirect(w, r, h.link("/signin"), http.StatusSeeOther)
}
