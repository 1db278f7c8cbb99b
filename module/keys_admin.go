package module

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// defaultRollOverlap is how long a rolled key keeps working by default.
const defaultRollOverlap = 24 * time.Hour

// maxKeyNameLength is the longest key name, in characters.
const maxKeyNameLength = 64

// parseKeyExpiry parses a key's expiry: an RFC 3339 date, or "" for none.
func parseKeyExpiry(s string) (time.Time, error) {
	if s == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("expires: expected an RFC 3339 date such as 2027-01-31T00:00:00Z, got %q", s)
	}
	return t.UTC(), nil
}

// keyRequest is the body of the key endpoints; every field is optional
// and each endpoint accepts only its own (see decodeKeyRequest).
type keyRequest struct {
	// Name labels the key.
	Name *string `json:"name"`
	// ExpiresAt is an RFC 3339 date; in PATCH, null removes the expiry.
	ExpiresAt json.RawMessage `json:"expires_at"`
	// ExpiresIn is a duration from now, e.g. "720h" or "30d".
	ExpiresIn *string `json:"expires_in"`
	// Overlap is how long a rolled key keeps working.
	Overlap *string `json:"overlap"`
}

// keyEdit is a checked keyRequest.
type keyEdit struct {
	name       *string
	expires    *time.Time // nil: unchanged; zero: none
	overlap    time.Duration
	hasOverlap bool
}

// keyRules are what an endpoint accepts in a keyRequest.
type keyRules struct {
	// fields are the JSON fields accepted.
	fields []string
	// anyExpiry accepts an expires_at in the past (the key expires at
	// once) and null (no expiry); otherwise expires_at must be a future
	// date.
	anyExpiry bool
}

// decodeKeyRequest reads an optional JSON body (an empty body is no
// change) and checks it; allowed lists the fields the endpoint accepts.
// It refuses (400, with a precise message) a body that is not acceptable.
func decodeKeyRequest(w http.ResponseWriter, r *http.Request, now time.Time, rules keyRules) (keyEdit, error) {
	var edit keyEdit
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<16))
	if err != nil {
		return edit, apiError(http.StatusBadRequest, "reading the body: "+err.Error())
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return edit, nil
	}
	var in keyRequest
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&in); err != nil {
		return edit, apiError(http.StatusBadRequest, "invalid JSON body: "+err.Error())
	}
	if dec.More() {
		return edit, apiError(http.StatusBadRequest, "invalid JSON body: more than one JSON value")
	}
	bad := func(msg string) (keyEdit, error) {
		return keyEdit{}, apiError(http.StatusBadRequest, msg)
	}
	given := map[string]bool{"name": in.Name != nil, "expires_at": in.ExpiresAt != nil, "expires_in": in.ExpiresIn != nil, "overlap": in.Overlap != nil}
	for field, set := range given {
		if set && !slices.Contains(rules.fields, field) {
			return bad(fmt.Sprintf("%s: not accepted here; expected only %s", field, strings.Join(rules.fields, ", ")))
		}
	}
	if in.Name != nil {
		if msg := checkKeyName(*in.Name); msg != "" {
			return bad(msg)
		}
		edit.name = in.Name
	}
	if in.ExpiresAt != nil && in.ExpiresIn != nil {
		return bad("expires_at and expires_in: give one of them, not both")
	}
	if in.ExpiresAt != nil {
		t, ok, msg := parseExpiresAt(in.ExpiresAt)
		if msg != "" {
			return bad(msg)
		}
		if ok && !t.After(now) && !rules.anyExpiry {
			return bad(fmt.Sprintf("expires_at: must be in the future, got %s", t.Format(time.RFC3339Nano)))
		}
		if !ok && !rules.anyExpiry {
			return bad("expires_at: expected an RFC 3339 date such as 2027-01-31T00:00:00Z, got null")
		}
		edit.expires = &t
	}
	if in.ExpiresIn != nil {
		d, err := caddy.ParseDuration(*in.ExpiresIn)
		if err != nil || d <= 0 {
			return bad(fmt.Sprintf("expires_in: expected a positive duration such as \"720h\" or \"30d\", got %q", *in.ExpiresIn))
		}
		t := now.Add(d).UTC().Truncate(time.Second)
		edit.expires = &t
	}
	if in.Overlap != nil {
		d, err := caddy.ParseDuration(*in.Overlap)
		if err != nil || d < 0 {
			return bad(fmt.Sprintf("overlap: expected a duration of 0s or more such as \"24h\" (0s revokes the old key at once), got %q", *in.Overlap))
		}
		edit.overlap, edit.hasOverlap = d, true
	}
	return edit, nil
}

