package module

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/oauth2-proxy/mockoidc"

	"github.com/apimonetize/caddy-api-monetize/internal/stripedouble"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// envPortalScreenshots, set to 1, makes TestPortalBrowser write its
// screenshots to docs/screenshots (they are committed); otherwise they go
// to a temporary directory.
const envPortalScreenshots = "API_MONETIZE_PORTAL_SCREENSHOTS"

// chromiumPath finds a Chromium or Chrome binary, "" when none.
func chromiumPath() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "headless_shell"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// browserMeter adds a meter of response bytes (counted in every tier) to
// TestPortalBrowser's configuration, so its usage and plans pages show
// one.
const browserMeter = `
		meter response {
			source response_bytes
		}`

// TestPortalBrowser drives a real headless Chromium through the portal
// served by Caddy: sign up by the emailed link, create a key, call the API
// with it, see the usage, roll the key, compare the plans, invite a
// teammate, see the account's sessions, sign out, then sign in again by
// clicking "Sign in with" a local OpenID provider (mockoidc). It takes a
// screenshot of every page.
func TestPortalBrowser(t *testing.T) {
	chromium := chromiumPath()
	if chromium == "" {
		t.Skip("no chromium binary on PATH (CI installs Debian's chromium package)")
	}
	shots := t.TempDir()
	if os.Getenv(envPortalScreenshots) == "1" {
		shots = filepath.Join("..", "docs", "screenshots")
		if err := os.MkdirAll(shots, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	double := stripedouble.New()
	defer double.Close()
	provider, err := mockoidc.Run()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = provider.Shutdown() })
	oc := provider.Config()
	smtp := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{})
	startPortalWith(t, portalConfigFull("store_path "+t.TempDir()+"/store.db", "open", smtp.Addr, portalStripeBlock(double.URL)+browserMeter,
		fmt.Sprintf("oidc %s %s %s", oc.Issuer, oc.ClientID, oc.ClientSecret)))

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium), chromedp.NoSandbox, chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1000, 720),
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.Flag("disable-component-update", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(actx)
	defer cancelBrowser()
	// The first run starts the browser and must not have a deadline.
	if err := chromedp.Do(bctx, chromedp.Navigate("about:blank")); err != nil {
		t.Fatalf("starting %s: %v", chromium, err)
	}
	ctx, cancel := context.WithTimeout(bctx, 90*time.Second)
	defer cancel()

	do := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(ctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	text := func(what string, a chromedp.Action[string]) string {
		t.Helper()
		v, err := chromedp.Run(ctx, a)
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return strings.TrimSpace(v)
	}
	shot := func(name string) chromedp.Action[chromedp.Void] {
		return chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			png, err := chromedp.FullScreenshot(100)(ctx, tg)
			if err != nil {
				return err
			}
			return os.WriteFile(filepath.Join(shots, name+".png"), png, 0o644)
		})
	}

	const email = "dev@example.com"
	do("sign-in page",
		chromedp.Navigate(portalBase+"/signin"),
		chromedp.WaitVisible(chromedp.ID("email")),
		shot("signin"),
		chromedp.SendKeys(chromedp.ID("email"), email),
		chromedp.Submit(chromedp.ID("email")),
		chromedp.WaitVisible(chromedp.ID("sent")),
		shot("signin-sent"),
	)
	if h := text("heading", chromedp.Text(chromedp.ID("sent"))); h != "Check your email" {
		t.Fatalf("after asking for a link: %q", h)
	}
	link := waitLink(t, smtp, email, 1)
	do("sign-in link",
		chromedp.Navigate(link),
		chromedp.WaitVisible(chromedp.ID("continue")),
		shot("signin-confirm"),
		chromedp.Click(chromedp.ID("continue")),
		chromedp.WaitVisible(chromedp.ID("create-key")),
	)

	do("create a key",
		chromedp.SendKeys(chromedp.ID("name"), "production"),
		chromedp.Click(chromedp.ID("create-key")),
		chromedp.WaitVisible(chromedp.ID("secret")),
		// The copy button appears only when the script ran under the CSP.
		chromedp.WaitVisible(chromedp.ID("copy")),
		shot("key-created"),
	)
	key := text("the new key", chromedp.Value(chromedp.ID("secret")))
	for range 7 {
		if res := call(t, "/v1/basic/forecast", key); res.status != http.StatusOK {
			t.Fatalf("API call with the key from the browser: %d %s", res.status, res.body)
		}
	}

	do("usage page",
		chromedp.Navigate(portalBase+"/usage"),
		chromedp.WaitVisible(chromedp.ID("used")),
		chromedp.WaitVisible(chromedp.ID("meter-chart-response")),
		shot("usage"),
	)
	used, remaining := text("used", chromedp.Text(chromedp.ID("used"))), text("remaining", chromedp.Text(chromedp.ID("remaining")))
	if used != "7" || remaining != "993" {
		t.Fatalf("usage page after 7 calls: used %q, remaining %q", used, remaining)
	}

	do("keys page and roll",
		chromedp.Navigate(portalBase+"/keys"),
		chromedp.WaitVisible(chromedp.CSS("table")),
		shot("keys"),
		chromedp.SetValue(chromedp.CSS(`select[name="overlap"]`), "0s"),
		chromedp.Click(chromedp.CSS(`.actions button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.ID("secret")),
	)
	rolled := text("the rolled key", chromedp.Value(chromedp.ID("secret")))
	if rolled == key || !strings.HasPrefix(rolled, key[:3]) {
		t.Fatalf("rolled key %q (old %q)", rolled, key)
	}
	if res := call(t, "/v1/basic/forecast", key); res.status != http.StatusUnauthorized {
		t.Fatalf("the old key after a roll with no overlap: %d", res.status)
	}
	if res := call(t, "/v1/basic/forecast", rolled); res.status != http.StatusOK {
		t.Fatalf("the rolled key: %d", res.status)
	}

	do("plans page",
		chromedp.Navigate(portalBase+"/plans"),
		chromedp.WaitVisible(chromedp.CSS(".plan.current")),
		chromedp.WaitVisible(chromedp.ID("upgrade-pro")),
		shot("plans"),
	)
	if current := text("current plan", chromedp.Text(chromedp.CSS(".plan.current h2"))); !strings.HasPrefix(current, "free") {
		t.Fatalf("current plan marked: %q", current)
	}
	if m := text("the plan's response meter", chromedp.Text(chromedp.CSS(".plan.current dd.meter"))); m != "Counted, not limited" {
		t.Fatalf("the current plan's response meter: %q", m)
	}

	do("team page: invite a teammate",
		chromedp.Navigate(portalBase+"/team"),
		chromedp.WaitVisible(chromedp.ID("invite-email")),
		chromedp.SendKeys(chromedp.ID("invite-email"), "mate@example.com"),
		chromedp.Click(chromedp.ID("invite")),
		chromedp.WaitVisible(chromedp.ID("invited")),
		shot("team"),
	)
	waitLink(t, smtp, "mate@example.com", 1)

	do("team page: make the teammate the owner (asks first)",
		chromedp.Click(chromedp.CSS(`form[action$="/team/transfer"] button`)),
		chromedp.WaitVisible(chromedp.ID("confirm-transfer")),
		shot("team-transfer"),
	)

	do("account page: sessions",
		chromedp.Navigate(portalBase+"/account"),
		chromedp.WaitVisible(chromedp.ID("sessions")),
		shot("account"),
	)
	if agent := text("this session's browser", chromedp.Text(chromedp.CSS("#sessions tr.current td"))); !strings.HasPrefix(agent, "Headless Chrome on Linux") {
		t.Fatalf("the sessions list shows this browser as %q", agent)
	}

	// Sign out, then sign in through the OpenID provider: the provider
	// (mockoidc) answers the authorization request at once with the
	// redirect back, which the browser follows to the portal's callback.
	const ssoEmail = "sso@example.com"
	provider.QueueUser(&mockoidc.MockUser{Subject: "sso-1", Email: ssoEmail, EmailVerified: true})
	do("sign out, then sign in with the OpenID provider",
		chromedp.Click(chromedp.CSS(`form.signout button`)),
		chromedp.WaitVisible(chromedp.ID("oidc")),
		chromedp.Click(chromedp.ID("oidc")),
		chromedp.WaitVisible(chromedp.ID("create-key")),
	)
	if who := text("signed-in member", chromedp.Text(chromedp.CSS(".who"))); who != ssoEmail {
		t.Fatalf("signed in through OpenID Connect as %q, want %s", who, ssoEmail)
	}
	loc := text("location", chromedp.Location())
	if loc != portalBase+"/keys" {
		t.Fatalf("after the OpenID sign-in the browser is at %s", loc)
	}
}
