package module

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// freezeClock sets the handler's and the key lifecycle's clock to at until
// the test ends.
func freezeClock(t *testing.T, at time.Time) {
	t.Helper()
	frozenClock.Store(&at)
	t.Cleanup(func() { frozenClock.Store(nil) })
}

func decodeKey(t *testing.T, r response, want int) keyView {
	t.Helper()
	if r.status != want {
		t.Fatalf("status %d, want %d: %s", r.status, want, r.body)
	}
	var k keyView
	if err := json.Unmarshal([]byte(r.body), &k); err != nil {
		t.Fatalf("key JSON: %v: %s", err, r.body)
	}
	return k
}

func listKeys(t *testing.T, customer string) map[string]keyView {
	t.Helper()
	r := admin(t, http.MethodGet, "/api_monetize/customers/"+customer+"/keys", "")
	var list []keyView
	if r.status != http.StatusOK || json.Unmarshal([]byte(r.body), &list) != nil {
		t.Fatalf("list keys: %d %s", r.status, r.body)
	}
	byID := make(map[string]keyView, len(list))
	for _, k := range list {
		if k.Key != "" {
			t.Errorf("the key list shows a key itself: %s", r.body)
		}
		byID[k.ID] = k
	}
	return byID
}

// wantExpired checks the expired-key problem for a key that expired at.
func wantExpired(t *testing.T, r response, at time.Time) {
	t.Helper()
	if r.status != http.StatusUnauthorized {
		t.Fatalf("expired key: status %d, want 401: %s", r.status, r.body)
	}
	p := r.problem(t)
	if p["type"] != problemExpiredKey {
		t.Errorf("expired key: problem type %v, want %s", p["type"], problemExpiredKey)
	}
	if d, _ := p["detail"].(string); !strings.Contains(d, at.UTC().Format(time.RFC3339Nano)) {
		t.Errorf("expired key: detail %q does not say when it expired (%s)", d, at.UTC().Format(time.RFC3339Nano))
	}
}

// wantInvalid checks the problem of an unknown or revoked key.
func wantInvalid(t *testing.T, r response) {
	t.Helper()
	if r.status != http.StatusUnauthorized {
		t.Fatalf("status %d, want 401: %s", r.status, r.body)
	}
	if p := r.problem(t); p["type"] != problemInvalidKey || strings.Contains(r.body, "expire") {
		t.Errorf("problem %s, want the invalid-api-key problem with nothing about expiry", r.body)
	}
}

func TestKeyAdminAPI(t *testing.T) { forEachStore(t, testKeyAdminAPI) }

