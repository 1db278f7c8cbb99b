package module

import (
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Overload and Redis stalls over several real Caddy processes: a burst on
// a healthy Redis is decided by Redis (no breaker, no local admission, no
// 503), and a stalled Redis is bounded by the instances' shares of the
// budget and by store_timeout.

// busyLoops runs n shell busy loops that keep n CPUs busy until the test
// ends.
func busyLoops(t *testing.T, n int) {
	t.Helper()
	for range n {
		cmd := exec.Command("sh", "-c", "while :; do :; done")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		})
	}
}

// Overload test keys: one pro customer each (100 units per minute, burst
// 100).
const (
	overloadKey = "overload-pro-key-0123456789ab"
	stallFresh  = "stall-fresh-key-0123456789ab"
	stallSpent  = "stall-spent-key-0123456789ab"
	proLimit    = 100
	proPeriod   = time.Minute
)

// proCaddyfile is one instance of a deployment on redisURL with the pro
// tier (on_store_error local, the default) and customers "over", "fresh"
// and "spent". storeTimeout empty keeps the default (100ms).
func proCaddyfile(redisURL, prefix, storeTimeout string) func(adminPort, httpPort int) string {
	if storeTimeout != "" {
		storeTimeout = "store_timeout " + storeTimeout
	}
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis %s
		redis_prefix %s
		%s
		key_secret overload-test-secret-01234
		tier pro {
			rate %d/minute
		}
		customer over tier pro
		customer fresh tier pro
		customer spent tier pro
		key %s over
		key %s fresh
		key %s spent
	}
}

