package module

import (
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
)

// TestPortalTeam: an owner invites a teammate by email; the teammate signs
// in with the emailed link (even under the invite policy) and works on the
// owner's customer, but cannot invite or remove; inviting a member of
// another customer changes nothing and sends nothing, with the same page;
// removing the teammate ends their session at once.
func TestPortalTeam(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "invite")
	owner := newBrowser(t)
	owner.signIn(smtp, "owner@acme.test", 1)
	ownerKey := owner.createKey("owner's")

	page := owner.do("/team", nil)
	res := owner.do("/team", url.Values{"csrf": {csrf(t, page)}, "email": {"Mate@Example.com"}})
	if res.status != http.StatusOK || !strings.Contains(res.body, `id="invited"`) {
		t.Fatalf("invite: %d %s", res.status, res.body)
	}
	mate := newBrowser(t)
	link := waitLink(t, smtp, "mate@example.com", 1)
	p := mate.do(link, nil)
	if r := mate.do("/signin/confirm", url.Values{"csrf": {csrf(t, p)}, "token": {tokenIn(t, p)}}); r.status != http.StatusSeeOther {
		t.Fatalf("teammate sign-in: %d %s", r.status, r.body)
	}
	if ids, want := mate.keyIDs(), owner.keyIDs(); strings.Join(ids, " ") != strings.Join(want, " ") || len(ids) != 2 {
		t.Fatalf("the teammate sees keys %v, want the owner's %v (acme's configured key and the owner's)", ids, want)
	}
	if r := call(t, "/v1/x", mate.createKey("mate's")); !strings.HasPrefix(r.body, "ok customer=acme ") {
		t.Fatalf("the teammate's key: %s", r.body)
	}
	if r := call(t, "/v1/x", ownerKey); r.status != http.StatusOK {
		t.Fatalf("owner key: %d", r.status)
	}
	matePage := mate.do("/team", nil)
	if strings.Contains(matePage.body, `id="invite"`) {
		t.Fatal("a teammate is offered the invite form")
	}
	mateCSRF := csrf(t, matePage)
	if r := mate.do("/team", url.Values{"csrf": {mateCSRF}, "email": {"x@example.com"}}); r.status != http.StatusForbidden {
		t.Fatalf("teammate invites: %d", r.status)
	}
	if r := mate.do("/team/remove", url.Values{"csrf": {mateCSRF}, "email": {"owner@acme.test"}}); r.status != http.StatusForbidden {
		t.Fatalf("teammate removes the owner: %d", r.status)
	}

	// Another customer's contact address (rival's, declared in the
	// Caddyfile) cannot be pulled in, even before its owner ever signed
	// in: the invitation answers the same and changes nothing, and the
	// address still lands in rival at its first sign-in.
	mails := len(smtp.Mails())
	res = owner.do("/team", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"boss@rival.test"}})
	if res.status != http.StatusOK || !strings.Contains(res.body, `id="invited"`) {
		t.Fatalf("invite of another customer's contact address: %d %s", res.status, res.body)
	}
	if n := len(smtp.Mails()); n != mails {
		t.Fatalf("%d emails sent for an invitation of another customer's contact address", n-mails)
	}
	other := newBrowser(t)
	other.signIn(smtp, "boss@rival.test", 1)
	if r := call(t, "/v1/basic/x", other.createKey("rival's")); !strings.HasPrefix(r.body, "ok customer=rival ") {
		t.Fatalf("another customer's contact address was captured by an invitation: %s", r.body)
	}
	// Nor once it is a member of its own customer.
	mails = len(smtp.Mails())
	res = owner.do("/team", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"boss@rival.test"}})
	if res.status != http.StatusOK || !strings.Contains(res.body, `id="invited"`) {
		t.Fatalf("invite of another customer's member: %d %s", res.status, res.body)
	}
	if r := call(t, "/v1/basic/x", other.createKey("rival's 2")); !strings.HasPrefix(r.body, "ok customer=rival ") {
		t.Fatalf("the other customer's member moved: %s", r.body)
	}
	if n := len(smtp.Mails()); n != mails {
		t.Fatalf("%d emails sent for an invitation that changed nothing", n-mails)
	}

	// Removing the teammate ends their session.
	res = owner.do("/team/remove", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"mate@example.com"}})
	if res.status != http.StatusSeeOther {
		t.Fatalf("remove: %d %s", res.status, res.body)
	}
	if r := mate.do("/keys", nil); r.status != http.StatusSeeOther {
		t.Fatalf("the removed teammate still sees the keys: %d", r.status)
	}
	if r := owner.do("/team/remove", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"boss@rival.test"}}); r.status != http.StatusNotFound {
		t.Fatalf("removing another customer's member: %d", r.status)
	}
}

