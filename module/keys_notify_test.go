package module

import (
	"encoding/json"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/apimonetize/caddy-api-monetize/notify"
	"github.com/apimonetize/caddy-api-monetize/notify/notifytest"
)

// TestKeyExpiringNotifications walks a frozen clock past the 7-day and
// 1-day notices of keys' expiries, reloading the configuration between
// steps: each channel (two signed webhooks, email to customers with an
// address) receives each announcement exactly once, a key created a day
// before its expiry gets only the 1-day one, and a revoked key none.
func TestKeyExpiringNotifications(t *testing.T) {
	fastNotify()
	t.Run("embedded", func(t *testing.T) {
		testKeyExpiringNotifications(t, "store_path "+filepath.Join(t.TempDir(), "store.db"))
	})
	t.Run("redis", func(t *testing.T) {
		testKeyExpiringNotifications(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+redisTestPrefix(t))
	})
}

func testKeyExpiringNotifications(t *testing.T, storeLines string) {
	secret := notifyEnv(t)
	hookA := notifytest.NewReceiver(t, secret, 1) // refuses each first attempt: retried, same id
	hookB := notifytest.NewReceiver(t, notifyBadSecret, 0)
	smtpSrv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "mail-password"})
	load := func(extra string) {
		cfg := notifyConfig(testAdminPort, testHTTPPort, storeLines, hookA.URL, hookB.URL, smtpSrv.Addr, extra)
		caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: testAdminPort}).InitServer(cfg, "caddyfile")
		if t.Failed() {
			t.FailNow()
		}
	}
	load("")

	now := time.Now().UTC().Truncate(time.Second)
	expiry := now.Add(30 * 24 * time.Hour)
	create := func(customer, body string) keyView {
		return decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/"+customer+"/keys", body), http.StatusCreated)
	}
	month := create("acme", `{"name":"ci","expires_at":"`+expiry.Format(time.RFC3339)+`"}`)
	revoked := create("acme", `{"expires_at":"`+expiry.Format(time.RFC3339)+`"}`)
	if r := admin(t, http.MethodDelete, "/api_monetize/keys/"+revoked.ID, ""); r.status != http.StatusOK {
		t.Fatalf("revoke: %d", r.status)
	}
	create("late", `{"name":"forever"}`) // never expires: never announced

	// accepted returns the (key, notice) pairs a receiver accepted, and
	// how many accepted deliveries there were in all.
	accepted := func(r *notifytest.Receiver) ([]string, int) {
		unique, total := r.Accepted()
		var got []string
		for _, d := range unique {
			var p notify.KeyExpiringPayload
			if err := json.Unmarshal(d.Body, &p); err != nil || p.Type != notify.KeyExpiringType {
				t.Fatalf("delivery %s is not a key.expiring notification: %s", d.ID, d.Body)
			}
			if strings.Contains(string(d.Body), "am_live_") && !strings.Contains(string(d.Body), p.Data.KeyPrefix) {
				t.Fatalf("delivery %s shows more than the key's prefix: %s", d.ID, d.Body)
			}
			got = append(got, p.Data.KeyID+"/"+p.Data.Notice)
		}
		slices.Sort(got)
		return got, total
	}
	waitDelivered := func(what string, want ...string) {
		t.Helper()
		slices.Sort(want)
		waitFor(t, 20*time.Second, what, func() bool {
			a, _ := accepted(hookA)
			b, _ := accepted(hookB)
			return len(a) >= len(want) && len(b) >= len(want)
		})
		for name, r := range map[string]*notifytest.Receiver{"webhook A": hookA, "webhook B": hookB} {
			got, total := accepted(r)
			if !slices.Equal(got, want) || total != len(got) {
				t.Errorf("%s: %s: accepted %v (%d deliveries); want each of %v once", name, what, got, total, want)
			}
			if bad := r.Invalid(); len(bad) > 0 {
				t.Errorf("%s: signatures that did not verify: %v", name, bad)
			}
		}
	}

	// 8 days before: nothing is due.
	freezeClock(t, expiry.Add(-8*24*time.Hour))
	load("cost /v1/other 2")
	// 7 days before: the 7-day notice, once, across a reload.
	freezeClock(t, expiry.Add(-7*24*time.Hour))
	waitDelivered("the 7-day notice", month.ID+"/7d")
	load("")
	// A key created now for a customer with an email, expiring in 12 h:
	// only the 1-day notice.
	freezeClock(t, expiry.Add(-2*24*time.Hour))
	shortLived := create("late", `{"name":"tmp","expires_at":"`+expiry.Add(-2*24*time.Hour+12*time.Hour).Format(time.RFC3339)+`"}`)
	waitDelivered("the short-lived key's 1-day notice", month.ID+"/7d", shortLived.ID+"/1d")
	load("cost /v1/other 2")
	freezeClock(t, expiry.Add(-24*time.Hour))
	waitDelivered("the 1-day notice", month.ID+"/7d", shortLived.ID+"/1d", month.ID+"/1d")
	load("")
	// The expiry itself, and beyond: nothing more. A sentinel key, created
	// after the last reload, is announced after anything still on its way.
	freezeClock(t, expiry.Add(time.Hour))
	sentinel := create("quiet", `{"expires_at":"`+expiry.Add(2*time.Hour).Format(time.RFC3339)+`"}`)
	waitDelivered("the sentinel's notice", month.ID+"/7d", shortLived.ID+"/1d", month.ID+"/1d", sentinel.ID+"/1d")

	var subjects []string
	for _, m := range smtpSrv.Mails() {
		subject, text := parseMail(t, m.Data)
		if strings.Contains(text, "am_live_") && !strings.Contains(text, "…") {
			t.Errorf("mail shows a key: %s", text)
		}
		subjects = append(subjects, m.To[0]+" "+subject)
	}
	slices.Sort(subjects)
	wantMail := []string{
		"dev@acme.example API key expiring: " + month.Prefix + "… expires " + expiry.Format(time.RFC3339),
		"dev@acme.example API key expiring: " + month.Prefix + "… expires " + expiry.Format(time.RFC3339),
		"ops@late.example API key expiring: " + shortLived.Prefix + "… expires " + expiry.Add(-36*time.Hour).Format(time.RFC3339),
	}
	slices.Sort(wantMail)
	waitFor(t, 10*time.Second, "the mails", func() bool { return len(smtpSrv.Mails()) >= len(wantMail) })
	if !slices.Equal(subjects, wantMail) {
		t.Errorf("mails %q; want %q", subjects, wantMail)
	}
	if all := listed(t, testAdminBase, "?customer=acme"); len(all) != 6 { // 2 notices × (2 webhooks + email)
		t.Errorf("acme has %d notifications listed, want 6", len(all))
	}
}

