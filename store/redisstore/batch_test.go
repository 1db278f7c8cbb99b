package redisstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// holdLanes takes every pipeline lane of s, so that script calls queue;
// the returned function gives them back.
func holdLanes(s *Store) (release func()) {
	held := make([]*lane, 0, maxLanes)
	for range maxLanes {
		held = append(held, <-s.scripts.lanes)
	}
	return func() {
		for _, l := range held {
			s.scripts.release(l)
		}
	}
}

// wire records what a Store writes to Redis: per write, the metering
// script commands in it ("pipeline(evalsha evalsha)"). Its dial is
// Options.dial.
type wire struct {
	mu        sync.Mutex
	pipelines []string
	// onScripts, when set, runs before the i-th write of metering scripts
	// (counting from 0) goes out.
	onScripts func(i int)
}

func (w *wire) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &scriptConn{Conn: c, w: w}, nil
}

// hook sets onScripts.
func (w *wire) hook(f func(i int)) {
	w.mu.Lock()
	w.onScripts = f
	w.mu.Unlock()
}

// scripts returns the pipelines of metering scripts written so far.
func (w *wire) scripts() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.pipelines)
}

type scriptConn struct {
	net.Conn
	w *wire
}

// Write records the names of the commands in b, a sequence of RESP arrays
// of bulk strings, when they include EVAL or EVALSHA.
func (c *scriptConn) Write(b []byte) (int, error) {
	var names []string
	scripts := false
	for rest := string(b); rest != ""; {
		var n int
		if _, err := fmt.Sscanf(rest, "*%d\r\n", &n); err != nil {
			break
		}
		rest = rest[strings.Index(rest, "\r\n")+2:]
		for i := range n {
			var size int
			if _, err := fmt.Sscanf(rest, "$%d\r\n", &size); err != nil {
				return 0, fmt.Errorf("unexpected RESP %.40q", rest)
			}
			rest = rest[strings.Index(rest, "\r\n")+2:]
			if i == 0 {
				name := strings.ToLower(rest[:size])
				names = append(names, name)
				scripts = scripts || name == "eval" || name == "evalsha"
			}
			rest = rest[size+2:]
		}
	}
	if scripts {
		c.w.mu.Lock()
		i := len(c.w.pipelines)
		c.w.pipelines = append(c.w.pipelines, "pipeline("+strings.Join(names, " ")+")")
		hook := c.w.onScripts
		c.w.mu.Unlock()
		if hook != nil {
			hook(i)
		}
	}
	return c.Conn.Write(b)
}

// waitPending waits until n script calls are queued in s.
func waitPending(t *testing.T, s *Store, n int) {
	t.Helper()
	if got := awaitPending(s, n); got != n {
		t.Fatalf("%d script calls queued, want %d", got, n)
	}
}

// awaitPending waits up to 10 s until n script calls are queued in s, and
// returns how many are; it can run off the test's goroutine.
func awaitPending(s *Store, n int) int {
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.scripts.mu.Lock()
		got := len(s.scripts.pending)
		s.scripts.mu.Unlock()
		if got == n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(time.Millisecond)
	}
}

// TestConcurrentReservationsSharePipelines checks that reservations queued
// while every lane is busy go out together in one pipeline, one EVALSHA
// each, and are each decided exactly: a budget of 25 admits 25 of 60.
func TestConcurrentReservationsSharePipelines(t *testing.T) {
	w := &wire{}
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second, dial: w.dial})
	ctx := context.Background()
	q := testQuota(store.QuotaBlock, 25)
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "warm-up", Cost: 1, Quota: q}); err != nil {
		t.Fatal(err)
	}
	warm := len(w.scripts())

	const n = 60
	release := holdLanes(s)
	var wg sync.WaitGroup
	outs := make([]store.Reserved, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			outs[i], errs[i] = s.Reserve(ctx, store.Reservation{
				Subject: "acme", Cost: 1, Quota: q, Rate: limiter.Policy{Limit: 1000, Period: time.Hour},
				Origin: "o", Seq: int64(i + 1),
			})
		})
	}
	waitPending(t, s, n)
	release()
	wg.Wait()

	allowed := 0
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("Reserve %d: %v", i, errs[i])
		}
		if outs[i].Allowed {
			allowed++
		}
	}
	if allowed != 25 {
		t.Errorf("%d of %d reservations allowed against a block quota of 25", allowed, n)
	}
	want := fmt.Sprint([]string{"pipeline(" + strings.Join(slices.Repeat([]string{"evalsha"}, n), " ") + ")"})
	if got := fmt.Sprint(w.scripts()[warm:]); got != want {
		t.Errorf("Redis got %.200s…, want one pipeline of %d EVALSHA", got, n)
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: 25, Requests: 25}) {
		t.Errorf("Usage = %+v, %v; want 25 units in 25 requests", u.Counters, err)
	}
}