// TestPortalOwnershipTransfer: the owner makes a teammate the owner,
// after a confirmation, with the CSRF token; the old owner becomes a
// member (cannot invite, remove or transfer any more) and the new owner
// can; the audit trail records it. A teammate cannot transfer; an owner
// cannot transfer to another customer's member or owner (the same 404 as
// an unknown address, nothing changes on either side), nor without the
// token or from another origin.
func TestPortalOwnershipTransfer(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "invite")
	owner := newBrowser(t)
	owner.signIn(smtp, "owner@acme.test", 1)
	owner.do("/team", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"mate@example.com"}})
	mate := newBrowser(t)
	mate.signIn(smtp, "mate@example.com", 1)
	rival := newBrowser(t)
	rival.signIn(smtp, "boss@rival.test", 1)
	rival.do("/team", url.Values{"csrf": {csrf(t, rival.do("/team", nil))}, "email": {"hand@rival.test"}})

	role := func(b *browser, email string) string {
		t.Helper()
		page := b.do("/team", nil)
		m := regexp.MustCompile(`<td>` + regexp.QuoteMeta(email) + `</td><td>(\w+)</td>`).FindStringSubmatch(page.body)
		if m == nil {
			t.Fatalf("%s not on the team page: %s", email, page.body)
		}
		return m[1]
	}
	token := csrf(t, owner.do("/team", nil))
	// A teammate cannot transfer (not even to themself).
	if r := mate.do("/team/transfer", url.Values{"csrf": {csrf(t, mate.do("/team", nil))}, "email": {"mate@example.com"}, "confirm": {"yes"}}); r.status != http.StatusForbidden {
		t.Fatalf("a teammate transferring: %d", r.status)
	}
	// Other customers' members and owners, unknown addresses, the owner
	// themself: the same 404.
	for _, email := range []string{"boss@rival.test", "hand@rival.test", "nobody@example.com", "owner@acme.test", ""} {
		r := owner.do("/team/transfer", url.Values{"csrf": {token}, "email": {email}, "confirm": {"yes"}})
		if r.status != http.StatusNotFound || !strings.Contains(r.body, "There is no such teammate.") {
			t.Fatalf("transfer to %q: %d %s", email, r.status, r.body)
		}
	}
	if role(rival, "boss@rival.test") != "owner" || role(rival, "hand@rival.test") != "member" {
		t.Fatal("a refused transfer changed the other customer")
	}
	// No CSRF token, a wrong one, another origin: refused.
	cross := owner.tab()
	cross.origin = "https://evil.example"
	for name, r := range map[string]response{
		"no token":     owner.do("/team/transfer", url.Values{"email": {"mate@example.com"}, "confirm": {"yes"}}),
		"rival token":  owner.do("/team/transfer", url.Values{"csrf": {csrf(t, rival.do("/team", nil))}, "email": {"mate@example.com"}, "confirm": {"yes"}}),
		"cross-origin": cross.do("/team/transfer", url.Values{"csrf": {token}, "email": {"mate@example.com"}, "confirm": {"yes"}}),
	} {
		if r.status != http.StatusForbidden {
			t.Fatalf("%s: %d", name, r.status)
		}
	}
	// Without confirm=yes, the owner is asked first; nothing changes.
	r := owner.do("/team/transfer", url.Values{"csrf": {token}, "email": {"mate@example.com"}})
	if r.status != http.StatusOK || !strings.Contains(r.body, `id="confirm-transfer"`) || !strings.Contains(r.body, `name="confirm" value="yes"`) {
		t.Fatalf("transfer without confirmation: %d %s", r.status, r.body)
	}
	if role(owner, "mate@example.com") != "member" || role(owner, "owner@acme.test") != "owner" {
		t.Fatal("the question changed the roles")
	}
	r = owner.do("/team/transfer", url.Values{"csrf": {token}, "email": {"mate@example.com"}, "confirm": {"yes"}})
	if r.status != http.StatusOK || !strings.Contains(r.body, `id="transferred"`) {
		t.Fatalf("confirmed transfer: %d %s", r.status, r.body)
	}
	if role(mate, "mate@example.com") != "owner" || role(mate, "owner@acme.test") != "member" {
		t.Fatalf("roles after the transfer: %s", mate.do("/team", nil).body)
	}
	// The old owner is a member now, at once, on their existing session.
	for path, form := range map[string]url.Values{
		"/team":          {"csrf": {token}, "email": {"x@example.com"}},
		"/team/remove":   {"csrf": {token}, "email": {"mate@example.com"}},
		"/team/transfer": {"csrf": {token}, "email": {"mate@example.com"}, "confirm": {"yes"}},
	} {
		if r := owner.do(path, form); r.status != http.StatusForbidden {
			t.Fatalf("the old owner POST %s: %d", path, r.status)
		}
	}
	// The new owner can hand it back.
	if r := mate.do("/team/transfer", url.Values{"csrf": {csrf(t, mate.do("/team", nil))}, "email": {"owner@acme.test"}, "confirm": {"yes"}}); r.status != http.StatusOK {
		t.Fatalf("transfer back: %d", r.status)
	}
	audit := admin(t, http.MethodGet, "/api_monetize/audit?customer=acme", "")
	if strings.Count(audit.body, `"action":"team.owner_transferred"`) != 2 ||
		!strings.Contains(audit.body, `"detail":"owner@acme.test made mate@example.com the owner"`) || !strings.Contains(audit.body, `"actor":"portal"`) {
		t.Fatalf("audit trail: %s", audit.body)
	}
	if a := admin(t, http.MethodGet, "/api_monetize/audit?customer=rival", ""); strings.Contains(a.body, "team.owner_transferred") {
		t.Fatalf("a transfer recorded for the other customer: %s", a.body)
	}
}
