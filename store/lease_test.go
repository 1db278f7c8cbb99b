package store_test

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/boltstore"
)

// within fails the test unless c delivers within 10 s.
func within[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting until %s", what)
		panic("unreachable")
	}
}

func openBolt(t *testing.T) *boltstore.Store {
	bs, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bs.Close() })
	return bs
}

// TestLeasedLoop runs two loops of one task on one store: only the lease
// holder works, a round asked for runs in the loop, and a loop that stops
// releases the lease, so that the other takes over at once rather than
// after the lease's TTL (an hour here).
func TestLeasedLoop(t *testing.T) {
	bs := openBolt(t)
	var led [2]chan struct{} // a round each loop did holding the lease
	loop := func(i int, holder string) store.LeasedLoop {
		led[i] = make(chan struct{}, 1000)
		l := store.Lease{Name: "task", Holder: holder, TTL: time.Hour}
		return store.LeasedLoop{
			Lease:   l,
			Records: func() (store.Records, error) { return bs, nil },
			Run: func(ctx context.Context) time.Duration {
				if ok, err := l.Renew(ctx, bs); err == nil && ok {
					select {
					case led[i] <- struct{}{}:
					default:
					}
				}
				return time.Millisecond
			},
		}
	}
	ctxA, stopA := context.WithCancel(context.Background())
	doneA := make(chan struct{})
	a := loop(0, "a")
	go func() { a.Loop(ctxA); close(doneA) }()
	within(t, led[0], "a holds the lease")

	requests := make(chan func(context.Context))
	ctxB, stopB := context.WithCancel(context.Background())
	b := loop(1, "b")
	b.Requests = requests
	doneB := make(chan struct{})
	go func() { b.Loop(ctxB); close(doneB) }()
	asked := make(chan struct{})
	requests <- func(context.Context) { close(asked) }
	within(t, asked, "b runs a round asked for")
	for range 5 {
		within(t, led[0], "a works on")
	}
	if n := len(led[1]); n != 0 {
		t.Fatalf("b worked %d rounds while a held the lease", n)
	}

	stopA()
	<-doneA
	within(t, led[1], "b takes over once a stopped")
	stopB()
	<-doneB
	if ok, err := bs.TryLease(context.Background(), "task", "c", time.Hour); err != nil || !ok {
		t.Errorf("after both stopped, a third holder got the lease: %v, %v; want it free", ok, err)
	}
}

// TestLeasedLoopRenews checks the renewal between rounds far apart, and
// that a failed renewal is reported.
func TestLeasedLoopRenews(t *testing.T) {
	bs := openBolt(t)
	opened := make(chan bool, 1000) // calls of Records: whether the store was there
	down := make(chan struct{})
	rounds := make(chan struct{}, 1000)
	failures := make(chan error, 1000)
	l := store.LeasedLoop{
		Lease: store.Lease{Name: "task", Holder: "a", TTL: time.Hour},
		Records: func() (store.Records, error) {
			up := true
			select {
			case <-down:
				up = false
			default:
			}
			select {
			case opened <- up:
			default:
			}
			if !up {
				return nil, store.ErrUnavailable
			}
			return bs, nil
		},
		Run:        func(context.Context) time.Duration { rounds <- struct{}{}; return time.Hour },
		RenewEvery: time.Millisecond,
		OnRenewError: func(err error) {
			select {
			case failures <- err:
			default:
			}
		},
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { l.Loop(ctx); close(done) }()
	defer func() { stop(); <-done }()
	within(t, rounds, "the first round")
	for range 3 {
		within(t, opened, "the lease is renewed between rounds")
	}
	if ok, err := bs.TryLease(context.Background(), "task", "b", time.Hour); err != nil || ok {
		t.Errorf("another holder took the renewed lease: %v, %v", ok, err)
	}
	if n := len(rounds); n != 0 {
		t.Errorf("%d more rounds ran; want none (the next is an hour away)", n)
	}
	close(down)
	if err := within(t, failures, "a failed renewal is reported"); err != store.ErrUnavailable {
		t.Errorf("reported %v, want the store's error", err)
	}
}
