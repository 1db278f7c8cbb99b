package module

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Metering under faults: Redis killed and restarted, Caddy killed, config
// reloaded, all while requests flow; the ledger is compared with what the
// clients received.

// faultHangBound is the longest any request may take in the fault tests: a
// hang detector, not a benchmark (a store call is bounded by 100ms).
const faultHangBound = 2 * time.Second

// launchFaultyCaddy runs caddyfile in a new Caddy process like startCaddy,
// allowing error-level log lines that contain one of allowErrors (the
// test causes them); the test may kill it.
func launchFaultyCaddy(t *testing.T, name string, caddyfile func(adminPort, httpPort int) string, allowErrors ...string) *caddyProcess {
	t.Helper()
	p := launchCaddy(t, name, caddyfile)
	p.allowErrors = allowErrors
	p.waitServing(t)
	return p
}

// metric reads a counter of the process's metrics (0 when absent).
func (p *caddyProcess) metric(t *testing.T, name string) int64 {
	t.Helper()
	res, err := oneShotClient(10 * time.Second).Get(p.adminBase + "/metrics")
	if err != nil {
		t.Fatalf("%s: metrics: %v", p.name, err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("%s: metrics: status %d", p.name, res.StatusCode)
	}
	var sum int64
	sc := bufio.NewScanner(res.Body)
	for sc.Scan() {
		line := sc.Text()
		// A name may end in the first labels: `requests_total{decision="x"`.
		if !strings.HasPrefix(line, name+" ") && !strings.HasPrefix(line, name+"{") &&
			!(strings.Contains(name, "{") && strings.HasPrefix(line, name)) {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			t.Fatalf("%s: metric line %q: %v", p.name, line, err)
		}
		sum += int64(v)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("%s: metrics: %v", p.name, err)
	}
	return sum
}

// persistentRedis is a private redis-server with an append-only file, so
// that what it acknowledged survives kill -9: Redis writes (write(2)) the
// file before it replies, whatever the fsync policy, and the page cache
// outlives the process. fsync only matters for a machine crash; it is off
// (appendfsync no) because a disk flush per write would make this Redis
// itself slow (on a slow disk, slower than the store timeout).
type persistentRedis struct {
	port int
	dir  string
	cmd  *exec.Cmd
}

// startPersistentRedis starts a private redis-server on port with its data
// in dir, waits until it answers PING, and kills it when the test ends.
func startPersistentRedis(t *testing.T, port int, dir string) *persistentRedis {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed")
	}
	r := &persistentRedis{port: port, dir: dir}
	r.cmd = exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "",
		"--appendonly", "yes", "--appendfsync", "no", "--dir", dir)
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.kill)
	rdb := redis.NewClient(&redis.Options{Addr: fmt.Sprintf("127.0.0.1:%d", port), MaxRetries: -1})
	defer rdb.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := rdb.Ping(ctx).Err()
		cancel()
		if err == nil {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on port %d did not answer: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// kill sends SIGKILL and waits until the server is gone.
func (r *persistentRedis) kill() {
	if r.cmd.ProcessState == nil {
		_ = r.cmd.Process.Kill()
		_ = r.cmd.Wait()
	}
}

// runMeterLoad sends requests from n goroutines, request i of a goroutine being
// patterns[i%len(patterns)] with key, until stop is closed or (when
// stopOnError) the goroutine's first transport error. It returns a function
// that waits for the goroutines, and a counter of the requests answered or
// failed.
func runMeterLoad(client *http.Client, l *meterLoad, n int, key string, patterns []meterReq, stop <-chan struct{}, stopOnError bool) (wait func(), sent *atomic.Int64) {
	sent = new(atomic.Int64)
	var wg sync.WaitGroup
	for g := range n {
		wg.Go(func() {
			for i := g; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				r := patterns[i%len(patterns)]
				r.key = key
				_, err := l.send(client, r)
				sent.Add(1)
				if err != nil {
					if stopOnError {
						return
					}
					l.fail("GET %s: %v", r.url, err)
				}
			}
		})
	}
	return wg.Wait, sent
}

