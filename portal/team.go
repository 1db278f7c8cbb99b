package portal

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"sort"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
)

const (
	// roleMember is a teammate an owner invited: same pages, but cannot
	// invite or remove members.
	roleMember = "member"
	// invitesPerCustomer bounds the invitations a customer sends per
	// throttleWindow.
	invitesPerCustomer = 20
)

// member reads the member record of email, store.ErrNotFound when the
// address is no member.
func readMember(ctx context.Context, recs store.Records, email string) (memberRecord, error) {
	rec, err := recs.GetRecord(ctx, recordKindMember, email)
	if err != nil {
		return memberRecord{}, err
	}
	var m memberRecord
	if err := json.Unmarshal(rec.Data, &m); err != nil || m.Customer == "" {
		return memberRecord{}, errors.New("a member record is damaged")
	}
	return m, nil
}

// teamMember is a row of the team page.
type teamMember struct {
	Email, Role string
	Since       time.Time
}

// team lists the members of a customer, owners first, then by address.
func team(ctx context.Context, recs store.Records, customer string) ([]teamMember, error) {
	all, err := recs.ListRecords(ctx, recordKindMember, "")
	if err != nil {
		return nil, err
	}
	var out []teamMember
	for _, rec := range all {
		var m memberRecord
		if json.Unmarshal(rec.Data, &m) == nil && m.Customer == customer {
			out = append(out, teamMember{Email: rec.ID, Role: m.Role, Since: m.Created})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Role == roleOwner && out[j].Role != roleOwner })
	return out, nil
}

func (h *Handler) teamPage(w http.ResponseWriter, r *http.Request, s *session) {
	h.showTeam(w, r, s, http.StatusOK, nil)
}

func (h *Handler) showTeam(w http.ResponseWriter, r *http.Request, s *session, status int, extra map[string]any) {
	recs, err := h.be.Records(r.Context())
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	members, err := team(r.Context(), recs, s.Customer)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	data := map[string]any{"Members": members, "Owner": s.role == roleOwner}
	for k, v := range extra {
		data[k] = v
	}
	h.render(w, r, status, "team", s, data)
}

// invite makes an address a member of the owner's customer and emails it
// a sign-in link. The answer is the same whether or not the address could
// be added (an address already a member of any customer is left as it
// is, and gets no email), so that owners learn nothing of other customers.
func (h *Handler) invite(w http.ResponseWriter, r *http.Request, s *session) {
	if s.role != roleOwner {
		h.fail(w, r, s, http.StatusForbidden, "Only the account's owner can invite teammates.")
		return
	}
	email := normalizeEmail(r.PostFormValue("email"))
	if email == "" {
		h.showTeam(w, r, s, http.StatusBadRequest, map[string]any{"Error": "Enter an email address such as dev@example.com.", "Email": r.PostFormValue("email")})
		return
	}
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if ok, err := allow(ctx, recs, "invite", s.Customer, invitesPerCustomer, time.Now()); err != nil || !ok {
		if err != nil {
			h.failErr(w, r, s, err)
			return
		}
		h.fail(w, r, s, http.StatusTooManyRequests, "Too many invitations. Please wait a few minutes and try again.")
		return
	}
	// Another customer's contact address is that customer's: inviting it
	// changes nothing (and answers the same), or an owner could capture
	// it before its owner's first sign-in.
	switch c, err := h.be.CustomerByEmail(ctx, email); {
	case err == nil && c.ID != s.Customer:
		h.showTeam(w, r, s, http.StatusOK, map[string]any{"Invited": email})
		return
	case err != nil && !errors.Is(err, store.ErrNotFound):
		h.failErr(w, r, s, err)
		return
	}
	data, _ := json.Marshal(memberRecord{Customer: s.Customer, Role: roleMember, Created: time.Now().UTC()})
	added, err := recs.PutRecord(ctx, store.Record{Kind: recordKindMember, ID: email, Data: data}, true)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if added {
		if err := h.emailLink(ctx, recs, email, s.Email+" invited you to the "+h.cfg.ProductName+" developer portal. Sign in:"); err != nil {
			h.failErr(w, r, s, err)
			return
		}
	}
	h.showTeam(w, r, s, http.StatusOK, map[string]any{"Invited": email})
}

