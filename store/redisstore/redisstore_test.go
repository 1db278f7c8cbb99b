package redisstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/storetest"
)

// testURL is the Redis the tests use: REDISSTORE_TEST_URL, or the local
// default. Every test works under its own key prefix and deletes its keys.
func testURL() string {
	if u := os.Getenv("REDISSTORE_TEST_URL"); u != "" {
		return u
	}
	return "redis://127.0.0.1:6379/0"
}

var (
	redisOnce sync.Once
	redisErr  error
)

// rawClient returns a plain client on the test Redis, skipping the test
// when Redis is not reachable.
func rawClient(t testing.TB) *redis.Client {
	t.Helper()
	o, err := redis.ParseURL(testURL())
	if err != nil {
		t.Fatalf("REDISSTORE_TEST_URL: %v", err)
	}
	c := redis.NewClient(o)
	t.Cleanup(func() { _ = c.Close() })
	redisOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		redisErr = c.Ping(ctx).Err()
	})
	if redisErr != nil {
		t.Skipf("no Redis at %s: %v", testURL(), redisErr)
	}
	return c
}

// newPrefix returns a key prefix unique to this test and deletes every key
// under it when the test ends.
func newPrefix(t testing.TB) string {
	t.Helper()
	c := rawClient(t)
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	prefix := "amtest:" + hex.EncodeToString(b) + ":"
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if err := iter.Err(); err != nil {
			t.Errorf("scanning test keys: %v", err)
			return
		}
		if len(keys) > 0 {
			if err := c.Del(ctx, keys...).Err(); err != nil {
				t.Errorf("deleting test keys: %v", err)
			}
		}
	})
	return prefix
}

// openStore opens a Store under prefix on the test Redis and closes it at
// cleanup.
func openStore(t testing.TB, o Options) *Store {
	t.Helper()
	if o.URL == "" {
		o.URL = testURL()
	}
	if o.OpTimeout == 0 {
		o.OpTimeout = contractTimeout
	}
	s, err := New(o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// contractTimeout is the OpTimeout of tests that leave it unset: they are
// about behaviour, not latency, and a loaded CI machine can exceed the
// 100ms default (timeouts are tested with their own OpTimeout, e.g. by
// TestDeadlinesWithinOpTimeout).
const contractTimeout = 5 * time.Second

func TestContract(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		return openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: contractTimeout})
	})
}

func TestContractShared(t *testing.T) {
	storetest.RunShared(t, func(t *testing.T) (store.Store, store.Store) {
		prefix := newPrefix(t)
		return openStore(t, Options{KeyPrefix: prefix, OpTimeout: contractTimeout}), openStore(t, Options{KeyPrefix: prefix, OpTimeout: contractTimeout})
	})
}

// ratePeriod is the period of the reservations rateAt makes.
func ratePeriod() metering.Period { return metering.PeriodRule{}.Period(time.Now(), time.Time{}) }

// rateAt makes a rate-limit decision alone (a reservation under p with a
// meter-only quota) and returns it with the Redis time it was made at.
func rateAt(ctx context.Context, s *Store, subject string, p limiter.Policy, cost int64) (limiter.Decision, int64, error) {
	period := ratePeriod()
	out, now, err := s.reserve(ctx, store.Reservation{Subject: subject, Rate: p, Cost: cost, Quota: store.Quota{
		PeriodID: period.ID(), PeriodEnd: period.End, HourID: metering.TimeID(period.Start),
	}})
	return out.Rate, now, err
}

// readTAT returns the rate state of subject under prefix in the period of
// rateAt (the 4th and 5th numbers of the period hash's c field), zeros when
// none. Key and field names are spelled out to pin the documented layout.
func readTAT(t *testing.T, c *redis.Client, prefix, subject string) (tat, interval int64) {
	t.Helper()
	v, err := c.HGet(context.Background(), prefix+"{"+subject+"}:u:"+ratePeriod().ID(), "c").Result()
	if errors.Is(err, redis.Nil) {
		return 0, 0
	}
	if err != nil {
		t.Fatalf("reading the rate state: %v", err)
	}
	n, ok := packedInts(v, 5)
	if !ok {
		t.Fatalf("period field c %q is not five packed int64s", v)
	}
	return n[3], n[4]
}

