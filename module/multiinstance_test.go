package module

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// testRedisURL is the Redis the multi-process tests share.
const testRedisURL = "redis://127.0.0.1:6379/0"

// caddyProcess is a real Caddy process: the test binary re-executed with
// envRunCaddy, running one Caddyfile.
type caddyProcess struct {
	name      string
	adminPort int
	httpPort  int
	base      string // http://127.0.0.1:<httpPort>
	adminBase string // http://localhost:<adminPort>
	logPath   string
	cmd       *exec.Cmd
	exited    chan struct{} // closed when the process has exited
	waitErr   error         // set before exited is closed
	// killed is set when the test killed the process on purpose.
	killed atomic.Bool
	// allowErrors are substrings of error-level log lines the test expects.
	allowErrors []string
}

// freePorts returns n TCP ports that were free a moment ago and that it
// has not returned before in this test binary.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	handedOut.Lock()
	defer handedOut.Unlock()
	ports := make([]int, 0, n)
	for len(ports) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close() // held until all are chosen, so they differ
		port := l.Addr().(*net.TCPAddr).Port
		if handedOut.ports[port] {
			continue // given to a process that may not have bound it yet
		}
		handedOut.ports[port] = true
		ports = append(ports, port)
	}
	return ports
}

// handedOut holds every port freePorts returned in this test binary: once
// released, a port can come back from the kernel before the process it was
// chosen for binds it (a second Caddy then took one Caddy's admin port).
var handedOut = struct {
	sync.Mutex
	ports map[int]bool
}{ports: make(map[int]bool)}

// startCaddy launches a Caddy process and waits until it serves.
func startCaddy(t *testing.T, name string, caddyfile func(adminPort, httpPort int) string) *caddyProcess {
	t.Helper()
	p := launchCaddy(t, name, caddyfile)
	p.waitServing(t)
	return p
}

