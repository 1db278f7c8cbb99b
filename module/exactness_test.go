package module

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/internal/rediscluster"
)

// Metering exactness: what the ledger records is compared with what the
// clients received, request by request, over several real Caddy processes.

// Exactness test keys and customers (see exactCaddyfile).
const (
	exactMixedKey = "exact-mixed-key-0123456789ab" // block 100, costs 1 and 5
	exactOnesKey  = "exact-ones-key-0123456789abc" // block 100, cost 1
	exactPaygKey  = "exact-payg-key-0123456789abc" // bill beyond 50, with 5xx
	exactGatedKey = "exact-gated-key-0123456789ab" // bill beyond 50, one held 5xx
	exactIncluded = 50                             // the billed tier's included units
)

// exactUpstream is the upstream of the exactness tests: a path containing
// /fail answers 500, /v1/gate answers 500 once the test releases it (after
// signalling its arrival), anything else 200.
type exactUpstream struct {
	*httptest.Server
	arrived chan struct{} // receives when a /v1/gate request arrives
	release chan struct{} // closed to answer the waiting /v1/gate requests
}

func newExactUpstream(t *testing.T) *exactUpstream {
	u := &exactUpstream{arrived: make(chan struct{}, 1), release: make(chan struct{})}
	u.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/v1/gate":
			u.arrived <- struct{}{}
			select {
			case <-u.release:
			case <-r.Context().Done():
			}
			w.WriteHeader(http.StatusInternalServerError)
		case strings.Contains(r.URL.Path, "/fail"):
			w.WriteHeader(http.StatusInternalServerError)
			fmt.Fprint(w, "upstream failure")
		default:
			fmt.Fprint(w, "ok")
		}
	}))
	t.Cleanup(u.Close)
	return u
}

// exactCaddyfile is an instance of the exactness deployment, in front of
// upstream. The tiers have no rate limit (only their quotas can deny), deny
// while the store is unreachable (a degraded decision would make exact
// counts impossible) and have a generous store timeout, so that a slow
// (race detector) run does not turn into 503s.
func exactCaddyfile(storeLines, upstream string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		%s
		store_timeout 2s
		key_secret exactness-test-secret-0123
		tier blocked {
			included 100/month
			over_quota block
			on_store_error deny
		}
		tier billed {
			included %d/month
			over_quota bill 0.002
			on_store_error deny
		}
		customer mixed tier blocked
		customer ones tier blocked
		customer payg tier billed
		customer gated tier billed
		key %s mixed
		key %s ones
		key %s payg
		key %s gated
	}
}