// readCarriedTAT returns the rate state in subject's rate key, which holds
// it for the next period while it reaches past the period's end.
func readCarriedTAT(t *testing.T, c *redis.Client, prefix, subject string) (tat, interval int64) {
	t.Helper()
	v, err := c.Get(context.Background(), prefix+"{"+subject+"}:rl").Result()
	return parseTAT(t, v, err)
}

func parseTAT(t *testing.T, v string, err error) (tat, interval int64) {
	t.Helper()
	if errors.Is(err, redis.Nil) {
		return 0, 0
	}
	if err != nil {
		t.Fatalf("reading the rate state: %v", err)
	}
	a, b, ok := strings.Cut(v, ",")
	tat, err1 := strconv.ParseInt(a, 10, 64)
	interval, err2 := strconv.ParseInt(b, 10, 64)
	if !ok || err1 != nil || err2 != nil {
		t.Fatalf("stored rate state %q is not <TAT>,<interval>", v)
	}
	return tat, interval
}

// TestAdmitMatchesDecide replays a sequence of admissions, with policies
// switching on one subject, and checks every decision and every stored TAT
// against limiter.Policy.Decide at the Redis time the script used.
func TestAdmitMatchesDecide(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	s := openStore(t, Options{KeyPrefix: prefix})

	// A prime limit over a period it does not divide, with a burst span
	// just under limiter.MaxBurstSpan (2^52 µs), so the values the script
	// handles come near the 2^53 limit of Lua's doubles.
	const hugeLimit = 1_000_003
	huge := limiter.Policy{Limit: hugeLimit, Period: time.Duration((1<<52)/hugeLimit*hugeLimit-5) * time.Microsecond}
	if !huge.Valid() {
		t.Fatalf("test policy %+v is not valid", huge)
	}
	policies := []struct {
		p     limiter.Policy
		costs []int64
	}{
		{limiter.Policy{Limit: 100, Period: time.Minute}, []int64{1, 1, 0, 5, 30, 70, 1, 0, 101, 64, 63, 100}},
		{limiter.Policy{Limit: 7, Period: time.Second, Burst: 3}, []int64{1, 1, 1, 1, 0, 4, 2}},
		// A smaller burst than the TAT stored above was spent under.
		{limiter.Policy{Limit: 10, Period: time.Hour, Burst: 2}, []int64{0, 1, 3, 2}},
		{limiter.Policy{Limit: 1000, Period: time.Minute, Burst: 5000}, []int64{2500, 2500, 1, 0}},
		{limiter.Policy{Limit: 3, Period: 10 * time.Second}, []int64{1, 2, 1, 0}},
		{huge, []int64{1, 999_999, 3, 1, 0, 1_000_004, 1_000_003}},
		{limiter.Policy{Limit: 1, Period: time.Duration(1<<52) * time.Microsecond}, []int64{1, 1, 0, 2}},
	}
	// Each policy runs on a fresh subject, and on a subject shared by all
	// of them in turn (so TATs stored under other policies are seen).
	step := 0
	for i, pc := range policies {
		for _, subject := range []string{fmt.Sprint("fresh-", i), "shared"} {
			for _, cost := range pc.costs {
				step++
				checkStep(t, c, s, prefix, subject, pc.p, cost, step)
			}
		}
	}
}

