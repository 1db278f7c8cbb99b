package redisstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// holdLanes takes every pipeline lane of s, so that script calls queue;
// the returned function gives them back.
func holdLanes(s *Store) (release func()) {
	for range maxLanes {
		s.scripts.lanes <- struct{}{}
	}
	return func() {
		for range maxLanes {
			<-s.scripts.lanes
		}
	}
}

// waitPending waits until n script calls are queued in s.
func waitPending(t *testing.T, s *Store, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.scripts.mu.Lock()
		got := len(s.scripts.pending)
		s.scripts.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d script calls queued, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestConcurrentReservationsSharePipelines checks that reservations queued
// while every lane is busy go out together in one pipeline, one EVALSHA
// each, and are each decided exactly: a budget of 25 admits 25 of 60.
func TestConcurrentReservationsSharePipelines(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second})
	ctx := context.Background()
	q := testQuota(store.QuotaBlock, 25)
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "warm-up", Cost: 1, Quota: q}); err != nil {
		t.Fatal(err)
	}
	h := &countingHook{}
	s.client.AddHook(h)

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
	if got := fmt.Sprint(h.cmds); got != want {
		t.Errorf("Redis got %.200s…, want one pipeline of %d EVALSHA", got, n)
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: 25, Requests: 25}) {
		t.Errorf("Usage = %+v, %v; want 25 units in 25 requests", u.Counters, err)
	}
}

// TestQueuedCallTimesOutUnsent checks that a reservation that waits for a
// lane past its deadline fails with ErrUnavailable and is never sent:
// nothing is counted once the lanes free up.
func TestQueuedCallTimesOutUnsent(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 50 * time.Millisecond})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	release := holdLanes(s)
	start := time.Now()
	_, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1})
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Reserve with every lane busy: %v, want ErrUnavailable", err)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		t.Errorf("Reserve waited %v for a lane with a 50ms timeout", waited)
	}
	release()
	s.scripts.mu.Lock()
	left := len(s.scripts.pending)
	s.scripts.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d calls still queued after their deadline", left)
	}
	// A later call goes through, and the timed-out one was not counted.
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 2}); err != nil {
		t.Fatal(err)
	}
	u, err := s.Usage(ctx, "acme", q.PeriodID)
	if err != nil || u.Counters != (store.Counters{Billed: 1, Requests: 1}) {
		t.Errorf("Usage = %+v, %v; want only the later reservation", u.Counters, err)
	}
}

// TestScriptsReloadedAfterFlush checks that reservations sent in one
// pipeline after Redis lost its scripts (SCRIPT FLUSH, a restart) are sent
// again with the script source, each counted once.
func TestScriptsReloadedAfterFlush(t *testing.T) {
	s := openStore(t, Options{KeyPrefix: newPrefix(t), OpTimeout: 5 * time.Second})
	ctx := context.Background()
	q := testQuota(store.QuotaBill, 100)
	if _, err := s.Reserve(ctx, store.Reservation{Subject: "acme", Cost: 1, Quota: q, Origin: "o", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	if err := rawClient(t).ScriptFlush(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	h := &countingHook{}
	s.client.AddHook(h)
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
		"hgetall", // Usage
	}
	if !slices.Equal(h.cmds, want) {
		t.Errorf("Redis got %q, want a pipeline of EVALSHA answered NOSCRIPT, then one of EVAL", h.cmds)
	}
}