:%d {
	api_monetize {
		cost /v1/five* 5
	}
	reverse_proxy %s
}
`, adminPort, httpPort, storeLines, exactIncluded, exactMixedKey, exactOnesKey, exactPaygKey, exactGatedKey,
			httpPort, strings.TrimPrefix(upstream, "http://"))
	}
}

// usage reads a customer's usage for the current period through the
// process's admin API.
func (p *caddyProcess) usage(t *testing.T, customer string) usageView {
	t.Helper()
	v, err := p.tryUsage(customer)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// tryUsage reads a customer's usage like usage, returning any failure.
func (p *caddyProcess) tryUsage(customer string) (usageView, error) {
	var v usageView
	res, err := oneShotClient(10 * time.Second).Get(p.adminBase + "/api_monetize/customers/" + customer + "/usage")
	if err != nil {
		return v, fmt.Errorf("%s: usage of %s: %w", p.name, customer, err)
	}
	body, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusOK {
		return v, fmt.Errorf("%s: usage of %s: status %d, %v: %s", p.name, customer, res.StatusCode, err, body)
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return v, fmt.Errorf("%s: usage of %s: %w: %s", p.name, customer, err, body)
	}
	return v, nil
}

// meterReq is one request of a metered load: its URL, the key it is sent
// with, its cost under the cost rules, and the statuses it may get.
type meterReq struct {
	url  string
	key  string
	cost int64
	want []int
}

// meterOutcome is a request's cost and the status it got (0: no response).
type meterOutcome struct {
	cost   int64
	status int
}

// meterLoad records what the clients of a metered load received; safe for
// concurrent use.
type meterLoad struct {
	// retryResets retries a request whose new connection was reset or
	// closed before any response byte arrived (see tally.retryResets).
	retryResets bool

	mu         sync.Mutex
	outcomes   map[meterOutcome]int
	okCount    int64 // 2xx responses received
	okUnits    int64 // the sum of their costs
	lostCount  int64 // requests that got no response (a transport error)
	lostUnits  int64 // the sum of their costs
	resets     int
	maxLatency time.Duration
	failures   []string // the first few unexpected outcomes
	nfail      int
}

func newMeterLoad() *meterLoad { return &meterLoad{outcomes: make(map[meterOutcome]int)} }

func (l *meterLoad) fail(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nfail++
	if len(l.failures) < 10 {
		l.failures = append(l.failures, fmt.Sprintf(format, args...))
	}
}

// send sends r with client and records the outcome: a status outside
// r.want is a failure, and so is a 429 without a positive Retry-After. A
// transport error is recorded as a request without a response and
// returned; the caller decides whether it is a failure.
func (l *meterLoad) send(client *http.Client, r meterReq) (int, error) {
	for attempt := 0; ; attempt++ {
		var reused, responded atomic.Bool
		trace := &httptrace.ClientTrace{
			GotConn:              func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
			GotFirstResponseByte: func() { responded.Store(true) },
		}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, r.url, nil)
		if err != nil {
			panic(err)
		}
		req.Header.Set("X-API-Key", r.key)
		start := time.Now()
		res, err := client.Do(req)
		var body []byte
		if err == nil {
			body, err = io.ReadAll(res.Body)
			res.Body.Close()
		}
		took := time.Since(start)
		l.mu.Lock()
		l.maxLatency = max(l.maxLatency, took)
		l.mu.Unlock()
		if err != nil {
			if l.retryResets && attempt < maxResetRetries && !responded.Load() &&
				(!reused.Load() && isResetBeforeResponse(err) || isDialError(err)) {
				l.mu.Lock()
				l.resets++
				l.mu.Unlock()
				continue
			}
			l.mu.Lock()
			l.outcomes[meterOutcome{r.cost, 0}]++
			l.lostCount++
			l.lostUnits += r.cost
			l.mu.Unlock()
			return 0, err
		}
		status := res.StatusCode
		switch {
		case !slices.Contains(r.want, status):
			l.fail("GET %s: status %d, want one of %v: %.300s", r.url, status, r.want, body)
		case status == http.StatusTooManyRequests:
			if s, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || s < 1 {
				l.fail("GET %s: 429 with Retry-After %q", r.url, res.Header.Get("Retry-After"))
			}
		}
		l.mu.Lock()
		l.outcomes[meterOutcome{r.cost, status}]++
		if status >= 200 && status < 300 {
			l.okCount++
			l.okUnits += r.cost
		}
		l.mu.Unlock()
		return status, nil
	}
}

// check fails the test if any request got an unexpected outcome.
func (l *meterLoad) check(t *testing.T, what string) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nfail > 0 {
		t.Errorf("%s: %d requests got an unexpected answer (outcomes %v); first ones:\n%s", what, l.nfail, l.outcomes, strings.Join(l.failures, "\n"))
	}
}

// fireMeter sends reqs from concurrency goroutines; a request without a
// response is a failure.
func fireMeter(client *http.Client, reqs []meterReq, concurrency int) *meterLoad {
	l := newMeterLoad()
	next := make(chan meterReq)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for r := range next {
				if _, err := l.send(client, r); err != nil {
					l.fail("GET %s: %v", r.url, err)
				}
			}
		})
	}
	for _, r := range reqs {
		next <- r
	}
	close(next)
	wg.Wait()
	return l
}

// exactCluster is a deployment of the exactness configuration: its
// processes (one for the embedded store, three on one Redis) and a test
// upstream.
type exactCluster struct {
	procs    []*caddyProcess
	upstream *exactUpstream
}

// forEachExactCluster runs test against redisInstances Caddy processes
// sharing one Redis, against as many sharing a 3-master Redis Cluster
// (customers spread over all masters), and against one Caddy process on
// the embedded store.
func forEachExactCluster(t *testing.T, redisInstances int, test func(t *testing.T, c exactCluster)) {
	start := func(t *testing.T, n int, storeLines string) exactCluster {
		up := newExactUpstream(t)
		cfg := exactCaddyfile(storeLines, up.URL)
		c := exactCluster{upstream: up}
		for i := range n {
			c.procs = append(c.procs, launchCaddy(t, fmt.Sprintf("caddy-%d", i+1), cfg))
		}
		for _, p := range c.procs {
			p.waitServing(t)
		}
		return c
	}
	t.Run(fmt.Sprintf("redis, %d instances", redisInstances), func(t *testing.T) {
		prefix := redisTestPrefix(t)
		test(t, start(t, redisInstances, "redis "+testRedisURL+"\n\t\tredis_prefix "+prefix))
	})
	t.Run(fmt.Sprintf("redis cluster, %d instances", redisInstances), func(t *testing.T) {
		rc := sharedCluster(t)
		spreadCustomers(t, rc, "mixed", "ones", "payg", "gated")
		test(t, start(t, redisInstances, "redis_cluster "+rc.URL()+"\n\t\tredis_prefix "+redisTestPrefix(t)))
	})
	t.Run("embedded store", func(t *testing.T) {
		test(t, start(t, 1, "store_path "+filepath.Join(t.TempDir(), "store.db")))
	})
}

// spreadCustomers moves the (empty) hash slots of customers so that their
// metering keys cover every master of rc.
func spreadCustomers(t *testing.T, rc *rediscluster.Cluster, customers ...string) {
	t.Helper()
	ctx := t.Context()
	masters := rc.Masters(ctx)
	owner := map[string]*rediscluster.Node{}
	count := map[*rediscluster.Node]int{}
	for _, c := range customers {
		m, err := rc.MasterFor(ctx, "{"+c+"}")
		if err != nil {
			t.Fatal(err)
		}
		owner[c] = m
		count[m]++
	}
	for _, m := range masters {
		if count[m] > 0 {
			continue
		}
		for _, c := range customers {
			if count[owner[c]] > 1 {
				slot, err := rc.Slot(ctx, "{"+c+"}")
				if err != nil {
					t.Fatal(err)
				}
				if err := rc.MoveSlot(ctx, slot, m, 100, 0); err != nil {
					t.Fatalf("moving %s's slot: %v", c, err)
				}
				count[owner[c]]--
				owner[c] = m
				count[m]++
				break
			}
		}
	}
	for _, m := range masters {
		if count[m] == 0 {
			t.Fatalf("no customer on master %s", m.Addr())
		}
	}
}

// requests builds n requests with key, request i to path pattern i%len
// on instance i%len(procs) (the pattern count and the instance count
// should be coprime, so every pattern reaches every instance).
func (c exactCluster) requests(n int, key string, patterns []meterReq) []meterReq {
	reqs := make([]meterReq, n)
	for i := range reqs {
		r := patterns[i%len(patterns)]
		r.url = c.procs[i%len(c.procs)].base + r.url
		r.key = key
		reqs[i] = r
	}
	return reqs
}

// TestQuotaExactness sends concurrent requests of mixed costs, some of
// which the upstream fails, over several instances, and compares the
// ledger with what the clients received: a block quota admits exactly its
// included units, never more; a bill quota bills exactly the 2xx responses
// received, and their excess over the included units as overage.
func TestQuotaExactness(t *testing.T) {
	forEachExactCluster(t, 3, func(t *testing.T, c exactCluster) {
		client := loadClient(t, 150)
		ok, limited := []int{http.StatusOK}, []int{http.StatusOK, http.StatusTooManyRequests}

		t.Run("block, mixed costs", func(t *testing.T) {
			// Two requests of cost 1 for one of cost 5: there are far more
			// cost-1 requests than the quota, and one of them is denied
			// only when a single unit is left, so the quota fills exactly.
			reqs := c.requests(1000, exactMixedKey, []meterReq{
				{url: "/v1/one", cost: 1, want: limited},
				{url: "/v1/five", cost: 5, want: limited},
				{url: "/v1/one", cost: 1, want: limited},
			})
			l := fireMeter(client, reqs, 150)
			l.check(t, "block quota, mixed costs")
			if l.okUnits != 100 {
				t.Errorf("admitted %d units (outcomes by cost and status %v), want exactly the 100 included", l.okUnits, l.outcomes)
			}
			if l.outcomes[meterOutcome{1, http.StatusTooManyRequests}] == 0 {
				t.Errorf("no cost-1 request was denied (outcomes %v): the quota was never full", l.outcomes)
			}
			u := c.procs[0].usage(t, "mixed")
			if u.Billed != l.okUnits || u.Requests != l.okCount || u.Overage != 0 {
				t.Errorf("ledger: billed %d, requests %d, overage %d; clients received %d 2xx responses worth %d units",
					u.Billed, u.Requests, u.Overage, l.okCount, l.okUnits)
			}
		})

		t.Run("block, cost 1", func(t *testing.T) {
			l := fireMeter(client, c.requests(1000, exactOnesKey, []meterReq{{url: "/v1/one", cost: 1, want: limited}}), 150)
			l.check(t, "block quota, cost 1")
			if l.okCount != 100 || l.outcomes[meterOutcome{1, http.StatusTooManyRequests}] != 900 {
				t.Errorf("outcomes %v, want exactly 100 admitted and 900 denied", l.outcomes)
			}
			u := c.procs[0].usage(t, "ones")
			if u.Billed != 100 || u.Requests != 100 || u.Overage != 0 || *u.Remaining != 0 {
				t.Errorf("ledger: billed %d, requests %d, overage %d, remaining %d; want 100, 100, 0, 0",
					u.Billed, u.Requests, u.Overage, *u.Remaining)
			}
			// Every instance now denies: the quota is spent everywhere.
			for _, p := range c.procs {
				l := newMeterLoad()
				if status, err := l.send(client, meterReq{url: p.base + "/v1/one", key: exactOnesKey, cost: 1, want: limited}); err != nil || status != http.StatusTooManyRequests {
					t.Errorf("%s after the quota was spent: status %d, %v; want 429", p.name, status, err)
				}
				l.check(t, p.name)
			}
		})

		t.Run("bill, with upstream failures", func(t *testing.T) {
			failed := []int{http.StatusInternalServerError}
			reqs := c.requests(600, exactPaygKey, []meterReq{
				{url: "/v1/one", cost: 1, want: ok},
				{url: "/v1/five", cost: 5, want: ok},
				{url: "/v1/one/fail", cost: 1, want: failed},
				{url: "/v1/five/fail", cost: 5, want: failed},
				{url: "/v1/one", cost: 1, want: ok},
			})
			l := fireMeter(client, reqs, 150)
			l.check(t, "bill quota")
			// Settlement follows the response: poll until the releases of
			// the failed requests have landed.
			u := pollUsage(t, c.procs[0], "payg", func(u usageView) bool { return u.Billed == l.okUnits })
			if u.Billed != l.okUnits || u.Requests != l.okCount {
				t.Errorf("ledger: billed %d units in %d requests; clients received %d 2xx responses worth %d units (outcomes %v)",
					u.Billed, u.Requests, l.okCount, l.okUnits, l.outcomes)
			}
			t.Logf("%d requests: %d 2xx worth %d units; ledger billed %d, overage %d, requests %d",
				len(reqs), l.okCount, l.okUnits, u.Billed, u.Overage, u.Requests)
			t.Run("overage is the excess", func(t *testing.T) {
				if want := max(0, u.Billed-exactIncluded); u.Overage != want {
					t.Errorf("overage %d units, want billed %d - included %d = %d", u.Overage, u.Billed, exactIncluded, want)
				}
			})
		})
	})
}

// TestReleaseKeepsOverageExact holds a request that the upstream will fail
// while another request crosses the included quota: once the failed one is
// released, billed usage is back within the quota, so there is no
// overage.
func TestReleaseKeepsOverageExact(t *testing.T) {
	forEachExactCluster(t, 1, func(t *testing.T, c exactCluster) {
		p := c.procs[0]
		client := loadClient(t, 2)
		l := newMeterLoad()
		one := meterReq{url: p.base + "/v1/one", key: exactGatedKey, cost: 1, want: []int{http.StatusOK}}
		for range exactIncluded - 1 {
			if _, err := l.send(client, one); err != nil {
				t.Fatal(err)
			}
		}
		// The held request reserves the last included unit.
		held := make(chan error, 1)
		go func() {
			_, err := l.send(client, meterReq{url: p.base + "/v1/gate", key: exactGatedKey, cost: 1, want: []int{http.StatusInternalServerError}})
			held <- err
		}()
		select {
		case <-c.upstream.arrived:
		case err := <-held:
			t.Fatalf("the held request returned before reaching the upstream: %v", err)
		case <-time.After(30 * time.Second):
			t.Fatal("the held request did not reach the upstream")
		}
		// This one is reserved beyond the included units, as overage.
		if _, err := l.send(client, one); err != nil {
			t.Fatal(err)
		}
		close(c.upstream.release)
		if err := <-held; err != nil {
			t.Fatal(err)
		}
		l.check(t, "gated customer")
		u := pollUsage(t, p, "gated", func(u usageView) bool { return u.Requests == exactIncluded })
		if u.Billed != exactIncluded || u.Requests != exactIncluded || u.Overage != 0 {
			t.Errorf("ledger: billed %d, requests %d, overage %d; want %d, %d, 0 (%d 2xx responses of cost 1, the failed one released)",
				u.Billed, u.Requests, u.Overage, exactIncluded, exactIncluded, l.okCount)
		}
	})
}

// pollUsage reads a customer's usage until done accepts it or a deadline
// passes, and returns the last one read.
func pollUsage(t *testing.T, p *caddyProcess, customer string, done func(usageView) bool) usageView {
	t.Helper()
	return eventually(15*time.Second, func() usageView { return p.usage(t, customer) }, done)
}