// laneTest is a store whose script writes are recorded (after one warm-up
// reservation) and whose lanes the test holds, giving them back one at a
// time with give; its cleanup unblocks the hooks and gives back the rest
// (Close waits for every lane).
type laneTest struct {
	s     *Store
	w     *wire
	q     store.Quota
	warm  int // script writes before the test's
	held  []*lane
	given int
	// hold[i] holds back the test's i-th script write until unblocked.
	hold    []chan struct{}
	unblock []sync.Once
}

func newLaneTest(t *testing.T, holds int) *laneTest {
	lt := &laneTest{w: &wire{}, q: testQuota(store.QuotaBill, 100)}
	lt.s = openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second, dial: lt.w.dial})
	if err := lt.reserve(1); err != nil {
		t.Fatal(err)
	}
	lt.warm = len(lt.w.scripts())
	for range maxLanes {
		lt.held = append(lt.held, <-lt.s.scripts.lanes)
	}
	lt.unblock = make([]sync.Once, holds)
	for range holds {
		lt.hold = append(lt.hold, make(chan struct{}))
	}
	t.Cleanup(func() {
		for i := range lt.hold {
			lt.release(i)
		}
		for _, l := range lt.held[lt.given:] {
			lt.s.scripts.release(l)
		}
	})
	return lt
}

func (lt *laneTest) reserve(seq int64) error {
	_, err := lt.s.Reserve(context.Background(), store.Reservation{Subject: "acme", Cost: 1, Quota: lt.q, Origin: "o", Seq: seq})
	return err
}

// give gives the next held lane back.
func (lt *laneTest) give() {
	lt.s.scripts.release(lt.held[lt.given])
	lt.given++
}

// release lets the test's i-th script write go out.
func (lt *laneTest) release(i int) { lt.unblock[i].Do(func() { close(lt.hold[i]) }) }

// returned waits for n results on c, failing with why after 10 s.
func returned(t *testing.T, c <-chan error, n int, why string) {
	t.Helper()
	for range n {
		select {
		case err := <-c:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal(why)
		}
	}
}

// check checks that the test's calls went out as want and were each
// counted once.
func (lt *laneTest) check(t *testing.T, want []string, units int64) {
	t.Helper()
	if got := lt.w.scripts()[lt.warm:]; !slices.Equal(got, want) {
		t.Errorf("Redis got %q, want %q", got, want)
	}
	u, err := lt.s.Usage(context.Background(), "acme", lt.q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: units, Requests: units}) {
		t.Errorf("Usage = %+v, %v; want %d units", u.Counters, err, units)
	}
}

// TestSentCallReturnsAtOnce checks that a caller whose call another caller
// took and sent returns as soon as its reply is in, rather than waiting for
// a lane and leading the next pipeline first: here the next pipeline is
// held back until both callers of the first one have returned.
func TestSentCallReturnsAtOnce(t *testing.T) {
	lt := newLaneTest(t, 2)
	first := make(chan error, 2)
	for seq := range int64(2) {
		go func() { first <- lt.reserve(seq + 2) }()
	}
	waitPending(t, lt.s, 2)

	// The first pipeline carries both calls; while it goes out a third
	// call queues, and its pipeline waits until the first two returned.
	third := make(chan error, 1)
	lt.w.hook(func(i int) {
		switch i - lt.warm {
		case 0: // on the leader's goroutine: no t.Fatal here
			go func() { third <- lt.reserve(4) }()
			awaitPending(lt.s, 1) // the test fails below if it never queues
		case 1:
			<-lt.hold[1]
		}
	})
	lt.give() // one lane: the first pipeline's leader takes it
	returned(t, first, 2, "a caller whose call was sent by another did not return before the next pipeline went out")
	lt.release(1)
	returned(t, third, 1, "the third call did not return")
	lt.check(t, []string{"pipeline(evalsha evalsha)", "pipeline(evalsha)"}, 4)
}