// parseExpiresAt reads expires_at: a date (ok true), or null (ok false).
func parseExpiresAt(raw json.RawMessage) (t time.Time, ok bool, msg string) {
	if string(bytes.TrimSpace(raw)) == "null" {
		return time.Time{}, false, ""
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return time.Time{}, false, "expires_at: expected an RFC 3339 date as a JSON string, such as \"2027-01-31T00:00:00Z\""
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, false, fmt.Sprintf("expires_at: expected an RFC 3339 date such as 2027-01-31T00:00:00Z, got %q", s)
	}
	return t.UTC(), true, ""
}

// checkKeyName returns what is wrong with a key name, or "".
func checkKeyName(name string) string {
	if !utf8.ValidString(name) || utf8.RuneCountInString(name) > maxKeyNameLength {
		return fmt.Sprintf("name: expected at most %d characters of valid UTF-8", maxKeyNameLength)
	}
	for _, c := range name {
		if !unicode.IsPrint(c) {
			return fmt.Sprintf("name: control and invisible characters are not allowed (found %U)", c)
		}
	}
	return ""
}

// issueKey creates a key for customer c and returns it and the key
// itself, recording it in the audit trail.
func (a *App) issueKey(ctx context.Context, st store.Store, c store.Customer, name string, expires time.Time, actor, remote string) (store.Key, string, error) {
	hasher, err := a.hasher(ctx)
	if err != nil {
		return store.Key{}, "", err
	}
	key := apikey.Generate()
	hash := hasher.Hash(key)
	k, err := st.PutKey(ctx, store.Key{
		ID: apikey.ID(hash), Hash: hash, CustomerID: c.ID, Name: name,
		Prefix: apikey.DisplayPrefix(key), CreatedAt: time.Now().UTC(), ExpiresAt: expires,
	})
	if err != nil {
		return store.Key{}, "", err
	}
	a.invalidateKeys()
	if g := a.authGuard; g != nil {
		g.accepted(hasher.Sum(key)) // works at once, even from a throttled address
	}
	a.audit(ctx, st, auditEntry{Actor: actor, RemoteAddr: remote, Action: auditKeyCreated, KeyID: k.ID, Customer: k.CustomerID, Name: k.Name, ExpiresAt: k.ExpiresAt})
	return k, key, nil
}

// errKeyRevoked refuses a change to a revoked key.
var errKeyRevoked = errors.New("the key is revoked")

// rollKey issues a new key for the owner of old and makes old stop working
// overlap from now (at once for 0; a roll never lengthens old's life). The
// new key has old's name unless name is set.
func (a *App) rollKey(ctx context.Context, st store.Store, oldID string, name *string, expires time.Time, overlap time.Duration, now time.Time, actor, remote string) (newKey store.Key, key string, old store.Key, err error) {
	old, err = st.KeyByID(ctx, oldID)
	if err != nil {
		return
	}
	if !old.Active() {
		err = errKeyRevoked
		return
	}
	c, err := st.GetCustomer(ctx, old.CustomerID)
	if err != nil {
		return
	}
	n := old.Name
	if name != nil {
		n = *name
	}
	hasher, err := a.hasher(ctx)
	if err != nil {
		return
	}
	key = apikey.Generate()
	hash := hasher.Hash(key)
	newKey, err = st.PutKey(ctx, store.Key{
		ID: apikey.ID(hash), Hash: hash, CustomerID: c.ID, Name: n,
		Prefix: apikey.DisplayPrefix(key), CreatedAt: time.Now().UTC(), ExpiresAt: expires,
	})
	if err != nil {
		return
	}
	if overlap == 0 {
		old, err = st.RevokeKey(ctx, old.ID)
	} else {
		until := now.Add(overlap).UTC().Truncate(time.Second)
		old, err = st.UpdateKey(ctx, old.ID, store.KeyChange{ExpiresAt: &until, ShortenOnly: true})
	}
	a.invalidateKeys()
	if err != nil {
		err = fmt.Errorf("the new key %s was issued, but the old key %s could not be changed (retry with DELETE or PATCH on it): %w", newKey.ID, old.ID, err)
		return
	}
	replacedUntil := old.ExpiresAt
	if !old.Active() {
		replacedUntil = old.RevokedAt
	}
	a.audit(ctx, st, auditEntry{
		Actor: actor, RemoteAddr: remote, Action: auditKeyRolled, KeyID: newKey.ID, Customer: newKey.CustomerID,
		Replaces: old.ID, ReplacedExpiresAt: replacedUntil, Name: newKey.Name, ExpiresAt: newKey.ExpiresAt,
	})
	return
}

