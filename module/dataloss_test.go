package module

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// Redis data loss: a Redis without persistence killed and restarted empty
// under load. The configured customers and keys come back at once, a valid
// key is never answered 401, and instances that generated their key secret
// agree on it again.

// Keys of the data-loss deployment: hot is used from the start (cached by
// both instances), cold only after the restart (looked up in the empty
// Redis).
const (
	dataLossHotKey  = "dataloss-hot-key-0123456789ab"
	dataLossColdKey = "dataloss-cold-key-0123456789a"
)

// dataLossCaddyfile is an instance of the data-loss deployment on the Redis
// at redisPort: no key_secret (each instance relies on the one kept in
// Redis), the admin API writable, one customer with two keys, no rate
// limit (only the store can refuse).
func dataLossCaddyfile(redisPort int) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis redis://127.0.0.1:%d/0
		admin_api read_write
		tier pro {
			included 1000000/month
			over_quota bill 0.001
		}
		customer acme tier pro
		key %s acme
		key %s acme
	}
}

:%d {
	api_monetize
	respond "ok"
}
`, adminPort, httpPort, redisPort, dataLossHotKey, dataLossColdKey, httpPort)
	}
}

// issueKeyOn issues a key for customer through p's admin API.
func issueKeyOn(t *testing.T, p *caddyProcess, customer string) string {
	t.Helper()
	res, err := oneShotClient(10*time.Second).Post(p.adminBase+"/api_monetize/customers/"+customer+"/keys", "application/json", nil)
	if err != nil {
		t.Fatalf("%s: issuing a key: %v", p.name, err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	var v keyView
	if res.StatusCode != http.StatusCreated || json.Unmarshal(body, &v) != nil || v.Key == "" {
		t.Fatalf("%s: issuing a key: %d %s", p.name, res.StatusCode, body)
	}
	return v.Key
}

// statusOf sends one request with key to p and returns the status.
func statusOf(t *testing.T, client *http.Client, p *caddyProcess, key string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, p.base+"/v1/x", nil)
	req.Header.Set("X-API-Key", key)
	res, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s: %v", p.name, err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode
}

// TestRedisDataLossReseedsAtOnce kills a Redis without persistence under
// load on two instances and restarts it empty. The test then waits until
// both configured keys are answered 200 by both instances again (well
// within the old minute's re-seed), and checks that no request with a
// valid key got 401 meanwhile. A third instance started afterwards reads
// the key secret the running ones wrote back, so a key issued by any of
// them works on all.
func TestRedisDataLossReseedsAtOnce(t *testing.T) {
	port := freePort(t)
	stop := startRedis(t, port)
	cfg := dataLossCaddyfile(port)
	// Errors the outage causes, logged by the store and the background loops.
	allowed := []string{"api_monetize store call failed", "could not re-store", "watching the store", "replay",
		"could not store the configured"}
	a := launchFaultyCaddy(t, "a", cfg, allowed...)
	b := launchFaultyCaddy(t, "b", cfg, allowed...)
	instances := []*caddyProcess{a, b}
	client := loadClient(t, 8)
	for _, p := range instances {
		if s := statusOf(t, client, p, dataLossHotKey); s != http.StatusOK {
			t.Fatalf("%s before the outage: %d", p.name, s)
		}
	}

	// Load on the hot key on both instances for the whole test; the cold
	// key joins after the restart.
	var mu sync.Mutex
	statuses := map[string]map[int]int{}
	record := func(phase string, status int) {
		mu.Lock()
		defer mu.Unlock()
		if statuses[phase] == nil {
			statuses[phase] = map[int]int{}
		}
		statuses[phase][status]++
	}
	var phase sync.Mutex
	current := "before"
	phaseNow := func() string { phase.Lock(); defer phase.Unlock(); return current }
	setPhase := func(p string) { phase.Lock(); current = p; phase.Unlock() }
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, p := range instances {
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-done:
						return
					default:
					}
					ph := phaseNow()
					req, _ := http.NewRequest(http.MethodGet, p.base+"/v1/x", nil)
					req.Header.Set("X-API-Key", dataLossHotKey)
					res, err := client.Do(req)
					if err != nil {
						record(ph, 0)
						continue
					}
					_, _ = io.Copy(io.Discard, res.Body)
					res.Body.Close()
					record(ph, res.StatusCode)
				}
			})
		}
	}
	stopLoad := sync.OnceFunc(func() { close(done); wg.Wait() })
	defer stopLoad()

	time.Sleep(300 * time.Millisecond) // some load before the kill
	setPhase("outage")
	stop()
	time.Sleep(1500 * time.Millisecond) // long enough for the breakers to open
	startRedis(t, port)
	setPhase("after")
	restarted := time.Now()

	// Both keys on both instances: 200 within a few seconds, never 401.
	deadline := time.Now().Add(20 * time.Second)
	var cold401 int
	for _, p := range instances {
		for {
			s := statusOf(t, client, p, dataLossColdKey)
			record("after-cold", s)
			if s == http.StatusUnauthorized {
				cold401++
			}
			if s == http.StatusOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the cold key still gets %d %v after the restart", p.name, s, time.Since(restarted))
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	coldBack := time.Since(restarted)
	// Let the load run past the watchers' re-subscription (their backoff
	// reaches 5 s during an outage), when every cached lookup is dropped.
	time.Sleep(6 * time.Second)
	stopLoad()
	t.Logf("statuses by phase: %v; cold key back on both %v after the restart", statuses, coldBack)
	for ph, m := range statuses {
		if m[http.StatusUnauthorized] > 0 {
			t.Errorf("phase %s: %d requests with a valid key got 401 (%v)", ph, m[http.StatusUnauthorized], m)
		}
	}
	if cold401 > 0 {
		t.Errorf("the cold key got 401 %d times after the restart", cold401)
	}

	// The generated key secret was written back: an instance started now
	// agrees with the running ones, in both directions.
	c := launchFaultyCaddy(t, "c", cfg, allowed...)
	fromA := issueKeyOn(t, a, "acme")
	fromC := issueKeyOn(t, c, "acme")
	for _, check := range []struct {
		p   *caddyProcess
		key string
		by  string
	}{{c, fromA, "a"}, {b, fromA, "a"}, {a, fromC, "c"}, {b, fromC, "c"}} {
		if s := statusOf(t, client, check.p, check.key); s != http.StatusOK {
			t.Errorf("a key issued by %s gets %d on %s: the instances disagree on the key secret", check.by, s, check.p.name)
		}
	}

	// Operator-facing: the missing persistence is warned about at start, and
	// no go-redis line bypassed Caddy's JSON logger (see also
	// TestRedisLogRouting).
	for _, p := range instances {
		out := p.logTail(1 << 30)
		if !strings.Contains(out, "Redis persists nothing") {
			t.Errorf("%s did not warn that Redis has no persistence", p.name)
		}
		for line := range strings.Lines(out) {
			if !strings.HasPrefix(line, "{") && strings.Contains(line, "redis: ") {
				t.Errorf("%s: a go-redis line bypassed Caddy's logger: %s", p.name, strings.TrimSpace(line))
				break
			}
		}
	}
}