// waitUntil polls cond until it holds, failing the test at the deadline.
func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// eventually calls get until done accepts its value or timeout has
// passed, and returns the last value, for the caller to check and report.
func eventually[T any](timeout time.Duration, get func() T, done func(T) bool) T {
	deadline := time.Now().Add(timeout)
	for {
		v := get()
		if done(v) || time.Now().After(deadline) {
			return v
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// faultKey is the API key of the fault tests' customer.
const faultKey = "fault-test-key-0123456789abc"

// faultCaddyfile is a single-customer deployment with a bill quota in
// front of upstream; storeLines selects the store and onStoreError the
// tier's decision while it is unreachable.
func faultCaddyfile(storeLines, onStoreError, upstream string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		%s
		key_secret fault-test-secret-0123456
		tier payg {
			included 100/month
			over_quota bill 0.002
			on_store_error %s
		}
		customer payg tier payg
		key %s payg
	}
}

:%d {
	api_monetize {
		cost /v1/five* 5
	}
	reverse_proxy %s
}
`, adminPort, httpPort, storeLines, onStoreError, faultKey, httpPort, strings.TrimPrefix(upstream, "http://"))
	}
}

// faultPatterns are the requests of the fault tests' load, on base: costs
// 1 and 5, and a request the upstream fails (so its reservation is
// released). Each may also get the statuses in also.
func faultPatterns(base string, also ...int) []meterReq {
	ok, failed := append([]int{http.StatusOK}, also...), append([]int{http.StatusInternalServerError}, also...)
	return []meterReq{
		{url: base + "/v1/one", cost: 1, want: ok},
		{url: base + "/v1/five", cost: 5, want: ok},
		{url: base + "/v1/one", cost: 1, want: ok},
		{url: base + "/v1/one/fail", cost: 1, want: failed},
	}
}

// TestMeteringRedisKilledMidLoad kills Redis with SIGKILL while requests
// flow, keeps the load going during the outage (on_store_error local:
// admitted, usage spooled), restarts Redis on the same port and data, and
// keeps loading for a while. Once the spool is replayed, the ledger holds
// exactly the 2xx responses the clients received: nothing lost, nothing
// counted twice; and no request hung.
func TestMeteringRedisKilledMidLoad(t *testing.T) {
	port, dir := freePort(t), t.TempDir()
	rds := startPersistentRedis(t, port, dir)
	up := newExactUpstream(t)
	p := launchFaultyCaddy(t, "caddy", faultCaddyfile(fmt.Sprintf("redis redis://127.0.0.1:%d/0", port), "local", up.URL),
		"api_monetize store call failed")

	const loaders, phase = 8, 300 // goroutines; requests per phase
	client := loadClient(t, loaders)
	l := newMeterLoad()
	stop := make(chan struct{})
	// A 503 is checked below, on its own.
	wait, sent := runMeterLoad(client, l, loaders, faultKey, faultPatterns(p.base, http.StatusServiceUnavailable), stop, false)
	stopLoad := sync.OnceFunc(func() { close(stop); wait() })
	defer stopLoad()

	waitUntil(t, 30*time.Second, "the load ran before the outage", func() bool { return sent.Load() >= phase })
	rds.kill()
	killedAt := sent.Load()
	waitUntil(t, 30*time.Second, "the load ran during the outage", func() bool { return sent.Load() >= killedAt+phase })
	if p.metric(t, "caddy_api_monetize_spooled_records_total") == 0 {
		t.Fatal("no usage was spooled during the outage")
	}
	startPersistentRedis(t, port, dir)
	restartedAt := sent.Load()
	waitUntil(t, 30*time.Second, "the load ran after the restart", func() bool { return sent.Load() >= restartedAt+phase })
	stopLoad()
	l.check(t, "load")

	// The spool is replayed in the background (its metric moves when a
	// replay pass ends), and a settlement may follow its response. The
	// admin API answers 503 while the store's circuit breaker is open.
	var spooled, replayed int64
	var u usageView
	var err error
	deadline := time.Now().Add(30 * time.Second)
	for {
		spooled = p.metric(t, "caddy_api_monetize_spooled_records_total")
		replayed = p.metric(t, "caddy_api_monetize_replayed_records_total")
		u, err = p.tryUsage("payg")
		if err == nil && spooled == replayed && u.Billed == l.okUnits && u.Requests == l.okCount {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d records spooled, %d replayed; ledger: billed %d units in %d requests (%v); clients received %d 2xx responses worth %d units (outcomes %v)",
				spooled, replayed, u.Billed, u.Requests, err, l.okCount, l.okUnits, l.outcomes)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if lost := p.metric(t, "caddy_api_monetize_lost_usage_records_total"); lost != 0 {
		t.Errorf("%d usage records lost", lost)
	}
	if l.maxLatency > faultHangBound {
		t.Errorf("the slowest request took %v (bound %v)", l.maxLatency, faultHangBound)
	}
	t.Logf("%d requests (%d before the kill, %d until the restart): outcomes %v; %d records spooled and replayed; slowest request %v",
		sent.Load(), killedAt, restartedAt, l.outcomes, spooled, l.maxLatency)

	t.Run("a cached key is never refused", func(t *testing.T) {
		refused := 0
		for o, n := range l.outcomes {
			if o.status == http.StatusServiceUnavailable {
				refused += n
			}
		}
		if refused > 0 {
			t.Errorf("%d requests with a valid key got 503 (outcomes %v); on_store_error local admits them while Redis is unreachable", refused, l.outcomes)
		}
	})
}

// TestMeteringCaddyKilledMidLoad kills Caddy with SIGKILL while requests
// flow on the embedded store, then starts a new process on the same store
// file: every 2xx response a client received is in the ledger, and at most
// the requests in flight at the kill are counted beyond them.
func TestMeteringCaddyKilledMidLoad(t *testing.T) {
	storeLines := "store_path " + filepath.Join(t.TempDir(), "store.db") + "\n\t\tstore_flush_interval 50ms"
	up := newExactUpstream(t)
	cfg := faultCaddyfile(storeLines, "deny", up.URL)
	p := launchFaultyCaddy(t, "caddy", cfg)

	const loaders = 16
	client := loadClient(t, loaders)
	l := newMeterLoad()
	ok := []int{http.StatusOK}
	patterns := []meterReq{ // only 2xx: a 5xx released after its response reached the client is in flight too
		{url: p.base + "/v1/one", cost: 1, want: ok},
		{url: p.base + "/v1/five", cost: 5, want: ok},
	}
	wait, sent := runMeterLoad(client, l, loaders, faultKey, patterns, nil, true)
	// Several checkpoints (every 50ms) happen during the load.
	waitUntil(t, 30*time.Second, "the load ran", func() bool { return sent.Load() >= 1000 })
	p.kill(t)
	wait() // every loader stops at its first transport error
	l.check(t, "load")

	p2 := startCaddy(t, "caddy-restarted", cfg)
	u := p2.usage(t, "payg")
	if u.Billed < l.okUnits || u.Billed > l.okUnits+l.lostUnits {
		t.Errorf("ledger after the kill: billed %d units; clients received 2xx responses worth %d units, and %d requests worth %d units were in flight",
			u.Billed, l.okUnits, l.lostCount, l.lostUnits)
	}
	if u.Requests < l.okCount || u.Requests > l.okCount+l.lostCount {
		t.Errorf("ledger after the kill: %d requests; clients received %d 2xx responses, and %d requests were in flight",
			u.Requests, l.okCount, l.lostCount)
	}
	t.Logf("killed after %d requests: %d 2xx worth %d units received, %d without a response; ledger billed %d in %d requests",
		sent.Load(), l.okCount, l.okUnits, l.lostCount, u.Billed, u.Requests)
}

// TestMeteringReloadMidLoad reloads the configuration (alternating two
// variants) while requests flow, on both stores: the ledger holds exactly
// the 2xx responses the clients received.
func TestMeteringReloadMidLoad(t *testing.T) {
	t.Run("embedded store", func(t *testing.T) {
		testMeteringReloadMidLoad(t, "store_path "+filepath.Join(t.TempDir(), "store.db"))
	})
	t.Run("redis", func(t *testing.T) {
		testMeteringReloadMidLoad(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+redisTestPrefix(t)+"\n\t\tstore_timeout 2s")
	})
}

func testMeteringReloadMidLoad(t *testing.T, storeLines string) {
	up := newExactUpstream(t)
	// The variants differ in the tier's included units and in a cost rule
	// for a path the load does not use, so every reload is a real one.
	variant := func(v int) func(adminPort, httpPort int) string {
		cfg := faultCaddyfile(storeLines, "deny", up.URL)
		return func(adminPort, httpPort int) string {
			s := cfg(adminPort, httpPort)
			if v%2 == 1 {
				s = strings.Replace(s, "included 100/month", "included 120/month", 1)
				s = strings.Replace(s, "cost /v1/five* 5", "cost /v1/five* 5\n\t\tcost /v1/other 2", 1)
			}
			return s
		}
	}
	p := startCaddy(t, "caddy", variant(0))
	const loaders, reloads = 8, 10
	client := loadClient(t, loaders)
	l := newMeterLoad()
	l.retryResets = true
	stop := make(chan struct{})
	wait, sent := runMeterLoad(client, l, loaders, faultKey, faultPatterns(p.base), stop, false)
	stopLoad := sync.OnceFunc(func() { close(stop); wait() })
	defer stopLoad()

	for i := 1; i <= reloads; i++ {
		before := sent.Load()
		waitUntil(t, 30*time.Second, "requests flowed between reloads", func() bool { return sent.Load() >= before+20 })
		p.load(t, variant(i)(p.adminPort, p.httpPort))
	}
	before := sent.Load()
	waitUntil(t, 30*time.Second, "requests flowed after the reloads", func() bool { return sent.Load() >= before+50 })
	stopLoad()
	l.check(t, "load")

	u := pollUsage(t, p, "payg", func(u usageView) bool { return u.Billed == l.okUnits && u.Requests == l.okCount })
	if u.Billed != l.okUnits || u.Requests != l.okCount {
		t.Errorf("ledger after %d reloads: billed %d units in %d requests; clients received %d 2xx responses worth %d units (outcomes %v)",
			reloads, u.Billed, u.Requests, l.okCount, l.okUnits, l.outcomes)
	}
	t.Logf("%d reloads under load: %d requests, outcomes %v, %d retried after their new connection was reset",
		reloads, sent.Load(), l.outcomes, l.resets)
}