func testKeyAdminAPI(t *testing.T, cfg testConfig) {
	newTester(t, cfg)
	for _, w := range []struct{ method, path string }{
		{http.MethodPost, "/api_monetize/customers/acme/keys"},
		{http.MethodPost, "/api_monetize/keys/key_x/roll"},
		{http.MethodPatch, "/api_monetize/keys/key_x"},
	} {
		if r := admin(t, w.method, w.path, `{"name":"x"}`); r.status != http.StatusForbidden {
			t.Errorf("%s %s with admin_api read_only: %d %s", w.method, w.path, r.status, r.body)
		}
	}
	cfg.extra = "admin_api read_write"
	newTester(t, cfg)
	now := time.Now().UTC()

	for _, bad := range []struct{ path, body, want string }{
		{"/api_monetize/customers/acme/keys", `{"nme":"ci"}`, `unknown field`},
		{"/api_monetize/customers/acme/keys", `{"name":"ci","expires_at":"2099-01-01T00:00:00Z","expires_in":"1h"}`, "not both"},
		{"/api_monetize/customers/acme/keys", `{"expires_at":"2001-01-01T00:00:00Z"}`, "must be in the future"},
		{"/api_monetize/customers/acme/keys", `{"expires_at":"tomorrow"}`, "expected an RFC 3339 date"},
		{"/api_monetize/customers/acme/keys", `{"expires_at":null}`, "got null"},
		{"/api_monetize/customers/acme/keys", `{"expires_in":"-5m"}`, "expected a positive duration"},
		{"/api_monetize/customers/acme/keys", `{"overlap":"1h"}`, "overlap: not accepted here"},
		{"/api_monetize/customers/acme/keys", `{"name":"a\u0000b"}`, "control and invisible characters"},
		{"/api_monetize/customers/acme/keys", `{"name":"` + strings.Repeat("n", 65) + `"}`, "at most 64 characters"},
		{"/api_monetize/customers/acme/keys", `{"name":"a"} {"name":"b"}`, "more than one JSON value"},
	} {
		if r := admin(t, http.MethodPost, bad.path, bad.body); r.status != http.StatusBadRequest || !strings.Contains(r.body, bad.want) {
			t.Errorf("POST %s %s: %d %s; want 400 mentioning %q", bad.path, bad.body, r.status, r.body, bad.want)
		}
	}
	if r := admin(t, http.MethodPost, "/api_monetize/customers/nobody/keys", `{"name":"ci"}`); r.status != http.StatusNotFound {
		t.Errorf("key for an unknown customer: %d %s", r.status, r.body)
	}

	// No body: a key without name or expiry, as before.
	plain := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", ""), http.StatusCreated)
	if plain.Key == "" || plain.Name != "" || plain.ExpiresAt != nil || plain.Status != "active" {
		t.Errorf("key issued without a body: %+v", plain)
	}
	ci := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", `{"name":"ci","expires_in":"720h"}`), http.StatusCreated)
	if ci.Name != "ci" || ci.ExpiresAt == nil || ci.ExpiresAt.Sub(now) < 719*time.Hour || ci.ExpiresAt.Sub(now) > 721*time.Hour || ci.Prefix == "" || ci.Status != "active" {
		t.Errorf("key with name and expires_in: %+v", ci)
	}
	soon := now.Add(3 * 24 * time.Hour).Truncate(time.Second)
	deploy := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", `{"name":"deploy","expires_at":"`+soon.Format(time.RFC3339)+`"}`), http.StatusCreated)
	if deploy.ExpiresAt == nil || !deploy.ExpiresAt.Equal(soon) || deploy.Status != "expiring" {
		t.Errorf("key expiring in 3 days: %+v", deploy)
	}
	if r := call(t, "/v1/reports", deploy.Key); r.status != http.StatusOK {
		t.Fatalf("new key: %d %s", r.status, r.body)
	}

	// PATCH: name, expiry in the past (expires at once), then none.
	if r := admin(t, http.MethodPatch, "/api_monetize/keys/"+deploy.ID, `{}`); r.status != http.StatusBadRequest || !strings.Contains(r.body, "name and/or expires_at") {
		t.Errorf("empty PATCH: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPatch, "/api_monetize/keys/"+deploy.ID, `{"overlap":"1h"}`); r.status != http.StatusBadRequest {
		t.Errorf("PATCH with overlap: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPatch, "/api_monetize/keys/key_missing", `{"name":"x"}`); r.status != http.StatusNotFound {
		t.Errorf("PATCH of an unknown key: %d %s", r.status, r.body)
	}
	renamed := decodeKey(t, admin(t, http.MethodPatch, "/api_monetize/keys/"+deploy.ID, `{"name":"deploy-2"}`), http.StatusOK)
	if renamed.Name != "deploy-2" || renamed.ExpiresAt == nil || !renamed.ExpiresAt.Equal(soon) {
		t.Errorf("renamed key: %+v", renamed)
	}
	past := now.Add(-time.Hour).Truncate(time.Second)
	expired := decodeKey(t, admin(t, http.MethodPatch, "/api_monetize/keys/"+deploy.ID, `{"expires_at":"`+past.Format(time.RFC3339)+`"}`), http.StatusOK)
	if expired.Status != "expired" {
		t.Errorf("key with a past expiry: %+v", expired)
	}
	wantExpired(t, call(t, "/v1/reports", deploy.Key), past)
	if k := decodeKey(t, admin(t, http.MethodPatch, "/api_monetize/keys/"+deploy.ID, `{"expires_at":null}`), http.StatusOK); k.ExpiresAt != nil || k.Status != "active" {
		t.Errorf("expiry removed: %+v", k)
	}
	if r := call(t, "/v1/reports", deploy.Key); r.status != http.StatusOK {
		t.Errorf("key whose expiry was removed: %d %s", r.status, r.body)
	}

	// Roll with the default overlap: same name, old key expires in 24 h.
	rolled := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/keys/"+ci.ID+"/roll", ""), http.StatusCreated)
	if rolled.Replaces != ci.ID || rolled.Name != "ci" || rolled.Key == "" || rolled.ID == ci.ID || rolled.ExpiresAt != nil {
		t.Errorf("roll: %+v", rolled)
	}
	keys := listKeys(t, "acme")
	if old := keys[ci.ID]; old.ExpiresAt == nil || old.ExpiresAt.Sub(now) < 23*time.Hour || old.ExpiresAt.Sub(now) > 25*time.Hour || old.Status != "expiring" {
		t.Errorf("rolled key after a default roll: %+v", old)
	}
	for _, k := range []string{ci.Key, rolled.Key} {
		if r := call(t, "/v1/reports", k); r.status != http.StatusOK {
			t.Errorf("during the overlap: %d %s", r.status, r.body)
		}
	}
	// Roll at once (0s) with a new name: the old key is revoked.
	again := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/keys/"+rolled.ID+"/roll", `{"overlap":"0s","name":"ci-2"}`), http.StatusCreated)
	if again.Name != "ci-2" || again.Replaces != rolled.ID {
		t.Errorf("roll with 0s: %+v", again)
	}
	wantInvalid(t, call(t, "/v1/reports", rolled.Key))
	if k := listKeys(t, "acme")[rolled.ID]; k.Status != "revoked" || k.RevokedAt == nil {
		t.Errorf("key rolled with 0s: %+v", k)
	}
	for _, bad := range []struct{ body, want string }{
		{`{"overlap":"-1h"}`, "overlap: expected a duration of 0s or more"},
		{`{"overlap":"soon"}`, "overlap: expected a duration"},
	} {
		if r := admin(t, http.MethodPost, "/api_monetize/keys/"+again.ID+"/roll", bad.body); r.status != http.StatusBadRequest || !strings.Contains(r.body, bad.want) {
			t.Errorf("roll %s: %d %s", bad.body, r.status, r.body)
		}
	}
	if r := admin(t, http.MethodPost, "/api_monetize/keys/"+rolled.ID+"/roll", ""); r.status != http.StatusConflict {
		t.Errorf("roll of a revoked key: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPatch, "/api_monetize/keys/"+rolled.ID, `{"name":"x"}`); r.status != http.StatusConflict {
		t.Errorf("PATCH of a revoked key: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/keys/key_missing/roll", ""); r.status != http.StatusNotFound {
		t.Errorf("roll of an unknown key: %d %s", r.status, r.body)
	}
	for range 2 { // the second revocation changes nothing, and is not recorded
		if r := admin(t, http.MethodDelete, "/api_monetize/keys/"+plain.ID, ""); r.status != http.StatusOK {
			t.Errorf("revoke: %d %s", r.status, r.body)
		}
	}

	// The audit trail: every change, in order, by the admin API, never the
	// key itself; paginated.
	want := []struct{ action, keyID, replaces string }{
		{auditKeyCreated, "", ""}, // acme's key declared in the configuration
		{auditKeyCreated, plain.ID, ""}, {auditKeyCreated, ci.ID, ""}, {auditKeyCreated, deploy.ID, ""},
		{auditKeyUpdated, deploy.ID, ""}, {auditKeyUpdated, deploy.ID, ""}, {auditKeyUpdated, deploy.ID, ""},
		{auditKeyRolled, rolled.ID, ci.ID}, {auditKeyRolled, again.ID, rolled.ID}, {auditKeyRevoked, plain.ID, ""},
	}
	var got []auditEntry
	after := ""
	for pages := 0; ; pages++ {
		r := admin(t, http.MethodGet, "/api_monetize/audit?limit=4&customer=acme&after="+after, "")
		var page auditPage
		if r.status != http.StatusOK || json.Unmarshal([]byte(r.body), &page) != nil {
			t.Fatalf("audit: %d %s", r.status, r.body)
		}
		for _, k := range []string{plain.Key, ci.Key, deploy.Key, rolled.Key, again.Key} {
			if strings.Contains(r.body, k) {
				t.Fatalf("the audit trail shows a key: %s", r.body)
			}
		}
		if len(page.Entries) > 4 {
			t.Fatalf("audit page of %d entries with limit=4", len(page.Entries))
		}
		got = append(got, page.Entries...)
		if page.Next == "" {
			break
		}
		if pages > 5 {
			t.Fatal("audit pagination does not end")
		}
		after = page.Next
	}
	if len(got) != len(want) {
		t.Fatalf("audit trail has %d entries, want %d: %+v", len(got), len(want), got)
	}
	if e := got[0]; e.Action != auditKeyCreated || e.Actor != actorConfig || e.Customer != "acme" {
		t.Errorf("audit[0] = %+v, want the creation of the declared key by the configuration", e)
	}
	for i, w := range want[1:] {
		e := got[i+1]
		if e.Action != w.action || e.KeyID != w.keyID || e.Replaces != w.replaces || e.Actor != actorAdminAPI || e.Customer != "acme" || e.At.IsZero() {
			t.Errorf("audit[%d] = %+v, want %s of %s (replacing %q) by the admin API", i, e, w.action, w.keyID, w.replaces)
		}
	}
	if r := admin(t, http.MethodGet, "/api_monetize/audit?limit=0", ""); r.status != http.StatusBadRequest {
		t.Errorf("audit limit=0: %d %s", r.status, r.body)
	}
	if r := admin(t, http.MethodPost, "/api_monetize/audit", ""); r.status != http.StatusMethodNotAllowed {
		t.Errorf("POST to the audit trail: %d", r.status)
	}
}

func TestKeyExpiresAtTheExactInstant(t *testing.T) { forEachStore(t, testKeyExpiresAtTheExactInstant) }

func testKeyExpiresAtTheExactInstant(t *testing.T, cfg testConfig) {
	cfg.extra = "admin_api read_write"
	newTester(t, cfg)
	expiry := time.Now().UTC().Add(time.Hour).Truncate(time.Second)
	k := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", `{"expires_at":"`+expiry.Format(time.RFC3339)+`"}`), http.StatusCreated)
	revoked := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", ""), http.StatusCreated)
	if r := admin(t, http.MethodDelete, "/api_monetize/keys/"+revoked.ID, ""); r.status != http.StatusOK {
		t.Fatalf("revoke: %d", r.status)
	}

	freezeClock(t, expiry.Add(-time.Nanosecond))
	if r := call(t, "/v1/reports", k.Key); r.status != http.StatusOK {
		t.Fatalf("one nanosecond before the expiry: %d %s", r.status, r.body)
	}
	freezeClock(t, expiry)
	wantExpired(t, call(t, "/v1/reports", k.Key), expiry)
	// Neither an unknown nor a revoked key learns anything about expiry.
	wantInvalid(t, call(t, "/v1/reports", "am_live_unknownkey0123456789abcdef"))
	wantInvalid(t, call(t, "/v1/reports", "never-issued-key-0123456789"))
	wantInvalid(t, call(t, "/v1/reports", revoked.Key))
	freezeClock(t, expiry.Add(-time.Nanosecond)) // the cached lookup decides on the clock, not on when it was cached
	if r := call(t, "/v1/reports", k.Key); r.status != http.StatusOK {
		t.Fatalf("clock back before the expiry: %d %s", r.status, r.body)
	}
}

func TestKeyRollOverlap(t *testing.T) { forEachStore(t, testKeyRollOverlap) }

// testKeyRollOverlap: both keys work during the overlap; from its end on,
// the old one gets the expired problem and the new one keeps working.
func testKeyRollOverlap(t *testing.T, cfg testConfig) {
	cfg.extra = "admin_api read_write"
	newTester(t, cfg)
	start := time.Now().UTC().Truncate(time.Second).Add(time.Second)
	freezeClock(t, start)
	old := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/customers/acme/keys", `{"name":"ci"}`), http.StatusCreated)
	if r := call(t, "/v1/reports", old.Key); r.status != http.StatusOK { // cached before the roll
		t.Fatalf("old key before the roll: %d", r.status)
	}
	rolled := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/keys/"+old.ID+"/roll", `{"overlap":"1h"}`), http.StatusCreated)
	end := start.Add(time.Hour)
	if k := listKeys(t, "acme")[old.ID]; k.ExpiresAt == nil || !k.ExpiresAt.Equal(end) {
		t.Fatalf("old key after the roll: %+v, want expires_at %v", k, end)
	}
	for _, at := range []time.Time{start, end.Add(-time.Nanosecond)} {
		freezeClock(t, at)
		for name, key := range map[string]string{"old": old.Key, "new": rolled.Key} {
			if r := call(t, "/v1/reports", key); r.status != http.StatusOK {
				t.Errorf("%s key at %v, during the overlap: %d %s", name, at, r.status, r.body)
			}
		}
	}
	freezeClock(t, end)
	wantExpired(t, call(t, "/v1/reports", old.Key), end)
	if r := call(t, "/v1/reports", rolled.Key); r.status != http.StatusOK {
		t.Errorf("new key after the overlap: %d %s", r.status, r.body)
	}
	// Rolling the expired key again never brings it back.
	if r := admin(t, http.MethodPost, "/api_monetize/keys/"+old.ID+"/roll", `{"overlap":"48h"}`); r.status != http.StatusCreated {
		t.Fatalf("roll of an expired key: %d %s", r.status, r.body)
	}
	wantExpired(t, call(t, "/v1/reports", old.Key), end)
}

// TestConfigKeyExpires: a key declared with expires stops at its date, a
// roll of it survives the configuration being re-asserted, and a new
// expires in the configuration replaces it.
func TestConfigKeyExpires(t *testing.T) { forEachStore(t, testConfigKeyExpires) }

func testConfigKeyExpires(t *testing.T, cfg testConfig) {
	const key = "dated-key-0123456789abcdef"
	expiry := time.Now().UTC().Add(48 * time.Hour).Truncate(time.Second)
	cfg.extra = fmt.Sprintf("admin_api read_write\n\t\tkey %s acme expires %s", key, expiry.Format(time.RFC3339))
	newTester(t, cfg)
	freezeClock(t, expiry.Add(-time.Second))
	if r := call(t, "/v1/reports", key); r.status != http.StatusOK {
		t.Fatalf("declared key before its expiry: %d %s", r.status, r.body)
	}
	freezeClock(t, expiry)
	wantExpired(t, call(t, "/v1/reports", key), expiry)

	frozenClock.Store(nil)
	var id string
	for kid, k := range listKeys(t, "acme") {
		if k.ExpiresAt != nil && k.ExpiresAt.Equal(expiry) {
			id = kid
		}
	}
	if id == "" {
		t.Fatal("the declared key is not listed with its expiry")
	}
	rolled := decodeKey(t, admin(t, http.MethodPost, "/api_monetize/keys/"+id+"/roll", `{"overlap":"1h"}`), http.StatusCreated)
	rollEnd := listKeys(t, "acme")[id].ExpiresAt
	newTester(t, cfg) // the same configuration again: the roll stands
	if k := listKeys(t, "acme")[id]; k.ExpiresAt == nil || !k.ExpiresAt.Equal(*rollEnd) {
		t.Errorf("after reloading the same configuration the rolled key expires at %v, want %v", k.ExpiresAt, rollEnd)
	}
	if r := call(t, "/v1/reports", rolled.Key); r.status != http.StatusOK {
		t.Errorf("new key after the reload: %d", r.status)
	}
	later := expiry.Add(24 * time.Hour)
	cfg.extra = fmt.Sprintf("admin_api read_write\n\t\tkey %s acme expires %s", key, later.Format(time.RFC3339))
	newTester(t, cfg) // a new declared expiry replaces it
	if k := listKeys(t, "acme")[id]; k.ExpiresAt == nil || !k.ExpiresAt.Equal(later) {
		t.Errorf("after declaring a new expiry the key expires at %v, want %v", k.ExpiresAt, later)
	}
}

// TestKeyExpiryDuringStoreOutage: with Redis gone, a key cached before
// the outage is still refused from its expiry on (the cached lookup knows
// the expiry), while the tier's on_store_error allow serves it before.
func TestKeyExpiryDuringStoreOutage(t *testing.T) {
	port := freePort(t)
	stop := startRedis(t, port)
	const key = "outage-dated-key-0123456789"
	expiry := time.Now().UTC().Add(2 * time.Hour).Truncate(time.Second)
	newTester(t, testConfig{
		storeLine: fmt.Sprintf("redis redis://127.0.0.1:%d/0", port),
		extra: fmt.Sprintf(`tier allow_tier {
			rate 100/hour
			on_store_error allow
		}
		customer c_allow tier allow_tier
		key %s c_allow expires %s`, key, expiry.Format(time.RFC3339)),
	})
	if r := call(t, "/v1/x", key); r.status != http.StatusOK { // cached
		t.Fatalf("before the outage: %d %s", r.status, r.body)
	}
	stop()
	// Past the cache's own lifetime, so the lookup must fall back to the
	// last one seen.
	freezeClock(t, expiry.Add(-time.Second))
	if r := call(t, "/v1/x", key); r.status != http.StatusOK {
		t.Fatalf("during the outage, before the expiry: %d %s", r.status, r.body)
	}
	freezeClock(t, expiry)
	wantExpired(t, call(t, "/v1/x", key), expiry)
}