// TestFreedLaneGoesToPendingCall checks that a lane freed while calls are
// pending is handed to the caller of the oldest of them, not to a caller
// whose call is in flight on another lane: that one returns with its reply
// while the next pipeline is still held back.
func TestFreedLaneGoesToPendingCall(t *testing.T) {
	lt := newLaneTest(t, 2)
	sent := make(chan struct{})
	lt.w.hook(func(i int) {
		switch i - lt.warm {
		case 0:
			close(sent)
			<-lt.hold[0]
		case 1:
			<-lt.hold[1]
		}
	})

	// Two calls go out in one pipeline, held in flight.
	first := make(chan error, 2)
	for seq := range int64(2) {
		go func() { first <- lt.reserve(seq + 2) }()
	}
	waitPending(t, lt.s, 2)
	lt.give()
	<-sent
	// A third call queues; the other lane frees up and must go to it.
	third := make(chan error, 1)
	go func() { third <- lt.reserve(4) }()
	waitPending(t, lt.s, 1)
	lt.give()
	lt.release(0)
	returned(t, first, 2, "a caller whose call was in flight took the freed lane and led the next pipeline before returning")
	lt.release(1)
	returned(t, third, 1, "the third call did not return")
	lt.check(t, []string{"pipeline(evalsha evalsha)", "pipeline(evalsha)"}, 4)
}

// TestQueuedCallTimesOutUnsent checks that a reservation still queued at
// its deadline plus the overload wait (every lane was busy, while Redis
// kept answering) fails with ErrBusy and is never sent: nothing is
// counted, and the circuit breaker does not count it as a Redis failure.
// (Lanes free up by the deadlines of the pipelines in flight;
// TestDeadlinesWithinOpTimeout checks those.)
func TestQueuedCallTimesOutUnsent(t *testing.T) {
	const opTimeout, overloadWait = 50 * time.Millisecond, 50 * time.Millisecond
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: opTimeout, BreakerFailures: 1, overloadWait: overloadWait})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	release := holdLanes(s)
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1})
		errc <- err
	}()
	waitPending(t, s, 1)
	// Free the lanes only once the call's deadline and the overload wait
	// have passed.
	for time.Since(start) <= opTimeout+overloadWait {
		time.Sleep(opTimeout / 10)
	}
	release()
	if err := <-errc; !errors.Is(err, store.ErrBusy) || !errors.Is(err, errSendTimeout) {
		t.Fatalf("Reserve queued past its deadline and the overload wait: %v, want ErrBusy (not sent)", err)
	}
	// The breaker (threshold 1) counted nothing, and nothing was counted.
	if n := s.breaker.fails.Load(); n != 0 {
		t.Errorf("the breaker counted %d failures, want none", n)
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{}) {
		t.Errorf("Usage = %+v, %v; want nothing counted", u.Counters, err)
	}
}

// TestQueuedCallWaitsOutSaturation checks the bounded wait: a reservation
// still queued at its deadline while Redis keeps answering (this process
// was saturated, not Redis) is sent when a lane frees up within the
// overload wait, and decided by Redis.
func TestQueuedCallWaitsOutSaturation(t *testing.T) {
	const opTimeout, overloadWait = 50 * time.Millisecond, 5 * time.Second
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: opTimeout, overloadWait: overloadWait})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	release := holdLanes(s)
	start := time.Now()
	errc := make(chan error, 1)
	go func() {
		_, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1})
		errc <- err
	}()
	waitPending(t, s, 1)
	for time.Since(start) <= 2*opTimeout {
		time.Sleep(opTimeout / 10)
	}
	release()
	if err := <-errc; err != nil {
		t.Fatalf("Reserve queued past its deadline while Redis answered: %v, want it sent", err)
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: 1, Requests: 1}) {
		t.Errorf("Usage = %+v, %v; want the reservation counted once", u.Counters, err)
	}
}

