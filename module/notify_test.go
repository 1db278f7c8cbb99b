package module

import (
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/mail"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifier"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// envNotifyFast makes a Caddy process started by a test use the short
// notifier timings of fastNotify.
const envNotifyFast = "API_MONETIZE_TEST_NOTIFY_FAST"

func init() {
	if os.Getenv(envNotifyFast) == "1" {
		fastNotify()
	}
}

var fastNotifyOnce sync.Once

// fastNotify shortens the notifier's timings: it runs (and scans keys for
// expiry notices) every 20ms and gives up on a delivery after 2s. Call it before any notifier runs.
func fastNotify() {
	fastNotifyOnce.Do(func() {
		notifyInterval = 20 * time.Millisecond
		notifyLeaseTTL = 3 * time.Second
		notifyRetry = notify.Retry{Base: 30 * time.Millisecond, Max: 120 * time.Millisecond, GiveUp: 2 * time.Second}
		keyExpiryScanInterval.Store(int64(20 * time.Millisecond))
	})
}

const (
	notifyAcmeKey  = "notify-acme-key-0123456789"
	notifyQuietKey = "notify-quiet-key-012345678"
	notifyLateKey  = "notify-late-key-0123456789"
	// notifyBadSecret signs for a receiver that refuses everything.
	notifyBadSecret = "whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"
)

// notifyConfig is a deployment with a bill tier (acme and late, who have
// email addresses) and a block tier (quiet, who has none), 10 units included,
// thresholds 80 100 120, two webhooks and email. /v1/big costs 13 units.
func notifyConfig(adminPort, httpPort int, storeLines, goodURL, badURL, smtpAddr, extraCost string) string {
	return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		%s
		key_secret notify-test-secret-0123456
		admin_api read_write
		thresholds 80 100 120
		notify {
			webhook %s {
				secret {env.NOTIFY_TEST_SECRET}
			}
			webhook %s {
				secret %s
			}
			email {
				smtp %s
				username {env.NOTIFY_TEST_SMTP_USER}
				password {env.NOTIFY_TEST_SMTP_PASSWORD}
				from "API Billing <billing@example.com>"
			}
		}
		tier metered {
			included 10/month
			over_quota bill 0.002
		}
		tier capped {
			included 10/month
		}
		customer acme tier metered email dev@acme.example
		customer quiet tier capped
		customer late tier metered email ops@late.example
		key %s acme
		key %s quiet
		key %s late
	}
}