func checkStep(t *testing.T, c *redis.Client, s *Store, prefix, subject string, p limiter.Policy, cost int64, step int) {
	t.Helper()
	ctx := context.Background()
	before, beforeInterval := readTAT(t, c, prefix, subject)
	got, now, err := rateAt(ctx, s, subject, p, cost)
	if err != nil {
		t.Fatalf("step %d: Reserve: %v", step, err)
	}
	if now <= 0 || now >= 1<<53 {
		t.Fatalf("step %d: script time %d µs is outside (0, 2^53)", step, now)
	}
	rescaled := p.Rescale(before, now, beforeInterval)
	wantTAT, want := p.Decide(rescaled, now, cost)
	if got != want {
		t.Fatalf("step %d: policy %+v, subject %s, TAT %d, now %d, cost %d:\n got  %+v\n want %+v",
			step, p, subject, before, now, cost, got, want)
	}
	t.Logf("step %d: %s cost %d -> %+v", step, subject, cost, got)
	after, afterInterval := readTAT(t, c, prefix, subject)
	if wantTAT == rescaled {
		if after != before {
			t.Fatalf("step %d: decision %+v changed the stored TAT from %d to %d", step, got, before, after)
		}
		return
	}
	if after != wantTAT || afterInterval != p.Interval() {
		t.Fatalf("step %d: stored TAT %d under interval %d, want %d under %d", step, after, afterInterval, wantTAT, p.Interval())
	}
	if wantTAT >= 1<<53 {
		t.Fatalf("step %d: TAT %d is not exact in a Lua double", step, wantTAT)
	}
	// While the state reaches past the period's end (or did before this
	// step), the rate key carries it, until the TAT.
	if end := ratePeriod().End.UnixMicro(); wantTAT <= end && before <= end {
		return
	}
	if carried, ci := readCarriedTAT(t, c, prefix, subject); carried != wantTAT || ci != p.Interval() {
		t.Fatalf("step %d: carried TAT %d under %d, want %d under %d", step, carried, ci, wantTAT, p.Interval())
	}
	pttl, err := c.PTTL(ctx, prefix+"{"+subject+"}:rl").Result()
	if err != nil {
		t.Fatalf("PTTL: %v", err)
	}
	if maxTTL := time.Duration((wantTAT-now)/1000+1) * time.Millisecond; pttl <= 0 || pttl > maxTTL {
		t.Fatalf("step %d: TTL %v, want in (0, %v]", step, pttl, maxTTL)
	}
}

// TestAdmitRemainingExact checks the Remaining sequences that a float
// implementation gets wrong.
func TestAdmitRemainingExact(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	ctx := context.Background()
	run := func(subject string, p limiter.Policy, cost, n int64) []int64 {
		var got []int64
		for range n {
			d, _, err := rateAt(ctx, s, subject, p, cost)
			if err != nil {
				t.Fatalf("Reserve: %v", err)
			}
			if !d.Allowed {
				got = append(got, -1)
				continue
			}
			got = append(got, d.Remaining)
		}
		return got
	}
	seq := func(from, step, n int64) []int64 {
		var s []int64
		for i := range n {
			s = append(s, from-i*step)
		}
		return s
	}
	for _, tc := range []struct {
		name    string
		p       limiter.Policy
		cost, n int64
		want    []int64
	}{
		// 100/min: 600 ms per unit; float scripts report 98 first.
		{"PerMinute100", limiter.Policy{Limit: 100, Period: time.Minute}, 1, 5, seq(99, 1, 5)},
		{"PerMinute1000", limiter.Policy{Limit: 1000, Period: time.Minute}, 1, 3, seq(999, 1, 3)},
		{"PerSecond10", limiter.Policy{Limit: 10, Period: time.Second}, 1, 3, seq(9, 1, 3)},
		{"Cost5Of100", limiter.Policy{Limit: 100, Period: time.Hour}, 5, 21, append(seq(95, 5, 20), -1)},
		{"LargeBurst", limiter.Policy{Limit: 1000, Period: time.Hour, Burst: 100000}, 7, 50, seq(99993, 7, 50)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := run(tc.name, tc.p, tc.cost, tc.n)
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("Remaining sequence (-1 = denied):\n got  %v\n want %v", got, tc.want)
			}
		})
	}
}