// removeMember removes a teammate from the owner's customer; their
// sessions end at their next request.
func (h *Handler) removeMember(w http.ResponseWriter, r *http.Request, s *session) {
	recs, email, _, ok := h.ownersTeammate(w, r, s, "Only the account's owner can remove teammates.")
	if !ok {
		return
	}
	if err := recs.DeleteRecord(r.Context(), recordKindMember, email); err != nil {
		h.failErr(w, r, s, err)
		return
	}
	http.Redirect(w, r, h.link("/team"), http.StatusSeeOther)
}

// ownersTeammate reads the teammate a team form's POST names (email) for
// an owner's action: a session that is not the owner's gets 403 with
// notOwner; an address that is not a member (other than the owner) of the
// owner's customer gets the same 404 as an unknown one. ok is false when
// the answer was written.
func (h *Handler) ownersTeammate(w http.ResponseWriter, r *http.Request, s *session, notOwner string) (recs store.Records, email string, m memberRecord, ok bool) {
	if s.role != roleOwner {
		h.fail(w, r, s, http.StatusForbidden, notOwner)
		return nil, "", m, false
	}
	email = normalizeEmail(r.PostFormValue("email"))
	ctx := r.Context()
	recs, err := h.be.Records(ctx)
	if err != nil {
		h.failErr(w, r, s, err)
		return nil, "", m, false
	}
	m, err = readMember(ctx, recs, email)
	if errors.Is(err, store.ErrNotFound) || (err == nil && (m.Customer != s.Customer || m.Role == roleOwner)) || email == "" {
		h.fail(w, r, s, http.StatusNotFound, "There is no such teammate.")
		return nil, "", m, false
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return nil, "", m, false
	}
	return recs, email, m, true
}

// recordKindTransfer is a short lock per customer held while ownership
// changes hands, so two transfers at once cannot make two owners.
const recordKindTransfer = "portal_transfer"

// transferOwnership makes a teammate the owner; the owner becomes a
// member. The first POST (from the team page) asks for confirmation; the
// change is made only by the confirmation's POST (confirm=yes). An
// address that is not a member of the owner's customer gets the same 404
// as an unknown one.
func (h *Handler) transferOwnership(w http.ResponseWriter, r *http.Request, s *session) {
	recs, email, m, ok := h.ownersTeammate(w, r, s, "Only the account's owner can transfer ownership.")
	if !ok {
		return
	}
	ctx := r.Context()
	if r.PostFormValue("confirm") != "yes" {
		h.showTeam(w, r, s, http.StatusOK, map[string]any{"ConfirmTransfer": email})
		return
	}
	lock, _ := json.Marshal(map[string]string{"by": s.Email})
	ok, err := recs.PutRecord(ctx, store.Record{Kind: recordKindTransfer, ID: s.Customer, Data: lock, Expires: time.Now().Add(30 * time.Second)}, true)
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	if !ok {
		h.fail(w, r, s, http.StatusConflict, "Ownership is changing hands at this moment. Please reload the team page.")
		return
	}
	defer func() { _ = recs.DeleteRecord(ctx, recordKindTransfer, s.Customer) }()
	// Under the lock, both must still be what they were.
	me, err := readMember(ctx, recs, s.Email)
	if err == nil && (me.Customer != s.Customer || me.Role != roleOwner) {
		h.fail(w, r, s, http.StatusForbidden, "Only the account's owner can transfer ownership.")
		return
	}
	if err == nil {
		m, err = readMember(ctx, recs, email)
	}
	if errors.Is(err, store.ErrNotFound) || (err == nil && (m.Customer != s.Customer || m.Role == roleOwner)) {
		h.fail(w, r, s, http.StatusNotFound, "There is no such teammate.")
		return
	}
	if err != nil {
		h.failErr(w, r, s, err)
		return
	}
	m.Role, me.Role = roleOwner, roleMember
	for _, change := range []struct {
		email string
		rec   memberRecord
	}{{email, m}, {s.Email, me}} {
		data, _ := json.Marshal(change.rec)
		if _, err := recs.PutRecord(ctx, store.Record{Kind: recordKindMember, ID: change.email, Data: data}, false); err != nil {
			h.failErr(w, r, s, err)
			return
		}
	}
	h.be.OwnerTransferred(ctx, s.Customer, s.Email, email, h.cfg.ClientIP(r))
	s.role = roleMember
	h.showTeam(w, r, s, http.StatusOK, map[string]any{"Transferred": email})
}
