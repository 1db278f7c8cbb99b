package module

import (
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Reload test customers. Both tiers restore one unit per 6 minutes or
// more, so nothing comes back while the test runs: the big customer's
// budget is never exhausted (its Remaining counts exactly what was
// admitted), the small one's is exhausted early (exactly its burst is
// admitted, whatever reloads happen in between).
const (
	reloadBigKey     = "reload-big-key-0123456789ab"
	reloadSmallKey   = "reload-small-key-0123456789"
	reloadBigBurst   = 1_000_000
	reloadSmallBurst = 50
	reloadLoaders    = 8  // goroutines sending requests during the reloads
	reloadCount      = 10 // reloads under load, then as many idle ones
	// goroutineSlack is how many more goroutines the process may run after
	// the idle reloads than after the loaded ones.
	goroutineSlack = 5
)

// reloadCaddyfile is the reload test's configuration; variants differ in
// the response body and in one cost rule, so every reload is a real one.
func reloadCaddyfile(storeLines string, variant int) func(adminPort, httpPort int) string {
	extraCost := ""
	if variant%2 == 1 {
		extraCost = "cost /v1/other 2"
	}
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 500ms
	api_monetize {
		%s
		store_timeout 2s
		key_secret reload-test-secret-0123
		tier bulk {
			rate 10/hour burst %d
			endpoints /v1/*
			on_store_error deny
		}
		tier small {
			rate 1/hour burst %d
			endpoints /v1/*
			on_store_error deny
		}
		customer big tier bulk
		customer little tier small
		key %s big
		key %s little
	}
}

:%d {
	api_monetize {
		cost /v1/five 5
		%s
	}
	respond "ok v%d"
}
`, adminPort, httpPort, storeLines, reloadBigBurst, reloadSmallBurst, reloadBigKey, reloadSmallKey, httpPort, extraCost, variant%2)
	}
}

// load replaces the process's configuration through POST /load.
func (p *caddyProcess) load(t *testing.T, caddyfile string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, p.adminBase+"/load", strings.NewReader(caddyfile))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	res, err := oneShotClient(30 * time.Second).Do(req)
	if err != nil {
		t.Fatalf("POST /load: %v", err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: status %d: %s", res.StatusCode, body)
	}
}

// goroutines is the process's goroutine count and goroutine profile (in
// text, grouped by stack), from the admin endpoint's pprof handler.
func (p *caddyProcess) goroutines(t *testing.T) (int, string) {
	t.Helper()
	res, err := oneShotClient(10 * time.Second).Get(p.adminBase + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatalf("goroutine profile: %v", err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil || res.StatusCode != http.StatusOK {
		t.Fatalf("goroutine profile: status %d, %v", res.StatusCode, err)
	}
	first, _, _ := strings.Cut(string(body), "\n")
	n, err := strconv.Atoi(strings.TrimPrefix(first, "goroutine profile: total "))
	if err != nil {
		t.Fatalf("goroutine profile starts with %q", first)
	}
	return n, string(body)
}

// settledGoroutines polls the goroutine count until it has not changed
// over five consecutive reads (old servers and admin endpoints stop
// asynchronously after a reload), with a deadline.
func (p *caddyProcess) settledGoroutines(t *testing.T) (int, string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	n, profile := p.goroutines(t)
	for same := 1; same < 5; {
		if time.Now().After(deadline) {
			t.Fatalf("the goroutine count did not settle within the deadline; last %d:\n%s", n, profile)
		}
		time.Sleep(50 * time.Millisecond)
		m, prof := p.goroutines(t)
		if m == n {
			same++
		} else {
			same = 1
		}
		n, profile = m, prof
	}
	return n, profile
}

// TestReloadUnderLoad reloads Caddy's configuration repeatedly while
// requests flow, with the embedded store and with Redis: no request fails
// or gets a 5xx, no rate-limit state is lost or duplicated across
// reloads, and reloading leaks no goroutines.
func TestReloadUnderLoad(t *testing.T) {
	t.Run("embedded store", func(t *testing.T) {
		testReloadUnderLoad(t, "store_path "+filepath.Join(t.TempDir(), "store.db"))
	})
	t.Run("redis", func(t *testing.T) {
		prefix := redisTestPrefix(t)
		testReloadUnderLoad(t, "redis "+testRedisURL+"\n\t\tredis_prefix "+prefix)
	})
}

func testReloadUnderLoad(t *testing.T, storeLines string) {
	p := startCaddy(t, "caddy", reloadCaddyfile(storeLines, 0))
	reload := func(variant int) {
		t.Helper()
		p.load(t, reloadCaddyfile(storeLines, variant)(p.adminPort, p.httpPort))
	}
	client := loadClient(t, reloadLoaders)
	// checker opens a new connection per request, so it reaches the server
	// of the configuration loaded last.
	checker := oneShotClient(30 * time.Second)
	big, small := newTally(), newTally()
	big.retryResets, small.retryResets = true, true
	url := p.base + "/v1/items"

	// Loader 0 spends the small customer's budget (sending more requests
	// than it before the reloads start), the others the big customer's.
	stop := make(chan struct{})
	var started, done sync.WaitGroup
	for i := range reloadLoaders {
		started.Add(1)
		done.Go(func() {
			c, key, warmup := big, reloadBigKey, 1
			if i == 0 {
				c, key, warmup = small, reloadSmallKey, 2*reloadSmallBurst
			}
			for n := 1; ; n++ {
				if n > warmup {
					select {
					case <-stop:
						return
					default:
					}
				}
				c.get(client, url, key)
				if n == warmup {
					started.Done()
				}
			}
		})
	}
	stopLoad := sync.OnceFunc(func() {
		close(stop)
		done.Wait()
	})
	defer stopLoad() // when a reload fails the test
	started.Wait()

	for i := 1; i <= reloadCount; i++ {
		reload(i)
		// The new configuration serves new connections (polled: the old
		// server may still accept one for an instant).
		want := fmt.Sprintf("ok v%d", i%2)
		deadline := time.Now().Add(10 * time.Second)
		for {
			status, _, body := big.get(checker, url, reloadBigKey)
			if status == http.StatusOK && body == want {
				break
			}
			if status != http.StatusOK || time.Now().After(deadline) {
				t.Fatalf("after reload %d: status %d, body %q, want 200 %q", i, status, body, want)
			}
		}
	}
	stopLoad()

	big.check(t, "big customer")
	small.check(t, "small customer")
	if got := small.statuses[http.StatusOK]; got != reloadSmallBurst {
		t.Errorf("small customer: %d requests admitted, want exactly its burst %d (statuses %v)", got, reloadSmallBurst, small.statuses)
	}
	status, header, _ := big.get(checker, url, reloadBigKey)
	if status != http.StatusOK {
		t.Fatalf("final request of the big customer: status %d", status)
	}
	remaining, err := strconv.Atoi(header.Get("X-RateLimit-Remaining"))
	if err != nil {
		t.Fatalf("X-RateLimit-Remaining %q: %v", header.Get("X-RateLimit-Remaining"), err)
	}
	admitted := big.statuses[http.StatusOK] // including the final request
	if admitted+remaining != reloadBigBurst || big.statuses[http.StatusTooManyRequests] != 0 {
		t.Errorf("big customer: %d requests admitted and %d units remaining, want them to add up to the burst %d (statuses %v)",
			admitted, remaining, reloadBigBurst, big.statuses)
	}
	t.Logf("%d reloads under load: big customer %v, small customer %v; %d requests retried after a connection was reset or refused before any response",
		reloadCount, big.statuses, small.statuses, big.resets+small.resets)

	client.CloseIdleConnections()
	before, _ := p.settledGoroutines(t)
	for i := reloadCount + 1; i <= 2*reloadCount; i++ {
		reload(i)
	}
	// Poll until the count is back within the slack; old servers and admin
	// endpoints finish stopping after their grace period.
	deadline := time.Now().Add(20 * time.Second)
	for {
		after, profile := p.goroutines(t)
		if after <= before+goroutineSlack {
			t.Logf("goroutines: %d after %d reloads under load, %d after %d more idle reloads", before, reloadCount, after, reloadCount)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines: %d after %d reloads under load, still %d after %d more idle reloads (slack %d); profile:\n%s",
				before, reloadCount, after, reloadCount, goroutineSlack, profile[:min(len(profile), 16000)])
		}
		time.Sleep(50 * time.Millisecond)
	}
}