// privateRedis starts a redis-server of its own on a Unix socket, with
// extra arguments after the defaults (no persistence), and returns the
// socket's path. The server is killed when the test ends.
func privateRedis(t *testing.T, extra ...string) (sock string) {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server not installed")
	}
	dir := t.TempDir()
	sock = filepath.Join(dir, "redis.sock")
	args := append([]string{"--port", "0", "--unixsocket", sock, "--unixsocketperm", "700",
		"--save", "", "--appendonly", "no", "--dir", dir}, extra...)
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server on %s did not start", sock)
		}
	}
}

// TestUnixSocketURL checks that a Redis reached through a Unix socket
// (unix:// URL, with a database number) serves the whole store: customers
// through go-redis, and reservations through the metering connections,
// which dial the same way.
func TestUnixSocketURL(t *testing.T) {
	sock := privateRedis(t)
	s := openStore(t, Options{URL: "unix://" + sock + "?db=3"})
	ctx := context.Background()
	if err := s.CreateCustomer(ctx, store.Customer{ID: "acme", Tier: "pro"}); err != nil {
		t.Fatalf("CreateCustomer: %v", err)
	}
	if c, err := s.GetCustomer(ctx, "acme"); err != nil || c.Tier != "pro" {
		t.Fatalf("GetCustomer = %+v, %v", c, err)
	}
	q := testQuota(store.QuotaBlock, 2)
	for i, want := range []bool{true, true, false} {
		out, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q})
		if err != nil || out.Allowed != want {
			t.Fatalf("reservation %d: allowed %v, %v; want %v", i+1, out.Allowed, err, want)
		}
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: 2, Requests: 2}) {
		t.Errorf("Usage = %+v, %v; want 2 units in 2 requests", u.Counters, err)
	}

	// Everything went to database 3.
	for db, want := range map[int]bool{3: true, 0: false} {
		raw := redis.NewClient(&redis.Options{Network: "unix", Addr: sock, DB: db})
		n, err := raw.DBSize(ctx).Result()
		_ = raw.Close()
		if err != nil || (n > 0) != want {
			t.Errorf("database %d holds %d keys (%v); want keys: %v", db, n, err, want)
		}
	}
}

func TestNewDoesNoIO(t *testing.T) {
	var dials atomic.Int64
	s, err := New(Options{URL: "redis://127.0.0.1:1/3", dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return nil, errors.New("no dialing expected")
	}})
	if err != nil {
		t.Fatalf("New for an unreachable Redis: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if dials.Load() != 0 {
		t.Errorf("New and Close dialed %d times", dials.Load())
	}
}

func TestNewRejectsBadURLWithoutEchoingIt(t *testing.T) {
	for _, u := range []string{"", "http://h:1", "redis://user:s3cret@[::1:6379/0", "redis://user:s3cret@h:6379/x"} {
		_, err := New(Options{URL: u})
		if err == nil {
			t.Errorf("New(%q) succeeded", u)
			continue
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("New(%q) error repeats the password: %v", u, err)
		}
	}
}