// TestQueuedCallCancelled checks that a reservation whose caller goes away
// while it is queued returns at once and is never sent.
func TestQueuedCallCancelled(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second})
	q := testQuota(store.QuotaBill, 100)
	release := holdLanes(s)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1})
		errc <- err
	}()
	waitPending(t, s, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("Reserve cancelled while queued: %v, want context.Canceled", err)
	}
	waitPending(t, s, 0)
	release()
	u, err := s.Usage(context.Background(), "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{}) {
		t.Errorf("Usage = %+v, %v; want nothing counted", u.Counters, err)
	}
}

// TestScriptsReloadedAfterFlush checks that reservations sent in one
// pipeline after Redis lost its scripts (SCRIPT FLUSH, a restart) are sent
// again with the script source, each counted once.
func TestScriptsReloadedAfterFlush(t *testing.T) {
	w := &wire{}
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second, dial: w.dial})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	if err := rawClient(t).ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	warm := len(w.scripts())
	const n = 10
	release := holdLanes(s)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			_, errs[i] = s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: int64(i + 2)})
		})
	}
	waitPending(t, s, n)
	release()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Reserve %d after SCRIPT FLUSH: %v", i, err)
		}
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: n + 1, Requests: n + 1}) {
		t.Errorf("Usage = %+v, %v; want %d units, each reservation once", u.Counters, err, n+1)
	}
	want := []string{
		"pipeline(" + strings.Join(slices.Repeat([]string{"evalsha"}, n), " ") + ")",
		"pipeline(" + strings.Join(slices.Repeat([]string{"eval"}, n), " ") + ")",
	}
	if got := w.scripts()[warm:]; !slices.Equal(got, want) {
		t.Errorf("Redis got %q, want a pipeline of EVALSHA answered NOSCRIPT, then one of EVAL", got)
	}
}

// TestSaturationIsNotAFailure checks how a call's error is classified:
// calls that never left this process (queued past their deadline and the
// overload wait, or waiting for a pool connection) are ErrBusy and leave
// the circuit breaker alone; calls queued behind pipelines Redis did not
// answer are unavailable without counting again; calls sent and not
// answered by their deadline are Redis failures.
func TestSaturationIsNotAFailure(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t), BreakerFailures: 1})
	deadline, cancel := context.WithTimeout(context.Background(), -time.Second)
	defer cancel()
	for _, tc := range []struct {
		name          string
		err           error
		busy, counted bool
		unavailable   bool
	}{
		{"queued past the overload wait", fmt.Errorf("%w: %w", errSendTimeout, context.DeadlineExceeded), true, false, true},
		{"pool timeout", redis.ErrPoolTimeout, true, false, true},
		{"pool wait past the deadline", context.DeadlineExceeded, true, false, true},
		{"queued behind a stall", fmt.Errorf("%w: %w", errQueuedBehindStall, context.DeadlineExceeded), false, false, true},
		{"sent, no reply by the deadline", fmt.Errorf("waiting for the reply: %w", context.DeadlineExceeded), false, true, true},
		{"socket timeout", os.ErrDeadlineExceeded, false, true, true},
	} {
		s.breaker.fails.Store(0)
		err := s.finish(deadline, false, tc.err)
		if errors.Is(err, store.ErrBusy) != tc.busy || errors.Is(err, store.ErrUnavailable) != tc.unavailable {
			t.Errorf("%s: %v; want busy %v, unavailable %v", tc.name, err, tc.busy, tc.unavailable)
		}
		if counted := s.breaker.fails.Load() > 0; counted != tc.counted {
			t.Errorf("%s: counted by the breaker %v, want %v", tc.name, counted, tc.counted)
		}
	}
}
