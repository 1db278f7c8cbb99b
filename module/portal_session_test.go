package module

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// endSessionAction finds the "End" form of other sessions on the account
// page, capturing the public session id.
var endSessionAction = regexp.MustCompile(`action="[^"]*/account/sessions/([A-Za-z0-9_-]+)/end"`)

// sessionIDs are the public ids of the other sessions listed on the
// account page.
func sessionIDs(page response) []string {
	var ids []string
	for _, m := range endSessionAction.FindAllStringSubmatch(page.body, -1) {
		ids = append(ids, m[1])
	}
	return ids
}

// checkNoSecrets fails if the page shows a session cookie's value or the
// hash it is stored under.
func checkNoSecrets(t *testing.T, page response, cookies ...string) {
	t.Helper()
	for _, c := range cookies {
		sum := sha256.Sum256([]byte(c))
		if strings.Contains(page.body, c) || strings.Contains(page.body, hex.EncodeToString(sum[:])) {
			t.Fatalf("the account page shows a session secret")
		}
	}
}

// TestPortalSessionIdleTimeout: a session unused for session_idle_timeout
// ends (and stays ended); each use moves the deadline (a sliding window);
// a session in use ends anyway 12 hours after sign-in.
func TestPortalSessionIdleTimeout(t *testing.T) {
	t0 := time.Now()
	at := func(d time.Duration) {
		now := t0.Add(d)
		frozenClock.Store(&now)
	}
	at(0)
	t.Cleanup(func() { frozenClock.Store(nil) })
	smtp := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{})
	startPortalWith(t, portalConfigFull("store_path "+t.TempDir()+"/store.db", "open", smtp.Addr, "", "session_idle_timeout 30m"))
	b := newBrowser(t)
	b.signIn(smtp, "dev@example.com", 1)
	status := func(d time.Duration) int {
		t.Helper()
		at(d)
		return b.do("/keys", nil).status
	}
	if s := status(29 * time.Minute); s != http.StatusOK {
		t.Fatalf("29 minutes idle: %d", s)
	}
	if s := status(58 * time.Minute); s != http.StatusOK {
		t.Fatalf("29 minutes after the last use, 58 after sign-in: %d", s)
	}
	if s := status(58*time.Minute + 30*time.Minute); s != http.StatusSeeOther {
		t.Fatalf("30 minutes idle: %d, want a redirect to sign in", s)
	}
	if s := status(60 * time.Minute); s != http.StatusSeeOther {
		t.Fatalf("an idle-ended session came back: %d", s)
	}

	// Used every 25 minutes, a session still ends at 12 hours.
	at(0)
	b.signIn(smtp, "dev@example.com", 2)
	var d time.Duration
	for d = 25 * time.Minute; d < 12*time.Hour; d += 25 * time.Minute {
		if s := status(d); s != http.StatusOK {
			t.Fatalf("in use, %v after sign-in: %d", d, s)
		}
	}
	if s := status(12 * time.Hour); s != http.StatusSeeOther {
		t.Fatalf("12 hours after sign-in: %d", s)
	}
}

// TestPortalSessionsList: the account page lists the member's sessions
// (browser, address, sign-in and last use; never a secret); "Sign out
// everywhere else" ends the others at once, CSRF-protected; one session
// can be ended by its id, but not another member's; on the embedded
// store, the list and the ending survive config reloads.
func TestPortalSessionsList(t *testing.T) {
	storeLine := "store_path " + t.TempDir() + "/store.db"
	smtp := startPortal(t, storeLine, "open")
	laptop, phone, tablet := newBrowser(t), newBrowser(t), newBrowser(t)
	laptop.signIn(smtp, "dev@example.com", 1)
	phone.signIn(smtp, "dev@example.com", 2)
	tablet.signIn(smtp, "dev@example.com", 3)
	page := laptop.do("/account", nil)
	if page.status != http.StatusOK || strings.Count(page.body, "Go HTTP client") != 3 || strings.Count(page.body, "<td>127.0.0.1</td>") != 3 ||
		strings.Count(page.body, "This browser") != 1 || len(sessionIDs(page)) != 2 {
		t.Fatalf("account page: %d %s", page.status, page.body)
	}
	checkNoSecrets(t, page, laptop.session(), phone.session(), tablet.session())

	// Without the CSRF token, or from another origin, nothing ends.
	if res := laptop.do("/account/sessions/end-others", url.Values{}); res.status != http.StatusForbidden {
		t.Fatalf("end-others without CSRF: %d", res.status)
	}
	cross := laptop.tab()
	cross.origin = "https://evil.example"
	if res := cross.do("/account/sessions/end-others", url.Values{"csrf": {csrf(t, page)}}); res.status != http.StatusForbidden {
		t.Fatalf("end-others from another origin: %d", res.status)
	}
	if phone.do("/keys", nil).status != http.StatusOK || tablet.do("/keys", nil).status != http.StatusOK {
		t.Fatal("a refused request ended a session")
	}

	// Another member cannot end dev's sessions by id.
	mallory := newBrowser(t)
	mallory.signIn(smtp, "mallory@example.com", 1)
	for _, id := range sessionIDs(page) {
		if res := mallory.do("/account/sessions/"+id+"/end", url.Values{"csrf": {csrf(t, mallory.do("/account", nil))}}); res.status != http.StatusNotFound {
			t.Fatalf("another member ending a session: %d", res.status)
		}
	}
	if phone.do("/keys", nil).status != http.StatusOK || tablet.do("/keys", nil).status != http.StatusOK {
		t.Fatal("another member ended a session")
	}

	// A reload keeps the sessions and the list.
	startPortalWith(t, portalConfig(storeLine, "open", smtp.Addr))
	page = laptop.do("/account", nil)
	if len(sessionIDs(page)) != 2 {
		t.Fatalf("after a reload: %s", page.body)
	}
	// End one by id, then the rest.
	tabletID := ""
	for _, id := range sessionIDs(page) {
		if strings.Contains(tablet.do("/account", nil).body, id) {
			continue // the phone's (the tablet's own page does not offer its own id)
		}
		tabletID = id
	}
	if res := laptop.do("/account/sessions/"+tabletID+"/end", url.Values{"csrf": {csrf(t, page)}}); res.status != http.StatusOK || !strings.Contains(res.body, `id="ended"`) {
		t.Fatalf("ending one session: %d %s", res.status, res.body)
	}
	if tablet.do("/keys", nil).status != http.StatusSeeOther || phone.do("/keys", nil).status != http.StatusOK {
		t.Fatal("ending one session by id ended the wrong one")
	}
	res := laptop.do("/account/sessions/end-others", url.Values{"csrf": {csrf(t, page)}})
	if res.status != http.StatusOK || !strings.Contains(res.body, "1 other session ended") || len(sessionIDs(res)) != 0 {
		t.Fatalf("sign out everywhere else: %d %s", res.status, res.body)
	}
	if s := phone.do("/keys", nil).status; s != http.StatusSeeOther {
		t.Fatalf("the phone's session after sign out everywhere else: %d", s)
	}
	startPortalWith(t, portalConfig(storeLine, "open", smtp.Addr))
	if laptop.do("/keys", nil).status != http.StatusOK || phone.do("/keys", nil).status != http.StatusSeeOther || tablet.do("/keys", nil).status != http.StatusSeeOther {
		t.Fatal("after a second reload, the ended sessions came back or the laptop's ended")
	}
}