// fakeClock is a settable clock for the breaker.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestBreaker points a store at a closed port through a counting dialer,
// then at the real Redis: failures open the breaker, which then fails
// calls without dialing, lets one probe through after the cooldown, and
// closes when a probe succeeds.
func TestBreaker(t *testing.T) {
	prefix := newPrefix(t)
	target := testURL()
	o, err := redis.ParseURL(target)
	if err != nil {
		t.Fatal(err)
	}
	var down atomic.Bool
	down.Store(true)
	var dials atomic.Int64
	var d net.Dialer
	s := openStore(t, Options{
		URL:       target,
		KeyPrefix: prefix,
		dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			if down.Load() {
				return d.DialContext(ctx, "tcp", "127.0.0.1:1") // nothing listens on port 1
			}
			return d.DialContext(ctx, network, o.Addr)
		},
	})
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	s.breaker.now = clock.now
	ctx := context.Background()
	admit := func() error {
		_, _, err := rateAt(ctx, s, "b", limiter.Policy{Limit: 10, Period: time.Second}, 1)
		return err
	}

	for i := range DefaultBreakerFailures {
		err := admit()
		if !errors.Is(err, store.ErrUnavailable) || errors.Is(err, errBreakerOpen) {
			t.Fatalf("call %d on a closed port: %v, want ErrUnavailable from Redis", i, err)
		}
	}
	if n := dials.Load(); n != DefaultBreakerFailures {
		t.Fatalf("%d failing calls dialed %d times, want once each", DefaultBreakerFailures, n)
	}

	calls := []func() error{
		admit,
		func() error { _, err := s.GetCustomer(ctx, "acme"); return err },
		func() error { _, err := s.KeyByHash(ctx, "abc"); return err },
		func() error { _, err := s.KeySecret(ctx, []byte("secret")); return err },
		func() error { return s.CreateCustomer(ctx, store.Customer{ID: "acme"}) },
	}
	for i := range 100 {
		if err := calls[i%len(calls)](); !errors.Is(err, errBreakerOpen) || !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("call %d with the breaker open: %v, want the open-breaker error wrapping ErrUnavailable", i, err)
		}
	}
	if n := dials.Load(); n != DefaultBreakerFailures {
		t.Fatalf("the open breaker let calls dial: %d dials, want %d", n, DefaultBreakerFailures)
	}

	// After the cooldown one probe goes through; it fails and reopens.
	clock.advance(DefaultBreakerCooldown)
	if err := admit(); !errors.Is(err, store.ErrUnavailable) || errors.Is(err, errBreakerOpen) {
		t.Fatalf("probe after the cooldown: %v, want a Redis failure", err)
	}
	if err := admit(); !errors.Is(err, errBreakerOpen) {
		t.Fatalf("call after a failed probe: %v, want the open-breaker error", err)
	}
	if n := dials.Load(); n != DefaultBreakerFailures+1 {
		t.Fatalf("%d dials after one probe, want %d", n, DefaultBreakerFailures+1)
	}

	// Redis comes back: the next probe succeeds and closes the breaker.
	down.Store(false)
	if err := admit(); !errors.Is(err, errBreakerOpen) {
		t.Fatalf("call before the cooldown ended: %v, want the open-breaker error", err)
	}
	clock.advance(DefaultBreakerCooldown)
	for i := range 20 {
		if err := calls[i%len(calls)](); errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("call %d after Redis came back: %v", i, err)
		}
	}
}

// TestCallerCancelDoesNotTripBreaker checks that requests whose callers
// gave up say nothing about Redis.
func TestCallerCancelDoesNotTripBreaker(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t)})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for range 3 * DefaultBreakerFailures {
		if _, err := s.GetCustomer(ctx, "acme"); !errors.Is(err, context.Canceled) || errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("GetCustomer with a cancelled context: %v, want context.Canceled only", err)
		}
	}
	if _, err := s.GetCustomer(context.Background(), "acme"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetCustomer after cancelled calls: %v, want ErrNotFound (breaker closed)", err)
	}
}

func TestBreakerStates(t *testing.T) {
	clock := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	b := newBreaker(3, time.Second)
	b.now = clock.now
	mustAllow := func(wantProbe bool) {
		t.Helper()
		probe, err := b.allow()
		if err != nil || probe != wantProbe {
			t.Fatalf("allow = %v, %v; want probe %v, nil", probe, err, wantProbe)
		}
	}
	mustDeny := func() {
		t.Helper()
		if _, err := b.allow(); !errors.Is(err, errBreakerOpen) {
			t.Fatalf("allow = %v, want errBreakerOpen", err)
		}
	}

	// A success resets the count of consecutive failures.
	for range 2 {
		mustAllow(false)
		b.done(false, failed)
	}
	mustAllow(false)
	b.done(false, healthy)
	for range 2 {
		mustAllow(false)
		b.done(false, failed)
	}
	mustAllow(false)
	b.done(false, unknown) // does not count
	mustAllow(false)
	b.done(false, failed) // third consecutive failure: open
	mustDeny()
	clock.advance(time.Second - time.Nanosecond)
	mustDeny()

	// Half-open: exactly one probe at a time.
	clock.advance(time.Nanosecond)
	mustAllow(true)
	mustDeny()
	b.done(true, unknown) // the probe's caller gave up: another probe may go
	mustAllow(true)
	b.done(true, failed) // reopens for a full cooldown
	mustDeny()
	clock.advance(time.Second)
	mustAllow(true)
	b.done(true, healthy)
	for range 10 {
		mustAllow(false)
		b.done(false, healthy)
	}
}