// launchCaddy runs caddyfile(adminPort, httpPort) in a new Caddy process
// with its own ports and data/config directories, and stops it when the
// test ends.
func launchCaddy(t *testing.T, name string, caddyfile func(adminPort, httpPort int) string) *caddyProcess {
	t.Helper()
	ports := freePorts(t, 2)
	dir := t.TempDir()
	p := &caddyProcess{
		name:      name,
		adminPort: ports[0],
		httpPort:  ports[1],
		base:      fmt.Sprintf("http://127.0.0.1:%d", ports[1]),
		adminBase: fmt.Sprintf("http://localhost:%d", ports[0]),
		logPath:   filepath.Join(dir, "stderr.log"),
		exited:    make(chan struct{}),
	}
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(caddyfile(p.adminPort, p.httpPort)), 0o600); err != nil {
		t.Fatal(err)
	}
	logFile, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logFile.Close() // the child keeps its own descriptor
	p.cmd = exec.Command(testBinary)
	p.cmd.Env = append(os.Environ(),
		envRunCaddy+"=1",
		envCaddyArgs+"=run --config "+cfgPath+" --adapter caddyfile",
		"XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
	)
	p.cmd.Stdout = logFile
	p.cmd.Stderr = logFile
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// waitServing polls the admin endpoint until the configuration is loaded
// (GET /config/ blocks while a load is running and answers the config once
// it succeeded), then the site until it answers.
func (p *caddyProcess) waitServing(t *testing.T) {
	t.Helper()
	client := oneShotClient(5 * time.Second)
	deadline := time.Now().Add(45 * time.Second)
	for _, check := range []struct {
		url  string
		want func(*http.Response, []byte) bool
	}{
		{p.adminBase + "/config/", func(r *http.Response, b []byte) bool {
			return r.StatusCode == http.StatusOK && bytes.Contains(b, []byte(`"api_monetize"`))
		}},
		// No key: answered by the handler without touching the store.
		{p.base + "/v1/ready", func(r *http.Response, _ []byte) bool { return r.StatusCode == http.StatusUnauthorized }},
	} {
		for {
			select {
			case <-p.exited:
				t.Fatalf("%s exited before serving: %v", p.name, p.waitErr)
			default:
			}
			var last string
			res, err := client.Get(check.url)
			if err != nil {
				last = err.Error()
			} else {
				b, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if check.want(res, b) {
					break
				}
				last = fmt.Sprintf("status %d: %.200s", res.StatusCode, b)
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s not serving %s within the deadline; last answer: %s", p.name, check.url, last)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// stop sends SIGTERM, then SIGKILL if the process has not exited within a
// deadline, and reports an unclean exit, and a data race, a panic or any
// error-level log line in its output. On failure it logs the output.
func (p *caddyProcess) stop(t *testing.T) {
	if p.killed.Load() {
		<-p.exited
	} else {
		p.terminate(t)
	}
	p.checkOutput(t)
}

// kill sends SIGKILL and waits until the process is gone.
func (p *caddyProcess) kill(t *testing.T) {
	t.Helper()
	p.killed.Store(true)
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatalf("killing %s: %v", p.name, err)
	}
	<-p.exited
}

// terminate sends SIGTERM, then SIGKILL after a deadline.
func (p *caddyProcess) terminate(t *testing.T) {
	select {
	case <-p.exited:
		if !t.Failed() {
			t.Errorf("%s exited before the test ended: %v", p.name, p.waitErr)
		}
	default:
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
			if p.waitErr != nil {
				t.Errorf("%s did not exit cleanly on SIGTERM: %v", p.name, p.waitErr)
			}
		case <-time.After(20 * time.Second):
			t.Errorf("%s still running 20s after SIGTERM; killing it", p.name)
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
	}
}

// checkOutput reports a data race, a panic or an unexpected error-level log
// line in the process output, and logs the output when the test failed.
func (p *caddyProcess) checkOutput(t *testing.T) {
	out := p.logTail(1 << 30)
	for _, bad := range []string{"WARNING: DATA RACE", "panic:", "panic serving"} {
		if strings.Contains(out, bad) {
			t.Errorf("%s output contains %q", p.name, bad)
		}
	}
	var errorLines []string
	for line := range strings.Lines(out) {
		// Caddy's own "server graceful shutdown … timeout" is about a
		// client connection still open at SIGTERM, not about this plugin.
		if strings.Contains(line, `"level":"error"`) && !p.expectedError(line) {
			errorLines = append(errorLines, line)
		}
	}
	if len(errorLines) > 0 {
		t.Errorf("%s logged %d errors; first: %s", p.name, len(errorLines), errorLines[0])
	}
	if t.Failed() {
		t.Logf("%s output (tail):\n%s", p.name, p.logTail(16000))
	}
}

// expectedError reports an error-level line the test allows. Caddy's own
// "server graceful shutdown … timeout" is about a client connection still
// open at SIGTERM, not about this plugin.
func (p *caddyProcess) expectedError(line string) bool {
	if strings.Contains(line, `"msg":"server shutdown"`) {
		return true
	}
	for _, a := range p.allowErrors {
		if strings.Contains(line, a) {
			return true
		}
	}
	return false
}

// logTail is the last n bytes of the process output.
func (p *caddyProcess) logTail(n int) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// redisTestPrefix returns a Redis key prefix unique to this test run and
// deletes its keys when the test ends. It skips the test when Redis is not
// reachable.
func redisTestPrefix(t testing.TB) string {
	t.Helper()
	opts, err := redis.ParseURL(testRedisURL)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opts)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := rdb.Ping(ctx).Err(); err != nil {
		rdb.Close()
		t.Skipf("no Redis at %s: %v", testRedisURL, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	prefix := "amtest:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		defer rdb.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := deleteRedisPrefix(ctx, rdb, prefix); err != nil {
			t.Errorf("cleaning up Redis keys %s*: %v", prefix, err)
		}
	})
	return prefix
}

// deleteRedisPrefix deletes every Redis key starting with prefix.
func deleteRedisPrefix(ctx context.Context, rdb *redis.Client, prefix string) error {
	var cursor uint64
	for {
		keys, next, err := rdb.Scan(ctx, cursor, prefix+"*", 1000).Result()
		if err != nil {
			return err
		}
		if len(keys) > 0 {
			if err := rdb.Del(ctx, keys...).Err(); err != nil {
				return err
			}
		}
		if cursor = next; cursor == 0 {
			return nil
		}
	}
}

// oneShotClient is an HTTP client that opens a new connection per request,
// so it leaves no idle connection (and no server goroutine) behind.
func oneShotClient(timeout time.Duration) *http.Client {
	return &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: timeout}
}