// TestKeyExpiringAcrossInstancesAndReload: two Caddy processes on one
// Redis both scan for keys about to expire and are both reloaded while
// the notices go out; each channel receives each notice exactly once.
func TestKeyExpiringAcrossInstancesAndReload(t *testing.T) {
	t.Setenv(envNotifyFast, "1")
	secret := notifyEnv(t)
	hookA := notifytest.NewReceiver(t, secret, 1)
	hookB := notifytest.NewReceiver(t, notifyBadSecret, 0)
	smtpSrv := notifytest.NewSMTPServer(t, notifytest.SMTPOptions{User: "mailer", Password: "mail-password"})
	storeLines := "redis " + testRedisURL + "\n\t\tredis_prefix " + redisTestPrefix(t)
	variant := func(extra string) func(adminPort, httpPort int) string {
		return func(adminPort, httpPort int) string {
			return notifyConfig(adminPort, httpPort, storeLines, hookA.URL, hookB.URL, smtpSrv.Addr, extra)
		}
	}
	procs := []*caddyProcess{launchCaddy(t, "caddy1", variant("")), launchCaddy(t, "caddy2", variant(""))}
	for _, p := range procs {
		p.waitServing(t)
	}
	soon := time.Now().UTC().Add(3 * 24 * time.Hour).Truncate(time.Second).Format(time.RFC3339)
	var ids []string
	for i, customer := range []string{"acme", "late", "quiet"} {
		p := procs[i%2]
		k := decodeKey(t, do(t, http.MethodPost, p.adminBase+"/api_monetize/customers/"+customer+"/keys", nil, `{"expires_at":"`+soon+`"}`), http.StatusCreated)
		ids = append(ids, k.ID+"/7d")
		if i == 1 {
			for _, p := range procs { // reload both while the notices are created and sent
				p.load(t, variant("cost /v1/other 2")(p.adminPort, p.httpPort))
			}
		}
	}
	slices.Sort(ids)
	waitFor(t, 30*time.Second, "every notice on both webhooks and by email", func() bool {
		a, _ := hookA.Accepted()
		b, _ := hookB.Accepted()
		return len(a) >= len(ids) && len(b) >= len(ids) && len(smtpSrv.Mails()) >= 2
	})
	// A sentinel key, created after all that, is announced after anything
	// still on its way.
	sentinel := decodeKey(t, do(t, http.MethodPost, procs[1].adminBase+"/api_monetize/customers/quiet/keys", nil, `{"expires_at":"`+soon+`"}`), http.StatusCreated)
	ids = append(ids, sentinel.ID+"/7d")
	slices.Sort(ids)
	waitFor(t, 30*time.Second, "the sentinel's notice", func() bool {
		a, _ := hookA.Accepted()
		b, _ := hookB.Accepted()
		return len(a) >= len(ids) && len(b) >= len(ids)
	})
	for name, r := range map[string]*notifytest.Receiver{"webhook A": hookA, "webhook B": hookB} {
		unique, total := r.Accepted()
		var got []string
		for _, d := range unique {
			var p notify.KeyExpiringPayload
			if err := json.Unmarshal(d.Body, &p); err != nil {
				t.Fatal(err)
			}
			got = append(got, p.Data.KeyID+"/"+p.Data.Notice)
		}
		slices.Sort(got)
		if !slices.Equal(got, ids) || total != len(unique) {
			t.Errorf("%s accepted %v in %d deliveries; want each of %v once", name, got, total, ids)
		}
		if bad := r.Invalid(); len(bad) > 0 {
			t.Errorf("%s: signatures that did not verify: %v", name, bad)
		}
	}
	if n := len(smtpSrv.Mails()); n != 2 { // acme and late have addresses, quiet none
		t.Errorf("%d mails, want 2", n)
	}
}