// recordingConn records the socket deadlines go-redis sets.
type recordingConn struct {
	net.Conn
	mu        *sync.Mutex
	deadlines *[]time.Time
}

func (c recordingConn) record(t time.Time) {
	c.mu.Lock()
	*c.deadlines = append(*c.deadlines, t)
	c.mu.Unlock()
}

func (c recordingConn) SetDeadline(t time.Time) error {
	c.record(t)
	return c.Conn.SetDeadline(t)
}

func (c recordingConn) SetReadDeadline(t time.Time) error {
	c.record(t)
	return c.Conn.SetReadDeadline(t)
}

func (c recordingConn) SetWriteDeadline(t time.Time) error {
	c.record(t)
	return c.Conn.SetWriteDeadline(t)
}

// TestDeadlinesWithinOpTimeout checks, without timing anything, that every
// socket deadline and the dial timeout go-redis uses come from OpTimeout:
// against the real Redis, and against a server that accepts connections and
// never answers.
func TestDeadlinesWithinOpTimeout(t *testing.T) {
	o, err := redis.ParseURL(testURL())
	if err != nil {
		t.Fatal(err)
	}
	rawClient(t) // skip without Redis

	silent, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = silent.Close() })
	go func() {
		for {
			c, err := silent.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(io.Discard, c); _ = c.Close() }()
		}
	}()

	for _, tc := range []struct {
		name, addr string
		wantErr    bool
	}{{"Redis", o.Addr, false}, {"SilentServer", silent.Addr().String(), true}} {
		t.Run(tc.name, func(t *testing.T) {
			const opTimeout = 50 * time.Millisecond
			var (
				mu          sync.Mutex
				deadlines   []time.Time
				dialBudgets []time.Duration
				d           net.Dialer
			)
			s := openStore(t, Options{
				KeyPrefix: newPrefix(t),
				OpTimeout: opTimeout,
				dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
					start := time.Now()
					dl, ok := ctx.Deadline()
					mu.Lock()
					if ok {
						dialBudgets = append(dialBudgets, dl.Sub(start))
					} else {
						dialBudgets = append(dialBudgets, -1)
					}
					mu.Unlock()
					c, err := d.DialContext(ctx, network, tc.addr)
					if err != nil {
						return nil, err
					}
					return recordingConn{Conn: c, mu: &mu, deadlines: &deadlines}, nil
				},
			})
			ctx := context.Background()
			ops := map[string]func() error{
				"Reserve": func() error {
					_, _, err := rateAt(ctx, s, "d", limiter.Policy{Limit: 5, Period: time.Second}, 1)
					return err
				},
				"UpsertConfigCustomer": func() error {
					_, err := s.UpsertConfigCustomer(ctx, store.Customer{ID: "acme", Tier: "free", ConfigTier: "free"})
					return err
				},
				"ListKeys": func() error { _, err := s.ListKeys(ctx, "acme"); return err },
			}
			for name, op := range ops {
				mu.Lock()
				deadlines = deadlines[:0]
				mu.Unlock()
				err := op()
				end := time.Now()
				if tc.wantErr != (err != nil) || (err != nil && !errors.Is(err, store.ErrUnavailable)) {
					t.Errorf("%s: error %v, want failure %v wrapping ErrUnavailable", name, err, tc.wantErr)
				}
				mu.Lock()
				set := 0
				for _, dl := range deadlines {
					if dl.IsZero() {
						continue // clearing a deadline
					}
					set++
					// Every deadline is at most the call's context
					// deadline, which is at most end + OpTimeout.
					if dl.After(end.Add(opTimeout)) {
						t.Errorf("%s: socket deadline %v after the call ended, beyond OpTimeout %v", name, dl.Sub(end), opTimeout)
					}
				}
				mu.Unlock()
				if set == 0 {
					t.Errorf("%s: no socket deadline was set", name)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			if len(dialBudgets) == 0 {
				t.Fatal("no dial recorded")
			}
			for _, b := range dialBudgets {
				if b < 0 || b > opTimeout {
					t.Errorf("dial budget %v, want at most OpTimeout %v", b, opTimeout)
				}
			}
		})
	}
}