// loadClient is an HTTP client for many concurrent requests to a few hosts.
func loadClient(t *testing.T, conns int) *http.Client {
	tr := &http.Transport{
		MaxIdleConns:        2 * conns,
		MaxIdleConnsPerHost: conns,
		IdleConnTimeout:     time.Minute,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// tally counts the outcomes of requests; safe for concurrent use.
type tally struct {
	// retryResets makes get retry a request whose new connection was
	// reset or closed before any response byte arrived. On Linux, Caddy
	// binds a new SO_REUSEPORT socket for each configuration and closes the
	// old one after a reload; the kernel resets the connections still
	// queued on the old socket, which no server ever read (this happens
	// without api_monetize in the configuration too). Such a request never
	// reached a handler, so retrying it cannot double-count; the exact unit
	// counts checked by the tests would expose a request that was admitted
	// but lost its response.
	retryResets bool

	mu       sync.Mutex
	statuses map[int]int
	resets   int // requests retried because of retryResets
	// failures describes the first few transport errors and unexpected
	// responses.
	failures []string
	nfail    int
}

func newTally() *tally { return &tally{statuses: make(map[int]int)} }

func (c *tally) fail(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nfail++
	if len(c.failures) < 10 {
		c.failures = append(c.failures, fmt.Sprintf(format, args...))
	}
}

// isResetBeforeResponse reports a connection refused, reset or closed by
// the server (Caddy closes a replaced listener on reload), including at
// dial time: such a request never reached a handler.
func isResetBeforeResponse(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, io.EOF) ||
		strings.Contains(err.Error(), "connection reset by peer")
}

// isDialError reports an error from connecting: the attempt that failed
// sent nothing. (net/http retries a GET whose reused connection the server
// closed on a new connection by itself; when that dial is then reset by a
// listener closing on reload, the error is a dial error although the first
// connection was reused.)
func isDialError(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

// maxResetRetries bounds the retries of one request under retryResets.
const maxResetRetries = 3

// get sends a GET with the API key and records the outcome: any transport
// error (but see retryResets), a status other than 200 or 429, or a 429
// without a positive integer Retry-After is a failure. It returns the
// response status, headers and body (status 0 on a transport error).
func (c *tally) get(client *http.Client, url, key string) (int, http.Header, string) {
	for attempt := 0; ; attempt++ {
		var reused, responded atomic.Bool
		trace := &httptrace.ClientTrace{
			GotConn:              func(i httptrace.GotConnInfo) { reused.Store(i.Reused) },
			GotFirstResponseByte: func() { responded.Store(true) },
		}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), http.MethodGet, url, nil)
		if err != nil {
			panic(err)
		}
		req.Header.Set("X-API-Key", key)
		res, err := client.Do(req)
		if err != nil {
			if c.retryResets && attempt < maxResetRetries && !responded.Load() &&
				(!reused.Load() && isResetBeforeResponse(err) || isDialError(err)) {
				c.mu.Lock()
				c.resets++
				c.mu.Unlock()
				continue
			}
			c.fail("GET %s: %v", url, err)
			return 0, nil, ""
		}
		body, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil {
			c.fail("GET %s: reading the body: %v", url, err)
			return 0, nil, ""
		}
		switch res.StatusCode {
		case http.StatusOK:
		case http.StatusTooManyRequests:
			if s, err := strconv.Atoi(res.Header.Get("Retry-After")); err != nil || s < 1 {
				c.fail("GET %s: 429 with Retry-After %q", url, res.Header.Get("Retry-After"))
			}
		default:
			c.fail("GET %s: status %d: %s", url, res.StatusCode, body)
		}
		c.mu.Lock()
		c.statuses[res.StatusCode]++
		c.mu.Unlock()
		return res.StatusCode, res.Header, string(body)
	}
}

