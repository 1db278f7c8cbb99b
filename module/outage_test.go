package module

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// startRedis runs a private redis-server on a free loopback port and
// returns its port and a function that stops it.
func startRedis(t *testing.T, port int) (stop func()) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed")
	}
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on port %d did not start", port)
		}
		time.Sleep(20 * time.Millisecond)
	}
	stopped := false
	stop = func() {
		if !stopped {
			stopped = true
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
	}
	t.Cleanup(stop)
	return stop
}

// freePort returns one port as freePorts does.
func freePort(t *testing.T) int {
	t.Helper()
	return freePorts(t, 1)[0]
}

// TestRedisOutage kills Redis under a running config: each tier's
// on_store_error decides, and no request hangs.
func TestRedisOutage(t *testing.T) {
	port := freePort(t)
	stop := startRedis(t, port)
	cfg := testConfig{
		storeLine: fmt.Sprintf("redis redis://127.0.0.1:%d/0", port),
		extra: `tier local_tier {
			rate 3/hour
		}
		tier allow_tier {
			rate 3/hour
			on_store_error allow
		}
		tier deny_tier {
			rate 3/hour
			on_store_error deny
		}
		customer c_local tier local_tier
		customer c_allow tier allow_tier
		customer c_deny tier deny_tier
		key local-key-0123456789abcdef c_local
		key allow-key-0123456789abcdef c_allow
		key deny-key-0123456789abcdef c_deny`,
	}
	// Re-assert the configuration quickly, so the restarted (empty) Redis
	// gets the customers and keys back within the test.
	defer configResyncInterval.Store(configResyncInterval.Load())
	configResyncInterval.Store(int64(200 * time.Millisecond))
	newTester(t, cfg)
	keys := map[string]string{"local": "local-key-0123456789abcdef", "allow": "allow-key-0123456789abcdef", "deny": "deny-key-0123456789abcdef"}
	for name, key := range keys { // caches the keys and spends 1 of 3 units
		if r := call(t, "/v1/x", key); r.status != http.StatusOK || r.header.Get("X-RateLimit-Remaining") != "2" {
			t.Fatalf("%s before the outage: %d %v", name, r.status, r.header)
		}
	}

	stop()
	timed := func(key string) response {
		start := time.Now()
		r := call(t, "/v1/x", key)
		// A hang detector, not a benchmark: the bound is 100ms per store call.
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("request took %v during the outage", d)
		}
		return r
	}
	// local: limited in process, continuing from what Redis last said (1
	// of 3 units spent; this one instance takes the whole budget), with
	// headers.
	for i := 1; i >= 0; i-- {
		r := timed(keys["local"])
		if r.status != http.StatusOK || r.header.Get("X-RateLimit-Remaining") != strconv.Itoa(i) {
			t.Fatalf("local tier during the outage: %d remaining %q", r.status, r.header.Get("X-RateLimit-Remaining"))
		}
	}
	if r := timed(keys["local"]); r.status != http.StatusTooManyRequests {
		t.Errorf("local tier over its local budget: %d", r.status)
	}
	// allow: admitted without limiting.
	for range 5 {
		if r := timed(keys["allow"]); r.status != http.StatusOK {
			t.Fatalf("allow tier during the outage: %d", r.status)
		}
	}
	// deny: 503 problem.
	r := timed(keys["deny"])
	if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" {
		t.Fatalf("deny tier during the outage: %d %v", r.status, r.header)
	}
	if p := r.problem(t); p["type"] != problemReducedCapacity {
		t.Errorf("deny tier problem type %v", p["type"])
	}
	// An uncached key cannot be checked: 503, not 401.
	if r := timed("never-seen-key-0123456789"); r.status != http.StatusServiceUnavailable {
		t.Errorf("uncached key during the outage: %d", r.status)
	}

	// Redis comes back empty (no persistence): the configured customers and
	// keys are written again and decisions return to Redis.
	startRedisOn := startRedis(t, port)
	defer startRedisOn()
	degraded := getMetrics().requests.WithLabelValues("deny_tier", decisionAllowed)
	before := testutil.ToFloat64(degraded)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := call(t, "/v1/x", keys["deny"])
		if r.status == http.StatusOK {
			// The fresh Redis has no rate state: 3 - 1 = 2 remaining.
			if got := r.header.Get("X-RateLimit-Remaining"); got != "2" {
				t.Errorf("after recovery remaining %q, want 2", got)
			}
			break
		}
		// 503 while the breaker cools down, 401 until the resync ran.
		if time.Now().After(deadline) || (r.status != http.StatusServiceUnavailable && r.status != http.StatusUnauthorized) {
			t.Fatalf("deny tier after Redis returned: %d %s", r.status, r.body)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if testutil.ToFloat64(degraded) != before+1 {
		t.Errorf("allowed counter did not move by exactly one")
	}
	// The usage admitted during the outage was spooled and replayed into
	// the restarted Redis: 2 local calls, 5 allowed ones. The deny tier's
	// customer being back says nothing of the others: the resync stores
	// customers one by one (retrying while the breaker cools down) and the
	// replay runs on its own, so wait for each customer's final count.
	for customer, want := range map[string]int64{"c_local": 2, "c_allow": 5} {
		replayed := func(r response) bool {
			var v usageView
			return r.status == http.StatusOK && json.Unmarshal([]byte(r.body), &v) == nil && v.Billed == want
		}
		r := eventually(10*time.Second,
			func() response { return admin(t, http.MethodGet, "/api_monetize/customers/"+customer+"/usage", "") }, replayed)
		if !replayed(r) {
			t.Errorf("%s: usage in Redis after the replay is %d %s, want %d units", customer, r.status, r.body, want)
		}
	}
}