:%d {
	api_monetize
	respond "ok"
}
`, adminPort, httpPort, redisURL, prefix, storeTimeout, proLimit, overloadKey, stallFresh, stallSpent, httpPort)
	}
}

// startInstances starts n Caddy processes of cfg, allowing error-level log
// lines containing allowErrors, and waits until each counts n live
// instances through the store.
func startInstances(t *testing.T, n int, cfg func(adminPort, httpPort int) string, allowErrors ...string) []*caddyProcess {
	t.Helper()
	procs := make([]*caddyProcess, n)
	for i := range procs {
		procs[i] = launchCaddy(t, fmt.Sprintf("caddy-%d", i+1), cfg)
		procs[i].allowErrors = allowErrors
	}
	for _, p := range procs {
		p.waitServing(t)
	}
	for _, p := range procs {
		waitUntil(t, 15*time.Second, fmt.Sprintf("%s counts %d instances", p.name, n), func() bool {
			return p.metric(t, "caddy_api_monetize_live_instances") == int64(n)
		})
	}
	return procs
}

// TestBurstOnThreeInstancesUnderCPULoad sends 2,000 concurrent requests of
// one pro customer (100 units per minute) to three Caddy processes that
// share a healthy Redis, with a cold key cache and the CPUs kept busy by
// busy loops: Redis decides every one of them. Exactly the burst plus what
// the refill explains is admitted and billed, no response is a 5xx (the
// 2,000 cold lookups collapse into one per instance; calls queued past
// their deadline by this saturation wait for it, within OverloadWait,
// rather than being failed over), and nothing is admitted without Redis.
func TestBurstOnThreeInstancesUnderCPULoad(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three Caddy processes")
	}
	// A private Redis: the shared one also serves every other test
	// running on this machine, whose queue would be what is measured.
	port := freePort(t)
	startRedis(t, port)
	// On a machine this busy, Redis itself may lag past store_timeout:
	// such a call is a store error (logged); what it may cost is checked
	// below (nothing admitted without Redis, no 5xx).
	procs := startInstances(t, 3, proCaddyfile(fmt.Sprintf("redis://127.0.0.1:%d/0", port), "am:", ""),
		"api_monetize store call failed")
	busyLoops(t, 2)

	const n = 2000
	tr := &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: 0}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	c := newTally()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			c.get(client, procs[i%len(procs)].base+"/v1/items", overloadKey)
		})
	}
	began := time.Now()
	close(start)
	wg.Wait()
	took := time.Since(began)

	c.check(t, fmt.Sprintf("%d concurrent requests on 3 instances", n))
	// GCRA: over a span D the shared bucket admits at most its burst plus
	// ⌊D/T⌋ units (T = period/limit), and at least its burst.
	refill := int(took / (proPeriod / proLimit))
	ok, limited := c.statuses[http.StatusOK], c.statuses[http.StatusTooManyRequests]
	t.Logf("%d requests in %v: %d admitted, %d limited (refill explains up to %d)", n, took.Round(time.Millisecond), ok, limited, refill)
	if ok < proLimit || ok > proLimit+refill || ok+limited != n {
		t.Errorf("admitted %d and limited %d of %d, want %d to %d admitted (the burst plus the refill over %v) and the rest limited (statuses %v)",
			ok, limited, n, proLimit, proLimit+refill, took.Round(time.Millisecond), c.statuses)
	}
	storeErrors := int64(0)
	for _, p := range procs {
		// Store errors are calls Redis did not answer in time: on a
		// machine this busy, Redis itself can lag; they are logged, and
		// what they may cost is checked: nothing admitted without Redis.
		n := p.metric(t, `caddy_api_monetize_store_errors_total{operation="reserve"`)
		storeErrors += n
		t.Logf("%s: shed before the reservation %d, at it %d; reservations Redis did not answer in time %d", p.name,
			p.metric(t, `caddy_api_monetize_requests_total{decision="overloaded",tier="none"`),
			p.metric(t, `caddy_api_monetize_requests_total{decision="overloaded",tier="pro"`), n)
		if got := p.metric(t, `caddy_api_monetize_requests_total{decision="degraded_allowed"`); got != 0 {
			t.Errorf("%s admitted %d requests without the store while Redis was healthy", p.name, got)
		}
	}
	// Every admitted request is billed. A reservation that Redis ran
	// after its caller stopped waiting (a store error) and that was then
	// refused locally is billed too until the void its instance spooled
	// is replayed: at most one per store error (see docs/failures.md).
	u := eventually(10*time.Second, func() usageView {
		v, _ := procs[0].tryUsage("over")
		return v
	}, func(v usageView) bool { return v.Billed >= int64(ok) })
	if u.Billed < int64(ok) || u.Billed > int64(ok)+storeErrors || u.Requests != u.Billed {
		t.Errorf("ledger: %d units in %d requests billed, want the %d admitted (plus at most the %d reservations not answered in time)",
			u.Billed, u.Requests, ok, storeErrors)
	}
}

// TestRedisStalledUnderLoad stops a private Redis (SIGSTOP) for 5 s while
// three Caddy processes serve two pro customers: "fresh", with 3 of its
// 100 units spent, and "spent", with all 100 spent. During the stall the
// instances decide locally, each from what Redis last told it and with a
// third of the budget, so all three together admit at most the bound the
// README gives (n·⌊B/n⌋ + n·⌊D/Tₙ⌋ for "fresh"; for "spent", only the
// refill), where each instance alone would have admitted a full burst.
// No request waits longer than store_timeout plus a small margin, even one
// whose cached key was invalidated just before (a key lookup and a
// reservation that both time out share one deadline). Everything admitted
// is billed once Redis is back.
func TestRedisStalledUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("starts three Caddy processes")
	}
	const (
		storeTimeout = 200 * time.Millisecond
		// latencyMargin is what a request may take beyond store_timeout
		// on this shared machine (race detector, three Caddy processes).
		latencyMargin = 150 * time.Millisecond
		stall         = 5 * time.Second
	)
	port := freePort(t)
	rds := startPersistentRedis(t, port, t.TempDir())
	redisURL := fmt.Sprintf("redis://127.0.0.1:%d/0", port)
	procs := startInstances(t, 3, proCaddyfile(redisURL, "am:", storeTimeout.String()),
		"api_monetize store call failed", "watching the store", "could not re-store")
	n := int64(len(procs))
	client := loadClient(t, 64)

	// Before the stall: every instance caches both keys; "fresh" spends 3
	// units, "spent" its whole burst (then a 429 on every instance, so
	// each has seen it spent).
	warm := newTally()
	for _, p := range procs {
		warm.get(client, p.base+"/v1/items", stallFresh)
	}
	for i := range proLimit {
		warm.get(client, procs[i%len(procs)].base+"/v1/items", stallSpent)
	}
	seen := time.Now() // before any instance last heard from Redis
	for _, p := range procs {
		if status, _, _ := warm.get(client, p.base+"/v1/items", stallSpent); status != http.StatusTooManyRequests {
			t.Fatalf("%s: spent customer got %d, want 429", p.name, status)
		}
	}
	warm.check(t, "warm-up")
	if ok := warm.statuses[http.StatusOK]; ok != proLimit+len(procs) {
		t.Fatalf("warm-up admitted %d, want %d", ok, proLimit+len(procs))
	}
	// A key change invalidates every instance's key cache (through Redis
	// pub/sub): the first requests of the stall look their key up, time
	// out, fall back to the last lookup and reserve, all within one
	// store_timeout.
	invalidateKeyCaches(t, procs, redisURL)

	if err := rds.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			_ = rds.cmd.Process.Signal(syscall.SIGCONT)
		}
	}
	t.Cleanup(resume)

	loads := map[string]*meterLoad{stallFresh: newMeterLoad(), stallSpent: newMeterLoad()}
	stop := make(chan struct{})
	var waits []func()
	for key, l := range loads {
		for _, p := range procs {
			wait, _ := runMeterLoad(client, l, 2, key, []meterReq{{url: p.base + "/v1/items", cost: 1,
				want: []int{http.StatusOK, http.StatusTooManyRequests, http.StatusServiceUnavailable}}}, stop, false)
			waits = append(waits, wait)
		}
	}
	time.Sleep(stall)
	close(stop)
	for _, w := range waits {
		w()
	}
	ended := time.Now()
	degraded := make(map[string]int64)
	for _, p := range procs {
		degraded[p.name] = p.metric(t, `caddy_api_monetize_requests_total{decision="degraded_allowed"`)
	}
	resume()

	// The bound: instance i admits at most ⌊(B − owedᵢ)/n⌋ + ⌊D/Tₙ⌋
	// units, Tₙ = ⌈n·period/limit⌉: for "fresh" at most n·⌊B/n⌋ +
	// n·⌊D/Tₙ⌋; "spent" was seen spent, so from the last 429 on each
	// instance has only the refill (one unit of rounding each).
	tn := (time.Duration(n)*proPeriod + proLimit - 1) / proLimit
	d := ended.Sub(stopped)
	bounds := map[string]int64{
		stallFresh: n*(proLimit/n) + n*int64(d/tn),
		stallSpent: n*int64(ended.Sub(seen)/tn) + n,
	}
	for key, l := range loads {
		l.mu.Lock()
		outcomes, maxLatency, nfail, failures, ok := l.outcomes, l.maxLatency, l.nfail, l.failures, l.okUnits
		l.mu.Unlock()
		t.Logf("%s, stall of %v: outcomes %v, slowest request %v; bound %d; degraded admissions per instance %v",
			key[:11], d.Round(time.Millisecond), outcomes, maxLatency, bounds[key], degraded)
		if nfail > 0 {
			t.Errorf("%d requests failed during the stall; first: %s", nfail, strings.Join(failures, "\n"))
		}
		if maxLatency > storeTimeout+latencyMargin {
			t.Errorf("a request took %v during the stall, want at most store_timeout %v + %v", maxLatency, storeTimeout, latencyMargin)
		}
		if ok > bounds[key] {
			t.Errorf("%s: %d units admitted by %d instances during a %v stall, want at most %d", key[:11], ok, n, d.Round(time.Millisecond), bounds[key])
		}
	}

	// Once Redis answers again, the usage admitted during the stall is
	// replayed: every 2xx is billed, and nothing else. A reservation sent
	// just before the stall and timed out runs when Redis resumes; if the
	// instance then refused the request locally, the void it spooled
	// takes it back (see store.Settlement.Void). Checked once every
	// instance has replayed all it spooled.
	drained := eventually(15*time.Second, func() bool {
		for _, p := range procs {
			sp, rp := p.metric(t, "caddy_api_monetize_spooled_records_total"), p.metric(t, "caddy_api_monetize_replayed_records_total")
			if sp != rp {
				return false
			}
		}
		return true
	}, func(ok bool) bool { return ok })
	if !drained {
		t.Fatal("the instances did not replay their spools within 15 s")
	}
	for _, p := range procs {
		t.Logf("%s: %d records spooled (admissions, settlements, voids) and replayed", p.name, p.metric(t, "caddy_api_monetize_spooled_records_total"))
		if lost := p.metric(t, "caddy_api_monetize_lost_usage_records_total"); lost != 0 {
			t.Errorf("%s lost %d usage records", p.name, lost)
		}
	}
	for customer, admitted := range map[string]int64{
		"fresh": int64(len(procs)) + loads[stallFresh].okUnits,
		"spent": proLimit + loads[stallSpent].okUnits,
	} {
		u, _ := procs[0].tryUsage(customer)
		t.Logf("%s: %d units admitted, %d billed in %d requests", customer, admitted, u.Billed, u.Requests)
		if u.Billed != admitted || u.Requests != admitted {
			t.Errorf("%s: %d units billed in %d requests after the replay, want exactly the %d admitted", customer, u.Billed, u.Requests, admitted)
		}
	}
}

// invalidateKeyCaches announces a key change on Redis's change channel,
// as any instance does when a key changes: every instance empties its key
// cache (keeping the entries as the fallback during an outage).
func invalidateKeyCaches(t *testing.T, procs []*caddyProcess, redisURL string) {
	t.Helper()
	opts, err := redis.ParseURL(redisURL)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	receivers, err := rdb.Publish(ctx, "am:changes", "key").Result()
	if err != nil {
		t.Fatal(err)
	}
	if receivers != int64(len(procs)) {
		t.Fatalf("%d instances subscribed to the change channel, want %d", receivers, len(procs))
	}
	// Delivery takes a moment; the bound checked does not depend on it.
	time.Sleep(200 * time.Millisecond)
}