:%d {
	api_monetize {
		cost /v1/big 13
		%s
	}
	respond "ok"
}
`, adminPort, httpPort, storeLines, goodURL, badURL, notifyBadSecret, smtpAddr, notifyAcmeKey, notifyQuietKey, notifyLateKey, httpPort, extraCost)
}

// notifyEnv sets the secrets the configuration reads from the
// environment, and returns the receivers' secret.
func notifyEnv(t *testing.T) string {
	secret := testWebhookSecret
	t.Setenv("NOTIFY_TEST_SECRET", secret)
	t.Setenv("NOTIFY_TEST_SMTP_USER", "mailer")
	t.Setenv("NOTIFY_TEST_SMTP_PASSWORD", "mail-password")
	return secret
}

// waitFor polls cond until it holds, failing the test at the deadline.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting until %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// sendN sends n requests to path with key and checks their status.
func sendN(t *testing.T, base, path, key string, n, want int) {
	t.Helper()
	for range n {
		res := do(t, http.MethodGet, base+path, http.Header{"X-Api-Key": {key}}, "")
		if res.status != want {
			t.Fatalf("GET %s: status %d, want %d: %s", path, res.status, want, res.body)
		}
	}
}

// listed reads GET /api_monetize/notifications with a query.
func listed(t *testing.T, adminBase, query string) []notifier.Notification {
	t.Helper()
	res := do(t, http.MethodGet, adminBase+"/api_monetize/notifications"+query, nil, "")
	if res.status != http.StatusOK {
		t.Fatalf("list notifications: %d %s", res.status, res.body)
	}
	var out []notifier.Notification
	if err := json.Unmarshal([]byte(res.body), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// thresholdsOf returns the (customer, threshold) of accepted deliveries in
// order, and fails on a payload that is not a threshold notification.
func thresholdsOf(t *testing.T, ds []notifytest.Delivery) []string {
	t.Helper()
	var out []string
	for _, d := range ds {
		var p notify.Payload
		if err := json.Unmarshal(d.Body, &p); err != nil || p.Type != notify.EventType {
			t.Fatalf("delivery %s: not a threshold notification (%v): %s", d.ID, err, d.Body)
		}
		out = append(out, fmt.Sprintf("%s/%d", p.Data.Customer, p.Data.Threshold))
	}
	return out
}

// TestNotifications drives a real Caddy: requests cross thresholds; a
// webhook receiver that refuses the first two attempts of every message
// verifies every signature with the Standard Webhooks library; an SMTP
// server refuses the first message once; a second webhook refuses
// everything and its notifications are dead-lettered; the admin API lists
// them and replays one.
func TestNotifications(t *testing.T) {
	fastNotify()
	t.Run("embedded", func(t *testing.T) {
		testNotifications(t, "store_path "+filepath.Join(t.TempDir(), "store.db"))
	})
	t.Run("redis", func(t *testing.T) {
		testNotifications(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+redisTestPrefix(t))
	})
	t.Run("redis cluster", func(t *testing.T) {
		testNotifications(t, clusterStoreLines(t))
	})
}

func testNotifications(t *testing.T, storeLines string) {
	secret := notifyEnv(t)
	good := notifytest.NewReceiver(t, secret, 2)
	bad := notifytest.NewReceiver(t, notifyBadSecret, 1<<30)
	smtpSrv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "mail-password", FailFirst: 1})
	cfg := notifyConfig(testAdminPort, testHTTPPort, storeLines, good.URL, bad.URL, smtpSrv.Addr, "")
	caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort}).InitServer(cfg, "caddyfile")
	if t.Failed() {
		t.FailNow()
	}

	// acme crosses 80 %, then jumps from 80 % to 210 % in one request:
	// 100 and 120 are notified too, in order.
	sendN(t, testBase, "/v1/x", notifyAcmeKey, 8, http.StatusOK)
	waitFor(t, 10*time.Second, "the 80 % webhook is accepted", func() bool { u, _ := good.Accepted(); return len(u) == 1 })
	sendN(t, testBase, "/v1/big", notifyAcmeKey, 1, http.StatusOK)
	// quiet (block tier, no email) reaches 100 % and is then refused.
	sendN(t, testBase, "/v1/x", notifyQuietKey, 10, http.StatusOK)
	sendN(t, testBase, "/v1/x", notifyQuietKey, 1, http.StatusTooManyRequests)

	waitFor(t, 20*time.Second, "5 webhooks and 3 emails are delivered", func() bool {
		u, _ := good.Accepted()
		return len(u) == 5 && len(smtpSrv.Mails()) == 3
	})
	waitFor(t, 20*time.Second, "the refusing webhook's 5 notifications are dead-lettered", func() bool {
		return len(listed(t, testAdminBase, "?state=dead")) == 5
	})

	if bad := good.Invalid(); len(bad) > 0 {
		t.Fatalf("signatures that did not verify: %v", bad)
	}
	unique, total := good.Accepted()
	got := thresholdsOf(t, unique)
	acme := slices.DeleteFunc(slices.Clone(got), func(s string) bool { return !strings.HasPrefix(s, "acme/") })
	quiet := slices.DeleteFunc(slices.Clone(got), func(s string) bool { return !strings.HasPrefix(s, "quiet/") })
	if !slices.Equal(acme, []string{"acme/80", "acme/100", "acme/120"}) || !slices.Equal(quiet, []string{"quiet/80", "quiet/100"}) {
		t.Errorf("webhooks accepted %v; want acme 80, 100, 120 and quiet 80, 100, each once and in order", got)
	}
	if total != len(unique) {
		t.Errorf("%d accepted deliveries for %d notifications", total, len(unique))
	}
	attempts := map[string]int{}
	for _, d := range good.Requests() {
		attempts[d.ID]++
	}
	for id, n := range attempts {
		if n != 3 {
			t.Errorf("%s: %d attempts, want 3 (two refused, then accepted)", id, n)
		}
	}

	period := metering.PeriodRule{}.Period(time.Now(), time.Time{})
	for _, d := range unique {
		var p notify.Payload
		_ = json.Unmarshal(d.Body, &p)
		dd := p.Data
		if !dd.Period.Start.Equal(period.Start) || !dd.Period.End.Equal(period.End) || dd.Included != 10 {
			t.Errorf("%s: period %v–%v included %d; want %v–%v, 10", d.ID, dd.Period.Start, dd.Period.End, dd.Included, period.Start, period.End)
		}
		var want notify.Data
		switch fmt.Sprintf("%s/%d", dd.Customer, dd.Threshold) {
		case "acme/80":
			want = notify.Data{Tier: "metered", Usage: 8, Percentage: 80, OverQuota: "bill", Message: "You have used 80% of your included API calls."}
		case "acme/100", "acme/120":
			want = notify.Data{Tier: "metered", Usage: 21, Percentage: 210, OverQuota: "bill", Message: "You have exceeded your included 10 API calls. Overage billing is active."}
		case "quiet/80":
			want = notify.Data{Tier: "capped", Usage: 8, Percentage: 80, OverQuota: "block", Message: "You have used 80% of your included API calls."}
		case "quiet/100":
			want = notify.Data{Tier: "capped", Usage: 10, Percentage: 100, OverQuota: "block", Message: "You have used all of your included 10 API calls. Further requests are blocked until the period ends."}
		}
		if dd.Tier != want.Tier || dd.Usage != want.Usage || dd.Percentage != want.Percentage || dd.OverQuota != want.OverQuota || dd.Message != want.Message {
			t.Errorf("%s: payload %+v; want %+v", d.ID, dd, want)
		}
	}

	// Email: acme only (quiet has no address), one per threshold.
	mails := smtpSrv.Mails()
	var subjects []string
	for _, m := range mails {
		if m.From != "billing@example.com" || !slices.Equal(m.To, []string{"dev@acme.example"}) || m.User != "mailer" {
			t.Errorf("mail from %q to %v as %q", m.From, m.To, m.User)
		}
		subject, text := parseMail(t, m.Data)
		subjects = append(subjects, subject)
		if !strings.Contains(text, "acme") || !strings.Contains(text, "You have") {
			t.Errorf("mail %q: body %q", subject, text)
		}
	}
	want := []string{"API usage alert: 80% of your included API calls", "API usage alert: 100% of your included API calls", "API usage alert: 120% of your included API calls"}
	if !slices.Equal(subjects, want) {
		t.Errorf("mail subjects %q, want %q", subjects, want)
	}

	// The admin API shows every notification with its delivery state.
	all := listed(t, testAdminBase, "")
	states := map[string]int{}
	for _, n := range all {
		states[n.Channel[:min(len(n.Channel), 7)]+" "+n.State]++
		if n.State == notifier.StateDelivered && (n.DeliveredAt.IsZero() || n.Attempts < 1) {
			t.Errorf("%s delivered without a time or attempts: %+v", n.ID, n)
		}
		if n.State == notifier.StateDead && (n.Attempts < 2 || n.LastError == "") {
			t.Errorf("%s dead after %d attempts, last error %q", n.ID, n.Attempts, n.LastError)
		}
	}
	if states["webhook delivered"] != 5 || states["webhook dead"] != 5 || states["email delivered"] != 3 || len(all) != 13 {
		t.Errorf("states %v of %d notifications; want 5 delivered and 5 dead webhooks, 3 delivered emails", states, len(all))
	}
	if n := len(listed(t, testAdminBase, "?customer=quiet")); n != 4 {
		t.Errorf("quiet has %d notifications, want 4 (two thresholds, two webhooks)", n)
	}

	// Replay a delivered webhook notification: sent again with the same
	// webhook-id (two refusals are used up, so it is accepted at once).
	id := unique[0].ID
	res := do(t, http.MethodPost, testAdminBase+"/api_monetize/notifications/"+url.PathEscape(id)+"/replay", nil, "")
	if res.status != http.StatusAccepted {
		t.Fatalf("replay: %d %s", res.status, res.body)
	}
	waitFor(t, 10*time.Second, "the replayed notification is accepted again", func() bool { _, n := good.Accepted(); return n == total+1 })
	// A dead notification replayed is pending again; replaying it while
	// pending is refused.
	deadID := listed(t, testAdminBase, "?state=dead")[0].ID
	if res := do(t, http.MethodPost, testAdminBase+"/api_monetize/notifications/"+url.PathEscape(deadID)+"/replay", nil, ""); res.status != http.StatusAccepted {
		t.Fatalf("replay dead: %d %s", res.status, res.body)
	}
	if res := do(t, http.MethodPost, testAdminBase+"/api_monetize/notifications/"+url.PathEscape(deadID)+"/replay", nil, ""); res.status != http.StatusConflict {
		t.Fatalf("replay pending: %d %s", res.status, res.body)
	}
	if res := do(t, http.MethodPost, testAdminBase+"/api_monetize/notifications/nope/replay", nil, ""); res.status != http.StatusNotFound {
		t.Fatalf("replay unknown: %d %s", res.status, res.body)
	}
	if u, _ := good.Accepted(); len(u) != 5 {
		t.Errorf("%d distinct notifications accepted after replays, want 5", len(u))
	}
}

// parseMail returns a message's subject and its text/plain part, checking
// it also has a text/html part.
func parseMail(t *testing.T, data []byte) (subject, text string) {
	t.Helper()
	msg, err := mail.ReadMessage(strings.NewReader(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	subject, _ = new(mime.WordDecoder).DecodeHeader(msg.Header.Get("Subject"))
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	html := false
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(p)
		switch ct, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type")); ct {
		case "text/plain":
			text = string(b)
		case "text/html":
			html = true
		}
	}
	if !html || text == "" {
		t.Errorf("mail %q lacks a text or an HTML part", subject)
	}
	return subject, text
}

// TestNotificationsAcrossInstancesAndReload runs real Caddy processes
// (two sharing Redis; one on the embedded store) and reloads them while a
// burst crosses 80, 100 and 120 % at once for one customer and 80 and 100
// for another: every channel receives each threshold exactly once. A
// later crossing by a third customer, delivered after the first ones,
// shows that nothing more was still on its way.
func TestNotificationsAcrossInstancesAndReload(t *testing.T) {
	t.Run("redis, two instances", func(t *testing.T) {
		testNotificationsAcrossReload(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+redisTestPrefix(t), 2)
	})
	t.Run("redis cluster, two instances", func(t *testing.T) {
		testNotificationsAcrossReload(t, clusterStoreLines(t), 2)
	})
	t.Run("embedded", func(t *testing.T) {
		testNotificationsAcrossReload(t, "store_path "+filepath.Join(t.TempDir(), "store.db"), 1)
	})
}

func testNotificationsAcrossReload(t *testing.T, storeLines string, instances int) {
	t.Setenv(envNotifyFast, "1")
	secret := notifyEnv(t)
	hookA := notifytest.NewReceiver(t, secret, 1)
	hookB := notifytest.NewReceiver(t, notifyBadSecret, 0)
	smtpSrv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "mail-password"})
	variant := func(v int) func(adminPort, httpPort int) string {
		extra := ""
		if v%2 == 1 {
			extra = "cost /v1/other 2"
		}
		return func(adminPort, httpPort int) string {
			return notifyConfig(adminPort, httpPort, storeLines, hookA.URL, hookB.URL, smtpSrv.Addr, extra)
		}
	}
	var procs []*caddyProcess
	for i := range instances {
		procs = append(procs, startCaddy(t, fmt.Sprintf("caddy%d", i+1), variant(0)))
	}

	// The burst: acme jumps from 0 to 130 % in one request; quiet's ten
	// requests are spread over the instances; every instance is reloaded
	// in the middle.
	var wg sync.WaitGroup
	wg.Go(func() { sendN(t, procs[len(procs)-1].base, "/v1/big", notifyAcmeKey, 1, http.StatusOK) })
	for i := range 10 {
		if i == 5 {
			for _, p := range procs {
				wg.Go(func() { p.load(t, variant(1)(p.adminPort, p.httpPort)) })
			}
		}
		sendN(t, procs[i%len(procs)].base, "/v1/x", notifyQuietKey, 1, http.StatusOK)
	}
	wg.Wait()
	waitFor(t, 30*time.Second, "each channel has the burst's notifications", func() bool {
		a, _ := hookA.Accepted()
		b, _ := hookB.Accepted()
		return len(a) >= 5 && len(b) >= 5 && len(smtpSrv.Mails()) >= 3
	})
	// The sentinel: one more crossing, notified after the burst's.
	sendN(t, procs[0].base, "/v1/big", notifyLateKey, 1, http.StatusOK)
	waitFor(t, 30*time.Second, "each channel has the sentinel's notifications", func() bool {
		a, _ := hookA.Accepted()
		b, _ := hookB.Accepted()
		return slices.Contains(thresholdsOf(t, a), "late/120") && slices.Contains(thresholdsOf(t, b), "late/120") && len(smtpSrv.Mails()) >= 6
	})

	want := []string{"acme/80", "acme/100", "acme/120", "quiet/80", "quiet/100", "late/80", "late/100", "late/120"}
	slices.Sort(want)
	for name, r := range map[string]*notifytest.Receiver{"webhook A": hookA, "webhook B": hookB} {
		if bad := r.Invalid(); len(bad) > 0 {
			t.Errorf("%s: signatures that did not verify: %v", name, bad)
		}
		unique, total := r.Accepted()
		got := thresholdsOf(t, unique)
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("%s received %v; want each of %v exactly once", name, got, want)
		}
		// Attempts in flight during the reload were allowed to finish and
		// recorded, so nothing was accepted twice.
		if total != len(unique) {
			t.Errorf("%s: %d accepted deliveries of %d notifications", name, total, len(unique))
		}
	}
	var subjects []string
	for _, m := range smtpSrv.Mails() {
		subject, _ := parseMail(t, m.Data)
		subjects = append(subjects, m.To[0]+" "+subject)
	}
	slices.Sort(subjects)
	wantMail := []string{
		"dev@acme.example API usage alert: 100% of your included API calls",
		"dev@acme.example API usage alert: 120% of your included API calls",
		"dev@acme.example API usage alert: 80% of your included API calls",
		"ops@late.example API usage alert: 100% of your included API calls",
		"ops@late.example API usage alert: 120% of your included API calls",
		"ops@late.example API usage alert: 80% of your included API calls",
	}
	if !slices.Equal(subjects, wantMail) {
		t.Errorf("mails %q; want %q", subjects, wantMail)
	}
	for _, p := range procs {
		waitFor(t, 10*time.Second, p.name+" lists every notification as delivered", func() bool {
			all := listed(t, p.adminBase, "")
			return len(all) == 3*len(want)-2 && !slices.ContainsFunc(all, func(n notifier.Notification) bool { return n.State != notifier.StateDelivered })
		})
	}
}
