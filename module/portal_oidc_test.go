package module

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/oauth2-proxy/mockoidc"

	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// startPortalOIDC starts the portal with sign-in through a local OpenID
// provider (mockoidc).
func startPortalOIDC(t *testing.T, signup string) *mockoidc.MockOIDC {
	t.Helper()
	m, err := mockoidc.Run()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Shutdown() })
	c := m.Config()
	smtp := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{})
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(portalConfigFull("store_path "+t.TempDir()+"/store.db", signup, smtp.Addr, "",
		fmt.Sprintf("oidc %s %s %s", c.Issuer, c.ClientID, c.ClientSecret)), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	waitPortalTLS(t)
	return m
}

// startOIDC follows the portal's sign-in link to the provider, which
// answers at once with a redirect back to the portal; it returns that
// callback URL.
func (b *browser) startOIDC() string {
	b.t.Helper()
	res := b.do("/oidc/start", nil)
	loc := res.header.Get("Location")
	u, err := url.Parse(loc)
	if res.status != http.StatusSeeOther || err != nil {
		b.t.Fatalf("GET /oidc/start: %d Location %q %s", res.status, loc, res.body)
	}
	q := u.Query()
	if q.Get("code_challenge_method") != "S256" || q.Get("code_challenge") == "" || q.Get("nonce") == "" || q.Get("state") == "" ||
		q.Get("redirect_uri") != portalBase+"/oidc/callback" {
		b.t.Fatalf("authorization request %s", loc)
	}
	back := b.do(loc, nil)
	callback := back.header.Get("Location")
	if back.status != http.StatusFound || !strings.HasPrefix(callback, portalBase+"/oidc/callback?") {
		b.t.Fatalf("provider answered %d Location %q %s", back.status, callback, back.body)
	}
	return callback
}

// TestPortalOIDC: a member signs in with the OpenID provider (code flow,
// PKCE S256, nonce) and lands on their own keys page; a callback carried
// to another browser (login CSRF), a replayed callback and an unverified
// email are refused.
func TestPortalOIDC(t *testing.T) {
	m := startPortalOIDC(t, "open")
	b := newBrowser(t)
	if page := b.do("/signin", nil); !strings.Contains(page.body, `id="oidc"`) || !strings.Contains(page.body, "Sign in with 127.0.0.1") {
		t.Fatalf("no OpenID sign-in on the sign-in page: %s", page.body)
	}
	m.QueueUser(&mockoidc.MockUser{Subject: "u1", Email: "SSO@Example.com", EmailVerified: true})
	callback := b.startOIDC()
	res := b.do(callback, nil)
	if res.status != http.StatusSeeOther || res.header.Get("Location") != "/portal/keys" || b.session() == "" {
		t.Fatalf("callback: %d Location %q %s", res.status, res.header.Get("Location"), res.body)
	}
	if keys := b.do("/keys", nil); keys.status != http.StatusOK || !strings.Contains(keys.body, "sso@example.com") {
		t.Fatalf("keys page after OpenID sign-in: %d %s", keys.status, keys.body)
	}
	// Replaying the callback (its state is used) is refused.
	if res := b.do(callback, nil); res.status != http.StatusBadRequest {
		t.Fatalf("replayed callback: %d", res.status)
	}

	// An attacker's callback opened in a victim's browser (which did not
	// start that sign-in) is refused: the state is bound to a cookie.
	attacker, victim := newBrowser(t), newBrowser(t)
	m.QueueUser(&mockoidc.MockUser{Subject: "u2", Email: "attacker@example.com", EmailVerified: true})
	stolen := attacker.startOIDC()
	if res := victim.do(stolen, nil); res.status != http.StatusBadRequest || victim.session() != "" {
		t.Fatalf("callback in another browser: %d, session %q", res.status, victim.session())
	}
	// The attacker's own browser could still finish (the test can fail).
	if res := attacker.do(stolen, nil); res.status != http.StatusSeeOther {
		t.Fatalf("the attacker's own callback: %d %s", res.status, res.body)
	}

	// An unverified email is refused.
	c := newBrowser(t)
	m.QueueUser(&mockoidc.MockUser{Subject: "u3", Email: "unverified@example.com", EmailVerified: false})
	if res := c.do(c.startOIDC(), nil); res.status != http.StatusBadRequest || c.session() != "" {
		t.Fatalf("unverified email: %d, session %q", res.status, c.session())
	}
}

// TestPortalOIDCInvite: under the invite policy an OpenID sign-in of an
// address the operator did not add is refused, and one they added lands
// on their customer.
func TestPortalOIDCInvite(t *testing.T) {
	m := startPortalOIDC(t, "invite")
	b := newBrowser(t)
	m.QueueUser(&mockoidc.MockUser{Subject: "x", Email: "stranger@example.com", EmailVerified: true})
	if res := b.do(b.startOIDC(), nil); res.status != http.StatusForbidden || b.session() != "" {
		t.Fatalf("uninvited address: %d, session %q", res.status, b.session())
	}
	m.QueueUser(&mockoidc.MockUser{Subject: "y", Email: "owner@acme.test", EmailVerified: true})
	if res := b.do(b.startOIDC(), nil); res.status != http.StatusSeeOther {
		t.Fatalf("invited address: %d %s", res.status, res.body)
	}
	if res := call(t, "/v1/x", b.createKey("sso")); !strings.HasPrefix(res.body, "ok customer=acme ") {
		t.Fatalf("key of the invited member: %s", res.body)
	}
}