// killPubSub kills the Redis connections named name that are subscribed.
func killPubSub(t *testing.T, c *redis.Client, name string) int {
	t.Helper()
	ctx := context.Background()
	list, err := c.ClientList(ctx).Result()
	if err != nil {
		t.Fatalf("CLIENT LIST: %v", err)
	}
	killed := 0
	for line := range strings.SplitSeq(strings.TrimSpace(list), "\n") {
		fields := map[string]string{}
		for f := range strings.FieldsSeq(line) {
			k, v, _ := strings.Cut(f, "=")
			fields[k] = v
		}
		if fields["name"] != name || fields["sub"] == "0" {
			continue
		}
		id, err := strconv.ParseInt(fields["id"], 10, 64)
		if err != nil {
			t.Fatalf("CLIENT LIST id %q: %v", fields["id"], err)
		}
		if err := c.ClientKillByFilter(ctx, "ID", strconv.FormatInt(id, 10)).Err(); err != nil {
			t.Fatalf("CLIENT KILL: %v", err)
		}
		killed++
	}
	return killed
}

// TestWatchResubscribes kills the subscription's connection and checks that
// Watch subscribes again, calls onChange for the changes it may have
// missed, and then sees new changes.
func TestWatchResubscribes(t *testing.T) {
	c := rawClient(t)
	prefix := newPrefix(t)
	name := "amtest-" + strings.Trim(strings.TrimPrefix(prefix, "amtest:"), ":")
	sep := "?"
	if strings.Contains(testURL(), "?") {
		sep = "&"
	}
	watcher := openStore(t, Options{URL: testURL() + sep + "client_name=" + name, KeyPrefix: prefix})
	writer := openStore(t, Options{KeyPrefix: prefix})

	calls := make(chan string, 100)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- watcher.WatchChanges(ctx, func() { calls <- "change" }, func() { calls <- "resync" })
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch returned %v", err)
		}
	}()
	// wait expects a call of kind want (onChange or onResync).
	wait := func(what, want string) {
		t.Helper()
		select {
		case got := <-calls:
			if got != want {
				t.Fatalf("%s: a %s call, want %s", what, got, want)
			}
		case <-time.After(storetest.Timeout):
			t.Fatalf("no call within %v %s", storetest.Timeout, what)
		}
	}

	wait("after subscribing", "resync")
	if err := writer.CreateCustomer(context.Background(), store.Customer{ID: "acme", Tier: "free"}); err != nil {
		t.Fatal(err)
	}
	wait("after CreateCustomer", "change")
	if n := killPubSub(t, c, name); n != 1 {
		t.Fatalf("killed %d subscribed connections named %s, want 1", n, name)
	}
	wait("after the subscription's connection was killed (re-subscription)", "resync")
	if _, err := writer.SetTier(context.Background(), "acme", "pro"); err != nil {
		t.Fatal(err)
	}
	wait("after SetTier on the new subscription", "change")
}

func TestWatchEndsOnClose(t *testing.T) {
	s, err := New(Options{URL: testURL(), KeyPrefix: newPrefix(t)})
	if err != nil {
		t.Fatal(err)
	}
	subscribed := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- s.Watch(context.Background(), func() {
			select {
			case subscribed <- struct{}{}:
			default:
			}
		})
	}()
	select {
	case <-subscribed:
	case <-time.After(storetest.Timeout):
		t.Fatal("Watch did not subscribe")
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Watch returned %v after Close, want nil", err)
		}
	case <-time.After(storetest.Timeout):
		t.Fatal("Watch did not return after Close")
	}
}