// portalProcessCaddyfile is a Caddy process serving the portal over
// plain http on loopback, with the store in Redis under prefix.
func portalProcessCaddyfile(prefix, smtp string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis %s
		redis_prefix %s
		store_timeout 2s
		key_secret multi-instance-secret-0123
		tier free {
			included 1000/month
		}
	}
}

:%d {
	handle /v1/* {
		api_monetize
		respond "ok"
	}
	handle {
		api_monetize_portal {
			base_url http://127.0.0.1:%d
			signup open
			email {
				smtp %s
				from portal@example.test
			}
		}
	}
}
`, adminPort, httpPort, testRedisURL, prefix, httpPort, httpPort, smtp)
	}
}

// signInAt signs email in at the portal at base (the n-th email to it).
func (b *browser) signInAt(base string, smtp *notifytest.SMTPServer, email string, n int) {
	b.t.Helper()
	anon := newBrowser(b.t)
	if res := anon.do(base+"/signin", url.Values{"csrf": {csrf(b.t, anon.do(base+"/signin", nil))}, "email": {email}}); res.status != http.StatusOK {
		b.t.Fatalf("POST /signin at %s: %d", base, res.status)
	}
	page := b.do(waitLink(b.t, smtp, email, n), nil)
	if res := b.do(base+"/signin/confirm", url.Values{"csrf": {csrf(b.t, page)}, "token": {tokenIn(b.t, page)}}); res.status != http.StatusSeeOther {
		b.t.Fatalf("POST /signin/confirm at %s: %d %s", base, res.status, res.body)
	}
}

// TestPortalSessionsTwoProcesses: two real Caddy processes sharing Redis.
// A session made on one is valid on the other, both are listed on either,
// and "Sign out everywhere else" on one ends the other session on both at
// once.
func TestPortalSessionsTwoProcesses(t *testing.T) {
	smtp := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{})
	prefix := redisTestPrefix(t)
	a := startCaddy(t, "a", portalProcessCaddyfile(prefix, smtp.Addr))
	b := startCaddy(t, "b", portalProcessCaddyfile(prefix, smtp.Addr))
	// Over plain http the cookie is am_portal; the same cookie is sent to
	// both (they are two origins only by port).
	onA, onB := newBrowser(t), newBrowser(t)
	onA.signInAt(a.base, smtp, "dev@example.com", 1)
	onB.signInAt(b.base, smtp, "dev@example.com", 2)
	for name, br := range map[string]*browser{"a's session on b": onA, "b's session on a": onB} {
		base := b.base
		if br == onB {
			base = a.base
		}
		if res := br.do(base+"/keys", nil); res.status != http.StatusOK || !strings.Contains(res.body, "dev@example.com") {
			t.Fatalf("%s: %d", name, res.status)
		}
	}
	page := onA.do(b.base+"/account", nil)
	if len(sessionIDs(page)) != 1 || strings.Count(page.body, "This browser") != 1 {
		t.Fatalf("account page on b: %s", page.body)
	}
	checkNoSecrets(t, page, onA.cookies["am_portal"].Value, onB.cookies["am_portal"].Value)
	if res := onA.do(b.base+"/account/sessions/end-others", url.Values{"csrf": {csrf(t, page)}}); res.status != http.StatusOK || !strings.Contains(res.body, "1 other session ended") {
		t.Fatalf("end-others on b: %d %s", res.status, res.body)
	}
	// At once, on both processes: no cache to wait for.
	for _, base := range []string{a.base, b.base} {
		if s := onB.do(base+"/keys", nil).status; s != http.StatusSeeOther {
			t.Fatalf("the ended session on %s: %d", base, s)
		}
		if s := onA.do(base+"/keys", nil).status; s != http.StatusOK {
			t.Fatalf("the remaining session on %s: %d", base, s)
		}
	}
}
