package module

import (
	"net/http"
	"net/url"
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

	// A member of another customer (rival, declared in the Caddyfile)
	// cannot be pulled in.
	other := newBrowser(t)
	other.signIn(smtp, "boss@rival.test", 1)
	mails := len(smtp.Mails())
	res = owner.do("/team", url.Values{"csrf": {csrf(t, owner.do("/team", nil))}, "email": {"boss@rival.test"}})
	if res.status != http.StatusOK || !strings.Contains(res.body, `id="invited"`) {
		t.Fatalf("invite of another customer's member: %d %s", res.status, res.body)
	}
	if r := call(t, "/v1/basic/x", other.createKey("rival's")); !strings.HasPrefix(r.body, "ok customer=rival ") {
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