// updateKey changes a key's name or expiry.
func (a *App) updateKey(ctx context.Context, st store.Store, id string, ch store.KeyChange, actor, remote string) (store.Key, error) {
	k, err := st.KeyByID(ctx, id)
	if err != nil {
		return store.Key{}, err
	}
	if !k.Active() {
		return store.Key{}, errKeyRevoked
	}
	if k, err = st.UpdateKey(ctx, id, ch); err != nil {
		return store.Key{}, err
	}
	a.invalidateKeys()
	a.audit(ctx, st, auditEntry{Actor: actor, RemoteAddr: remote, Action: auditKeyUpdated, KeyID: k.ID, Customer: k.CustomerID, Name: k.Name, ExpiresAt: k.ExpiresAt})
	return k, nil
}

// revokeKeyAs revokes a key, recording who did it (once: revoking a
// revoked key again changes nothing and records nothing).
func (a *App) revokeKeyAs(ctx context.Context, st store.Store, id, actor, remote string) (store.Key, error) {
	before, err := st.KeyByID(ctx, id)
	if err != nil {
		return store.Key{}, err
	}
	k, err := st.RevokeKey(ctx, id)
	if err != nil {
		return store.Key{}, err
	}
	a.invalidateKeys()
	if before.Active() {
		a.audit(ctx, st, auditEntry{Actor: actor, RemoteAddr: remote, Action: auditKeyRevoked, KeyID: k.ID, Customer: k.CustomerID, Name: k.Name})
	}
	return k, nil
}

// createKey serves POST /api_monetize/customers/{id}/keys with an optional
// body {"name": …, "expires_at": …} or {"name": …, "expires_in": …}.
func (a *adminAPI) createKey(w http.ResponseWriter, r *http.Request) error {
	now := clockNow()
	edit, err := decodeKeyRequest(w, r, now, keyRules{fields: []string{"name", "expires_at", "expires_in"}})
	if err != nil {
		return err
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	ctx := r.Context()
	c, err := st.GetCustomer(ctx, r.PathValue("id"))
	if err != nil {
		return err
	}
	var name string
	var expires time.Time
	if edit.name != nil {
		name = *edit.name
	}
	if edit.expires != nil {
		expires = *edit.expires
	}
	k, key, err := a.app.issueKey(ctx, st, c, name, expires, actorAdminAPI, r.RemoteAddr)
	if err != nil {
		return err
	}
	v := newKeyView(k)
	v.Key = key
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, v)
	return nil
}

// rollKey serves POST /api_monetize/keys/{id}/roll with an optional body
// {"overlap": "24h", "name": …, "expires_at"/"expires_in": …}.
func (a *adminAPI) rollKey(w http.ResponseWriter, r *http.Request) error {
	now := clockNow()
	edit, err := decodeKeyRequest(w, r, now, keyRules{fields: []string{"name", "overlap", "expires_at", "expires_in"}})
	if err != nil {
		return err
	}
	if !edit.hasOverlap {
		edit.overlap = defaultRollOverlap
	}
	var expires time.Time
	if edit.expires != nil {
		expires = *edit.expires
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	k, key, old, err := a.app.rollKey(r.Context(), st, r.PathValue("id"), edit.name, expires, edit.overlap, now, actorAdminAPI, r.RemoteAddr)
	if err != nil {
		return keyError(err)
	}
	v := newKeyView(k)
	v.Key, v.Replaces = key, old.ID
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusCreated, v)
	return nil
}

// patchKey serves PATCH /api_monetize/keys/{id} with {"name": …} and/or
// {"expires_at": <RFC 3339 date, or null for none>}.
func (a *adminAPI) patchKey(w http.ResponseWriter, r *http.Request) error {
	edit, err := decodeKeyRequest(w, r, clockNow(), keyRules{fields: []string{"name", "expires_at"}, anyExpiry: true})
	if err != nil {
		return err
	}
	if edit.name == nil && edit.expires == nil {
		return apiError(http.StatusBadRequest, "expected a JSON body with name and/or expires_at")
	}
	st, err := a.app.store()
	if err != nil {
		return err
	}
	k, err := a.app.updateKey(r.Context(), st, r.PathValue("id"), store.KeyChange{Name: edit.name, ExpiresAt: edit.expires}, actorAdminAPI, r.RemoteAddr)
	if err != nil {
		return keyError(err)
	}
	writeJSON(w, http.StatusOK, newKeyView(k))
	return nil
}

// getKey serves GET /api_monetize/keys/{id}.
func (a *adminAPI) getKey(w http.ResponseWriter, r *http.Request, st store.Store) error {
	k, err := st.KeyByID(r.Context(), r.PathValue("id"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, newKeyView(k))
	return nil
}

// keyError answers 409 for a revoked key, else err as a store error.
func keyError(err error) error {
	if errors.Is(err, errKeyRevoked) {
		return apiError(http.StatusConflict, err.Error()+"; issue a new key with POST /api_monetize/customers/{id}/keys")
	}
	return err
}