// check fails the test if any request failed.
func (c *tally) check(t *testing.T, what string) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.nfail > 0 {
		t.Errorf("%s: %d requests failed (statuses %v); first ones:\n%s", what, c.nfail, c.statuses, strings.Join(c.failures, "\n"))
	}
}

// fire sends n GETs with key, request i to urls[i%len(urls)], from at most
// concurrency goroutines.
func fire(client *http.Client, urls []string, key string, n, concurrency int) *tally {
	c := newTally()
	next := make(chan int)
	var wg sync.WaitGroup
	for range concurrency {
		wg.Go(func() {
			for i := range next {
				c.get(client, urls[i%len(urls)], key)
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return c
}

// Multi-instance test customers: same tier, separate budgets.
const (
	sharedKeyA = "shared-budget-key-a-0123456789"
	sharedKeyB = "shared-budget-key-b-0123456789"
)

// sharedCaddyfile is an instance of the multi-instance deployment. The
// tier's burst is the budget under test; its rate restores one unit per
// 14.4 minutes, so no unit comes back while the test runs and the admitted
// counts are exact. The store timeout is generous so that a slow (race
// detector) run does not turn into 503s.
func sharedCaddyfile(prefix string) func(adminPort, httpPort int) string {
	return func(adminPort, httpPort int) string {
		return fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	grace_period 1s
	api_monetize {
		redis %s
		redis_prefix %s
		store_timeout 2s
		key_secret multi-instance-secret-0123
		tier metered {
			rate 100/day burst 100
			endpoints /v1/*
			on_store_error deny
		}
		customer alpha tier metered
		customer beta tier metered
		key %s alpha
		key %s beta
	}
}

:%d {
	api_monetize {
		cost /v1/five 5
	}
	respond "ok"
}
`, adminPort, httpPort, testRedisURL, prefix, sharedKeyA, sharedKeyB, httpPort)
	}
}

// TestThreeInstancesShareOneBudget runs three Caddy processes on one Redis
// and checks that a customer's budget is enforced once across all of them,
// under concurrent load: no instance admits more than the shared remainder.
func TestThreeInstancesShareOneBudget(t *testing.T) {
	prefix := redisTestPrefix(t)
	cfg := sharedCaddyfile(prefix)
	var procs [3]*caddyProcess
	for i := range procs {
		procs[i] = launchCaddy(t, fmt.Sprintf("caddy-%d", i+1), cfg)
	}
	for _, p := range procs {
		p.waitServing(t)
	}
	urls := make([]string, len(procs))
	for i, p := range procs {
		urls[i] = p.base
	}
	client := loadClient(t, 200)

	t.Run("cost 1", func(t *testing.T) {
		paths := make([]string, len(urls))
		for i, u := range urls {
			paths[i] = u + "/v1/items"
		}
		c := fire(client, paths, sharedKeyA, 2000, 200)
		c.check(t, "2000 requests of cost 1")
		if ok, limited := c.statuses[http.StatusOK], c.statuses[http.StatusTooManyRequests]; ok != 100 || limited != 1900 {
			t.Errorf("admitted %d and limited %d of 2000 over 3 instances, want 100 and 1900 (statuses %v)", ok, limited, c.statuses)
		}
	})

	t.Run("cost 5", func(t *testing.T) {
		paths := make([]string, len(urls))
		for i, u := range urls {
			paths[i] = u + "/v1/five"
		}
		c := fire(client, paths, sharedKeyB, 600, 200)
		c.check(t, "600 requests of cost 5")
		if ok, limited := c.statuses[http.StatusOK], c.statuses[http.StatusTooManyRequests]; ok != 20 || limited != 580 {
			t.Errorf("admitted %d and limited %d of 600 cost-5 requests, want 20 and 580 (statuses %v)", ok, limited, c.statuses)
		}
	})

	// Every instance now denies both customers: the budget is spent
	// everywhere, not just where it was spent.
	for _, p := range procs {
		for _, key := range []string{sharedKeyA, sharedKeyB} {
			c := newTally()
			if status, _, _ := c.get(client, p.base+"/v1/items", key); status != http.StatusTooManyRequests {
				t.Errorf("%s after the budget was spent: status %d, want 429", p.name, status)
			}
			c.check(t, p.name)
		}
	}
}
