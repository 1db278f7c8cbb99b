package module

import (
	"crypto/tls"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/mail"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/apimonetize/caddy-api-monetize/apikey"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// The portal is served over https (Caddy's internal CA) on the tests'
// https port, under /portal, with the API on the plain http test port.
var (
	testHTTPSPort = 9382 + testPortOffset()
	portalBase    = fmt.Sprintf("https://localhost:%d/portal", testHTTPSPort)
)

// portalConfig is a Caddyfile with the portal (signup policy signup,
// sending through smtp) and the integration tests' tiers and customers;
// customer acme's contact email is owner@acme.test, rival's
// boss@rival.test.
func portalConfig(storeLine, signup, smtp string) string {
	return portalConfigStripe(storeLine, signup, smtp, "")
}

// portalConfigStripe is portalConfig with a stripe block (and the Stripe
// webhook at /stripe/webhook on the API's port) when stripeBlock is set.
func portalConfigStripe(storeLine, signup, smtp, stripeBlock string) string {
	return portalConfigFull(storeLine, signup, smtp, stripeBlock, "")
}

// portalConfigFull is portalConfigStripe with more lines (portalExtra) in
// the portal's block.
func portalConfigFull(storeLine, signup, smtp, stripeBlock, portalExtra string) string {
	webhook := ""
	if stripeBlock != "" {
		webhook = "handle /stripe/webhook {\n\t\tapi_monetize_stripe_webhook\n\t}"
	}
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	grace_period 1ns
	skip_install_trust
	api_monetize {
		%s
		key_secret test-secret-0123456789
		store_timeout 2s
		%s
		tier free {
			price 0
			included 1000/month
			rate 100/min
			endpoints /v1/basic/*
			support community
		}
		tier pro {
			price 49.00/month
			included 50000/month
			over_quota bill 0.002
			rate 100/min
			endpoints /v1/*
			support email
			sla 99.9%%
		}
		customer acme tier pro email owner@acme.test
		customer rival tier free email boss@rival.test
		key %s acme
	}
}

:%d {
	%s
	handle {
		api_monetize
		respond "ok customer={http.api_monetize.customer} tier={http.api_monetize.tier}"
	}
}

https://localhost:%d {
	tls internal
	handle_path /portal/* {
		api_monetize_portal {
			base_url %s
			product_name "Acme Weather API"
			accent_color "#0b6e4f"
			docs_url https://docs.example.com/
			signup %s
			%s
			email {
				smtp %s
				from "Acme Weather API <portal@acme.test>"
			}
		}
	}
}
`, testAdminPort, testHTTPPort, testHTTPSPort, storeLine, stripeBlock, proKey, testHTTPPort, webhook, testHTTPSPort, portalBase, signup, portalExtra, smtp)
}

// startPortal starts Caddy with the portal and a real SMTP server that
// captures the sign-in emails.
func startPortal(t *testing.T, storeLine, signup string) *notifytest.SMTPServer {
	t.Helper()
	return startPortalStripe(t, storeLine, signup, "")
}

// startPortalStripe is startPortal with a stripe block.
func startPortalStripe(t *testing.T, storeLine, signup, stripeBlock string) *notifytest.SMTPServer {
	t.Helper()
	smtp := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{})
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(portalConfigStripe(storeLine, signup, smtp.Addr, stripeBlock), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	waitPortalTLS(t)
	return smtp
}

// startPortalWith starts (or reloads) Caddy with a portal configuration.
func startPortalWith(t *testing.T, config string) {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort})
	tester.InitServer(config, "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	waitPortalTLS(t)
}

// waitPortalTLS waits until Caddy serves the portal's certificate (its
// internal CA issues it in the background after a config load).
func waitPortalTLS(t *testing.T) {
	t.Helper()
	client := newBrowser(t).client
	waitUntil(t, 15*time.Second, "the portal's TLS certificate", func() bool {
		res, err := client.Get(portalBase + "/signin")
		if err != nil {
			return false
		}
		res.Body.Close()
		return true
	})
}

// portalStores runs test on a fresh embedded store and a fresh Redis key
// space.
func portalStores(t *testing.T, test func(t *testing.T, storeLine string)) {
	forEachStore(t, func(t *testing.T, cfg testConfig) { test(t, cfg.storeLine) })
}

// browser is an HTTP client that keeps cookies by hand (Go's cookie jar
// hides their attributes) and never follows redirects.
type browser struct {
	t       *testing.T
	client  *http.Client
	cookies map[string]*http.Cookie
	// setCookies are the Set-Cookie lines of the last response.
	setCookies []string
	// origin, when set, is sent as the Origin header.
	origin string
	// signinCookies are the Set-Cookie lines of the last sign-in.
	signinCookies []string
}

func newBrowser(t *testing.T) *browser {
	return &browser{t: t, cookies: map[string]*http.Cookie{}, client: &http.Client{
		Timeout:       10 * time.Second,
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}}
}

// do requests path (relative to the portal, or an absolute URL); a
// non-nil form is POSTed.
func (b *browser) do(path string, form url.Values) response {
	b.t.Helper()
	u := path
	if !strings.HasPrefix(u, "https://") && !strings.HasPrefix(u, "http://") {
		u = portalBase + path
	}
	method, body := http.MethodGet, ""
	if form != nil {
		method, body = http.MethodPost, form.Encode()
	}
	req, err := http.NewRequest(method, u, strings.NewReader(body))
	if err != nil {
		b.t.Fatal(err)
	}
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	if b.origin != "" {
		req.Header.Set("Origin", b.origin)
	}
	for _, c := range b.cookies {
		req.AddCookie(&http.Cookie{Name: c.Name, Value: c.Value})
	}
	res, err := b.client.Do(req)
	if err != nil {
		b.t.Fatal(err)
	}
	defer res.Body.Close()
	data, _ := io.ReadAll(res.Body)
	b.setCookies = res.Header.Values("Set-Cookie")
	for _, c := range res.Cookies() {
		if c.MaxAge < 0 {
			delete(b.cookies, c.Name)
		} else {
			b.cookies[c.Name] = c
		}
	}
	return response{status: res.StatusCode, header: res.Header, body: string(data)}
}

var csrfPattern = regexp.MustCompile(`name="csrf" value="([^"]+)"`)

// csrf is the CSRF token of the first form in a page.
func csrf(t *testing.T, page response) string {
	t.Helper()
	m := csrfPattern.FindStringSubmatch(page.body)
	if m == nil {
		t.Fatalf("no CSRF token in the page (status %d): %s", page.status, page.body)
	}
	return m[1]
}

// session is the value of the session cookie ("" when none).
func (b *browser) session() string {
	if c := b.cookies["__Host-am_portal"]; c != nil {
		return c.Value
	}
	return ""
}

// requestLink asks for a sign-in link for email and returns the page.
func (b *browser) requestLink(email string) response {
	b.t.Helper()
	page := b.do("/signin", nil)
	return b.do("/signin", url.Values{"csrf": {csrf(b.t, page)}, "email": {email}})
}

// linkPattern finds the sign-in link in an email's text.
var linkPattern = regexp.MustCompile(`https?://\S+/signin/confirm\?token=[A-Za-z0-9_-]+`)

// waitLink waits for the n-th sign-in email to to and returns its link.
func waitLink(t *testing.T, smtp *notifytest.SMTPServer, to string, n int) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got []notifytest.Mail
		for _, m := range smtp.Mails() {
			if len(m.To) == 1 && m.To[0] == to {
				got = append(got, m)
			}
		}
		if len(got) >= n {
			text := mailText(t, got[n-1].Data)
			link := linkPattern.FindString(text)
			if link == "" {
				t.Fatalf("no sign-in link in the email: %s", text)
			}
			return link
		}
		if time.Now().After(deadline) {
			t.Fatalf("no sign-in email #%d to %s within 10s (mails: %d)", n, to, len(smtp.Mails()))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// mailText is the plain-text part of a MIME message.
func mailText(t *testing.T, data []byte) string {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if err != nil {
			t.Fatalf("no text/plain part: %v", err)
		}
		if strings.HasPrefix(p.Header.Get("Content-Type"), "text/plain") {
			b, err := io.ReadAll(p) // multipart decodes quoted-printable
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
	}
}

// signIn signs email in through the emailed link (the n-th email to it),
// asked for in another browser; it returns the keys page it lands on.
func (b *browser) signIn(smtp *notifytest.SMTPServer, email string, n int) response {
	b.t.Helper()
	if res := newBrowser(b.t).requestLink(email); res.status != http.StatusOK {
		b.t.Fatalf("POST /signin: %d %s", res.status, res.body)
	}
	page := b.do(waitLink(b.t, smtp, email, n), nil)
	if page.status != http.StatusOK {
		b.t.Fatalf("GET the sign-in link: %d %s", page.status, page.body)
	}
	res := b.do("/signin/confirm", url.Values{"csrf": {csrf(b.t, page)}, "token": {tokenIn(b.t, page)}})
	if res.status != http.StatusSeeOther || res.header.Get("Location") != "/portal/keys" {
		b.t.Fatalf("POST /signin/confirm: %d Location %q %s", res.status, res.header.Get("Location"), res.body)
	}
	b.signinCookies = b.setCookies
	keys := b.do("/keys", nil)
	if keys.status != http.StatusOK || !strings.Contains(keys.body, email) {
		b.t.Fatalf("GET /keys after sign-in: %d %s", keys.status, keys.body)
	}
	return keys
}

var tokenPattern = regexp.MustCompile(`name="token" value="([^"]*)"`)

func tokenIn(t *testing.T, page response) string {
	t.Helper()
	m := tokenPattern.FindStringSubmatch(page.body)
	if m == nil {
		t.Fatalf("no token field in the page: %s", page.body)
	}
	return m[1]
}

var secretPattern = regexp.MustCompile(`id="secret" class="secret" readonly value="([^"]+)"`)

// createKey creates a key on the keys page and returns the key shown.
func (b *browser) createKey(name string) string {
	b.t.Helper()
	res := b.do("/keys", url.Values{"csrf": {csrf(b.t, b.do("/keys", nil))}, "name": {name}})
	if res.status != http.StatusCreated {
		b.t.Fatalf("create key: %d %s", res.status, res.body)
	}
	m := secretPattern.FindStringSubmatch(res.body)
	if m == nil {
		b.t.Fatalf("the new key is not shown: %s", res.body)
	}
	return m[1]
}

var keyRowPattern = regexp.MustCompile(`<tr id="key-([^"]+)">`)

// keyIDs are the ids of the keys listed on the keys page, newest first.
func (b *browser) keyIDs() []string {
	b.t.Helper()
	var ids []string
	for _, m := range keyRowPattern.FindAllStringSubmatch(b.do("/keys", nil).body, -1) {
		ids = append(ids, m[1])
	}
	return ids
}

// TestPortalSignupKeysUsage: a developer signs up by email link (open
// signup), creates a key, calls the API with it and sees the usage; rolls
// the key (the old one stops at once with overlap 0) and revokes the new
// one. Every key change is audited with actor portal.
func TestPortalSignupKeysUsage(t *testing.T) {
	portalStores(t, func(t *testing.T, storeLine string) {
		smtp := startPortal(t, storeLine, "open")
		b := newBrowser(t)
		b.signIn(smtp, "dev@example.com", 1)
		key := b.createKey("production")
		if !strings.HasPrefix(key, apikey.Prefix) || len(key) != apikey.GeneratedLength {
			t.Fatalf("the key shown is not a generated key: %q", key)
		}
		if keys := b.do("/keys", nil); strings.Contains(keys.body, key) || !strings.Contains(keys.body, "production") {
			t.Fatalf("the keys page must list the key by name and never show it again: %s", keys.body)
		}
		for range 3 {
			if res := call(t, "/v1/basic/weather", key); res.status != http.StatusOK || !strings.HasPrefix(res.body, "ok customer=c-") {
				t.Fatalf("API call with the portal's key: %d %s", res.status, res.body)
			}
		}
		if keys := b.do("/keys", nil); !strings.Contains(keys.body, `<td class="last-used">`+time.Now().UTC().Format("2006-01-02")) {
			t.Fatalf("the keys page does not show today's use: %s", keys.body)
		}
		usage := b.do("/usage", nil)
		if usage.status != http.StatusOK || !strings.Contains(usage.body, `<dd id="used">3</dd>`) ||
			!strings.Contains(usage.body, `<dd id="included">1000</dd>`) || !strings.Contains(usage.body, `<dd id="remaining">997</dd>`) ||
			!strings.Contains(usage.body, `<rect `) {
			t.Fatalf("usage page after 3 calls: %d %s", usage.status, usage.body)
		}
		if !strings.Contains(usage.body, `id="hourly"`) || !strings.Contains(usage.body, ": 3 units</title>") {
			t.Fatalf("usage page has no hourly chart with this hour's 3 units: %s", usage.body)
		}
		if res := b.do("/usage?period="+time.Now().UTC().Format("2006-01"), nil); res.status != http.StatusOK || !strings.Contains(res.body, `<dd id="used">3</dd>`) {
			t.Fatalf("usage of the current month chosen: %d", res.status)
		}
		if res := b.do("/usage?period=1999-01", nil); res.status != http.StatusOK || !strings.Contains(res.body, `<dd id="used">0</dd>`) {
			t.Fatalf("an earlier period: %d", res.status)
		}
		if res := b.do("/usage?period=Jan-99", nil); res.status != http.StatusBadRequest {
			t.Fatalf("a malformed period: %d", res.status)
		}
		plans := b.do("/plans", nil)
		if !regexp.MustCompile(`(?s)<h2 id="plan-free">free <span class="badge">Your plan</span>`).MatchString(plans.body) ||
			!strings.Contains(plans.body, "49.00 USD per month") || !strings.Contains(plans.body, "0.002 USD per unit") {
			t.Fatalf("plans page: %s", plans.body)
		}

		ids := b.keyIDs()
		if len(ids) != 1 {
			t.Fatalf("keys listed: %v", ids)
		}
		page := b.do("/keys", nil)
		res := b.do("/keys/"+ids[0]+"/roll", url.Values{"csrf": {csrf(t, page)}, "overlap": {"0s"}})
		m := secretPattern.FindStringSubmatch(res.body)
		if res.status != http.StatusCreated || m == nil {
			t.Fatalf("roll: %d %s", res.status, res.body)
		}
		rolled := m[1]
		if res := call(t, "/v1/basic/weather", key); res.status != http.StatusUnauthorized {
			t.Fatalf("the rolled key (overlap 0s) still works: %d", res.status)
		}
		if res := call(t, "/v1/basic/weather", rolled); res.status != http.StatusOK {
			t.Fatalf("the new key: %d %s", res.status, res.body)
		}
		ids = b.keyIDs()
		res = b.do("/keys/"+ids[0]+"/revoke", url.Values{"csrf": {csrf(t, b.do("/keys", nil))}})
		if res.status != http.StatusSeeOther {
			t.Fatalf("revoke: %d %s", res.status, res.body)
		}
		if res := call(t, "/v1/basic/weather", rolled); res.status != http.StatusUnauthorized {
			t.Fatalf("the revoked key still works: %d", res.status)
		}
		audit := admin(t, http.MethodGet, "/api_monetize/audit", "")
		for _, action := range []string{auditKeyCreated, auditKeyRolled, auditKeyRevoked} {
			if !regexp.MustCompile(`"actor":"portal"[^}]*"action":"` + action + `"`).MatchString(audit.body) {
				t.Errorf("no %s by the portal in the audit trail: %s", action, audit.body)
			}
		}
	})
}

// TestPortalSecurityHeaders: a strict CSP without script, no framing, and
// a session cookie that is __Host-, Secure, HttpOnly and SameSite=Lax.
func TestPortalSecurityHeaders(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "open")
	b := newBrowser(t)
	res := b.do("/signin", nil)
	want := "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
	if got := res.header.Get("Content-Security-Policy"); got != want {
		t.Errorf("CSP = %q, want %q", got, want)
	}
	if res.header.Get("X-Frame-Options") != "DENY" || res.header.Get("Referrer-Policy") != "no-referrer" || res.header.Get("Cache-Control") != "no-store" {
		t.Errorf("headers: %v", res.header)
	}
	if regexp.MustCompile(`<script(?: [^>]*)?>[^<]`).MatchString(res.body) || strings.Contains(res.body, "style=") || strings.Contains(res.body, " on") && regexp.MustCompile(` on[a-z]+=`).MatchString(res.body) {
		t.Errorf("the page has inline script, event handlers or style: %s", res.body)
	}
	b.signIn(smtp, "dev@example.com", 1)
	var line string
	for _, l := range b.signinCookies {
		if strings.HasPrefix(l, "__Host-am_portal=") {
			line = l
		}
	}
	for _, attr := range []string{"Path=/", "HttpOnly", "Secure", "SameSite=Lax"} {
		if !strings.Contains(line, "; "+attr) {
			t.Errorf("session cookie %q lacks %s", line, attr)
		}
	}
	if strings.Contains(line, "Domain=") {
		t.Errorf("session cookie %q has a Domain", line)
	}
}

// TestPortalCSRF: a state-changing form without the session's CSRF token,
// with a wrong one, or from another origin, is refused and changes
// nothing.
func TestPortalCSRF(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "open")
	b := newBrowser(t)
	b.signIn(smtp, "dev@example.com", 1)
	token := csrf(t, b.do("/keys", nil))
	for name, form := range map[string]url.Values{
		"missing": {"name": {"evil"}},
		"wrong":   {"name": {"evil"}, "csrf": {strings.Repeat("A", 43)}},
		"empty":   {"name": {"evil"}, "csrf": {""}},
	} {
		if res := b.do("/keys", form); res.status != http.StatusForbidden {
			t.Errorf("%s CSRF token: %d, want 403", name, res.status)
		}
	}
	b.origin = "https://evil.example"
	if res := b.do("/keys", url.Values{"name": {"evil"}, "csrf": {token}}); res.status != http.StatusForbidden {
		t.Errorf("cross-origin POST with the right token: %d, want 403", res.status)
	}
	b.origin = ""
	if ids := b.keyIDs(); len(ids) != 0 {
		t.Fatalf("a refused form created keys: %v", ids)
	}
	// The sign-in forms need the token of their cookie too.
	other := newBrowser(t)
	if res := other.do("/signin", url.Values{"email": {"dev@example.com"}}); res.status != http.StatusForbidden {
		t.Errorf("POST /signin without CSRF: %d, want 403", res.status)
	}
	// The right token works (the test can fail).
	if res := b.do("/keys", url.Values{"name": {"ok"}, "csrf": {token}}); res.status != http.StatusCreated {
		t.Errorf("POST /keys with the token: %d", res.status)
	}
}

// TestPortalSessionFixation: a session id planted before sign-in is
// replaced at sign-in and grants nothing; signing in again replaces (and
// ends) the previous session.
func TestPortalSessionFixation(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "open")
	b := newBrowser(t)
	planted := strings.Repeat("x", 43)
	b.cookies["__Host-am_portal"] = &http.Cookie{Name: "__Host-am_portal", Value: planted}
	b.signIn(smtp, "dev@example.com", 1)
	first := b.session()
	if first == "" || first == planted {
		t.Fatalf("session cookie after sign-in = %q, planted %q", first, planted)
	}
	attacker := newBrowser(t)
	attacker.cookies["__Host-am_portal"] = &http.Cookie{Name: "__Host-am_portal", Value: planted}
	if res := attacker.do("/keys", nil); res.status != http.StatusSeeOther {
		t.Fatalf("the planted id opened the keys page: %d", res.status)
	}
	b.signIn(smtp, "dev@example.com", 2)
	if second := b.session(); second == first {
		t.Fatal("signing in again kept the session id")
	}
	attacker.cookies["__Host-am_portal"] = &http.Cookie{Name: "__Host-am_portal", Value: first}
	if res := attacker.do("/keys", nil); res.status != http.StatusSeeOther {
		t.Fatalf("the replaced session still works: %d", res.status)
	}
	// Signing out ends the session in the store, not only in the browser.
	current := b.session()
	if res := b.do("/signout", url.Values{"csrf": {csrf(t, b.do("/keys", nil))}}); res.status != http.StatusSeeOther {
		t.Fatalf("sign out: %d", res.status)
	}
	attacker.cookies["__Host-am_portal"] = &http.Cookie{Name: "__Host-am_portal", Value: current}
	if res := attacker.do("/keys", nil); res.status != http.StatusSeeOther {
		t.Fatalf("the signed-out session still works: %d", res.status)
	}
}

// TestPortalCrossCustomer: a member cannot roll or revoke another
// customer's key; the answer is the same as for a key that does not exist.
func TestPortalCrossCustomer(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "open")
	alice, bob := newBrowser(t), newBrowser(t)
	alice.signIn(smtp, "alice@example.com", 1)
	bob.signIn(smtp, "bob@example.com", 1)
	bobKey := bob.createKey("bob's")
	bobID := bob.keyIDs()[0]
	if ids := alice.keyIDs(); len(ids) != 0 {
		t.Fatalf("alice sees keys %v", ids)
	}
	token := csrf(t, alice.do("/keys", nil))
	for _, action := range []string{"revoke", "roll"} {
		res := alice.do("/keys/"+bobID+"/"+action, url.Values{"csrf": {token}, "overlap": {"0s"}})
		missing := alice.do("/keys/no-such-key/"+action, url.Values{"csrf": {token}, "overlap": {"0s"}})
		if res.status != http.StatusNotFound || missing.status != http.StatusNotFound || res.body != missing.body {
			t.Errorf("%s of another customer's key: %d, of a missing key: %d", action, res.status, missing.status)
		}
	}
	if res := call(t, "/v1/basic/weather", bobKey); res.status != http.StatusOK {
		t.Fatalf("bob's key after alice's attempts: %d", res.status)
	}
	if ids := alice.keyIDs(); len(ids) != 0 {
		t.Fatalf("alice's attempts gave her keys: %v", ids)
	}
	if !strings.Contains(bob.do("/keys", nil).body, `<span class="status active">active</span>`) {
		t.Fatal("bob's key is no longer active")
	}
}

// TestPortalEnumeration: under the invite policy, an address the operator
// added and an unknown one get the same answer; only the first gets an
// email, and signing in with it lands on the existing customer.
func TestPortalEnumeration(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "invite")
	known := newBrowser(t).requestLink("owner@acme.test")
	unknown := newBrowser(t).requestLink("stranger@example.com")
	if known.status != http.StatusOK || known.status != unknown.status ||
		strings.ReplaceAll(known.body, "owner@acme.test", "X") != strings.ReplaceAll(unknown.body, "stranger@example.com", "X") {
		t.Fatalf("known: %d %s\nunknown: %d %s", known.status, known.body, unknown.status, unknown.body)
	}
	b := newBrowser(t)
	b.signIn(smtp, "owner@acme.test", 1)
	if res := call(t, "/v1/basic/x", b.createKey("ci")); !strings.HasPrefix(res.body, "ok customer=acme ") {
		t.Fatalf("the invited member's key is not acme's: %s", res.body)
	}
	for _, m := range smtp.Mails() {
		if m.To[0] == "stranger@example.com" {
			t.Fatal("an address the invite policy refuses got an email")
		}
	}
}

// TestPortalSignInLink: opening the link (as mail scanners do) does not
// consume it; the POST does, once; a forged token is refused.
func TestPortalSignInLink(t *testing.T) {
	smtp := startPortal(t, "store_path "+t.TempDir()+"/store.db", "open")
	b := newBrowser(t)
	b.requestLink("dev@example.com")
	link := waitLink(t, smtp, "dev@example.com", 1)
	scanner := newBrowser(t)
	for range 2 {
		if res := scanner.do(link, nil); res.status != http.StatusOK {
			t.Fatalf("GET link: %d", res.status)
		}
	}
	page := b.do(link, nil)
	form := url.Values{"csrf": {csrf(t, page)}, "token": {tokenIn(t, page)}}
	if res := b.do("/signin/confirm", form); res.status != http.StatusSeeOther {
		t.Fatalf("first POST: %d %s", res.status, res.body)
	}
	replay := newBrowser(t)
	p2 := replay.do(link, nil)
	if res := replay.do("/signin/confirm", url.Values{"csrf": {csrf(t, p2)}, "token": {tokenIn(t, p2)}}); res.status != http.StatusBadRequest || replay.session() != "" {
		t.Fatalf("second POST of the link: %d, session %q", res.status, replay.session())
	}
	forged := url.Values{"csrf": {csrf(t, p2)}, "token": {strings.Repeat("A", 43)}}
	if res := replay.do("/signin/confirm", forged); res.status != http.StatusBadRequest || replay.session() != "" {
		t.Fatalf("forged token: %d", res.status)
	}
}

// TestPortalThrottle: sign-in emails are limited per address (5 per 15
// minutes), whether or not the address is known; other addresses are not
// affected.
func TestPortalThrottle(t *testing.T) {
	startPortal(t, "store_path "+t.TempDir()+"/store.db", "invite")
	for _, email := range []string{"owner@acme.test", "nobody@example.com"} {
		b := newBrowser(t)
		for i := range 6 {
			res := b.requestLink(email)
			want := http.StatusOK
			if i == 5 {
				want = http.StatusTooManyRequests
			}
			if res.status != want {
				t.Fatalf("%s attempt %d: %d, want %d", email, i+1, res.status, want)
			}
		}
	}
	if res := newBrowser(t).requestLink("third@example.com"); res.status != http.StatusOK {
		t.Fatalf("another address: %d", res.status)
	}
}

// TestPortalSignInLinkRace: one link posted by several browsers at once
// signs in exactly one of them, on both stores.
func TestPortalSignInLinkRace(t *testing.T) {
	portalStores(t, func(t *testing.T, storeLine string) {
		smtp := startPortal(t, storeLine, "open")
		newBrowser(t).requestLink("dev@example.com")
		link := waitLink(t, smtp, "dev@example.com", 1)
		const n = 8
		browsers := make([]*browser, n)
		forms := make([]url.Values, n)
		for i := range browsers {
			browsers[i] = newBrowser(t)
			page := browsers[i].do(link, nil)
			forms[i] = url.Values{"csrf": {csrf(t, page)}, "token": {tokenIn(t, page)}}
		}
		statuses := make([]int, n)
		var wg sync.WaitGroup
		for i := range browsers {
			wg.Go(func() { statuses[i] = browsers[i].do("/signin/confirm", forms[i]).status })
		}
		wg.Wait()
		signedIn := 0
		for i, s := range statuses {
			if s == http.StatusSeeOther && browsers[i].session() != "" {
				signedIn++
			} else if s != http.StatusBadRequest {
				t.Errorf("browser %d: %d", i, s)
			}
		}
		if signedIn != 1 {
			t.Fatalf("%d browsers signed in with one link: %v", signedIn, statuses)
		}
	})
}

// TestPortalSessionSurvivesReload: sessions live in the store, so a
// config reload (a new portal handler and app) keeps members signed in,
// on both stores.
func TestPortalSessionSurvivesReload(t *testing.T) {
	portalStores(t, func(t *testing.T, storeLine string) {
		smtp := startPortal(t, storeLine, "open")
		b := newBrowser(t)
		b.signIn(smtp, "dev@example.com", 1)
		before := b.session()
		startPortal(t, storeLine, "open") // a reload: another SMTP server, so another config
		if res := b.do("/keys", nil); res.status != http.StatusOK || !strings.Contains(res.body, "dev@example.com") || b.session() != before {
			t.Fatalf("after a reload: %d", res.status)
		}
	})
}
