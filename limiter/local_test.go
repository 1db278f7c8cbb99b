package limiter

import (
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestLocalConcurrentSingleSubjectAdmitsExactlyBudget(t *testing.T) {
	l := NewLocal()
	var admitted, denied atomic.Int64
	var wg sync.WaitGroup
	for range 64 {
		wg.Go(func() {
			for range 50 {
				if l.Admit("cust_1", perMinute100, 1, t0).Allowed {
					admitted.Add(1)
				} else {
					denied.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if admitted.Load() != 100 || denied.Load() != 64*50-100 {
		t.Fatalf("admitted %d, denied %d; want exactly 100 admitted of %d", admitted.Load(), denied.Load(), 64*50)
	}
	if d := l.Admit("cust_1", perMinute100, 1, t0+600_000); !d.Allowed || d.Remaining != 0 {
		t.Fatalf("one interval later: %+v, want one unit admitted", d)
	}
}

func TestLocalConcurrentWeightedCosts(t *testing.T) {
	// Costs 1..4 from many goroutines never admit more than the burst in
	// total at a fixed now, and the last Remaining matches what was spent.
	l := NewLocal()
	var spent atomic.Int64
	var wg sync.WaitGroup
	for g := range 32 {
		wg.Go(func() {
			cost := int64(g%4 + 1)
			for range 40 {
				if l.Admit("cust_w", perMinute100, cost, t0).Allowed {
					spent.Add(cost)
				}
			}
		})
	}
	wg.Wait()
	d := l.Admit("cust_w", perMinute100, 0, t0)
	if spent.Load() > 100 || d.Remaining != 100-spent.Load() {
		t.Fatalf("spent %d, Remaining %d; want spent <= 100 and Remaining = 100 - spent", spent.Load(), d.Remaining)
	}
	if d.Remaining != 0 {
		t.Fatalf("Remaining %d after 1280 requests of cost 1..4; want the bucket drained", d.Remaining)
	}
}

func TestLocalSubjectsAreIndependent(t *testing.T) {
	l := NewLocal()
	p := Policy{Limit: 2, Period: time.Second}
	for _, s := range []string{"a", "b"} {
		for i := range 2 {
			if !l.Admit(s, p, 1, t0).Allowed {
				t.Fatalf("%s request %d denied", s, i)
			}
		}
		if l.Admit(s, p, 1, t0).Allowed {
			t.Fatalf("%s: third request admitted", s)
		}
	}
}

func TestLocalDeniedAndZeroCostStoreNothing(t *testing.T) {
	l := NewLocal()
	l.Admit("x", perMinute100, 0, t0)
	l.Admit("y", perMinute100, 101, t0)
	if n := l.Len(); n != 0 {
		t.Fatalf("Len = %d after only reports and impossible costs, want 0", n)
	}
}

func TestLocalForgetsExpiredSubjects(t *testing.T) {
	// Each generation admits K fresh subjects once, after the previous
	// generation's buckets are full again. Without forgetting, Len would
	// reach K*generations.
	const K, generations = 20_000, 20
	p := Policy{Limit: 10, Period: time.Second}
	reset := p.Interval()
	l := NewLocal()
	now := t0
	for g := range generations {
		for i := range K {
			if !l.Admit("g"+strconv.Itoa(g)+"-"+strconv.Itoa(i), p, 1, now).Allowed {
				t.Fatal("fresh subject denied")
			}
		}
		if n := l.Len(); n > 3*K {
			t.Fatalf("generation %d: Len = %d, want at most %d (live subjects are %d)", g, n, 3*K, K)
		}
		now += reset
	}
}

func TestLocalSweepKeepsLiveSubjects(t *testing.T) {
	// A drained subject must stay drained while many other subjects are
	// written and swept around it at the same instant and later.
	l := NewLocal()
	slow := Policy{Limit: 1, Period: time.Hour}
	if !l.Admit("drained", slow, 1, t0).Allowed {
		t.Fatal("first request denied")
	}
	fast := Policy{Limit: 1000, Period: time.Second}
	for i := range 50_000 {
		l.Admit("other-"+strconv.Itoa(i), fast, 1, t0+int64(i)*1000)
	}
	if d := l.Admit("drained", slow, 1, t0+int64(50*time.Second/time.Microsecond)); d.Allowed {
		t.Fatalf("drained subject admitted after sweeps: %+v", d)
	}
	if n := l.Len(); n > 3*localShards*minSweepWrites {
		t.Fatalf("Len = %d after 50k short-lived subjects, want bounded", n)
	}
}

func TestLocalConcurrentManySubjectsWithSweeps(t *testing.T) {
	// Exercises sweeps racing with admissions on other shards (run with
	// -race); every subject's own budget is still exact. Each round runs at
	// one instant, after the previous round's buckets are full again.
	l := NewLocal()
	p := Policy{Limit: 5, Period: time.Second}
	var wrong atomic.Int64
	for round := range 20 {
		now := t0 + int64(round)*p.Interval()*p.BurstUnits()
		var wg sync.WaitGroup
		for g := range 16 {
			wg.Go(func() {
				for i := range 200 {
					s := "s" + strconv.Itoa(g) + "-" + strconv.Itoa(i)
					admitted := 0
					for range 7 {
						if l.Admit(s, p, 1, now).Allowed {
							admitted++
						}
					}
					if admitted != 5 {
						wrong.Add(1)
					}
				}
			})
		}
		wg.Wait()
	}
	if wrong.Load() != 0 {
		t.Fatalf("%d subject-rounds did not admit exactly their burst of 5", wrong.Load())
	}
}

func TestLocalSweepBoundary(t *testing.T) {
	// A TAT one microsecond ahead is a partial bucket and must be kept; a
	// TAT equal to now is a full bucket and is forgotten.
	l := NewLocal()
	l.Admit("a", perMinute100, 1, t0)
	tat := t0 + perMinute100.Interval()
	s := &l.shards[0]
	for i := range l.shards {
		if _, ok := l.shards[i].tats["a"]; ok {
			s = &l.shards[i]
		}
	}
	s.mu.Lock()
	s.sweep(tat - 1)
	kept := len(s.tats)
	s.sweep(tat)
	left := len(s.tats)
	s.mu.Unlock()
	if kept != 1 || left != 0 {
		t.Fatalf("after sweeps at TAT-1µs and TAT: %d then %d entries, want 1 then 0", kept, left)
	}
}

// TestAdmitFrom checks that a floor makes the bucket no fuller than it
// says, and that a floor in the past changes nothing.
func TestAdmitFrom(t *testing.T) {
	p := Policy{Limit: 10, Period: 10 * time.Second} // one unit per second, burst 10
	const now = 1_000_000_000
	l := NewLocal()
	// A floor 7 units ahead: 3 left.
	floor := int64(now + 7*time.Second/time.Microsecond)
	for i := range 3 {
		if d := l.AdmitFrom("a", p, 1, now, floor); !d.Allowed || d.Remaining != int64(2-i) {
			t.Fatalf("unit %d under the floor: %+v", i+1, d)
		}
	}
	if d := l.AdmitFrom("a", p, 1, now, floor); d.Allowed || d.RetryAfter != time.Second {
		t.Fatalf("fourth unit under a floor of 7 owed: %+v, want denied for 1s", d)
	}
	// The stored state is ahead of an older floor: it wins.
	if d := l.AdmitFrom("a", p, 1, now, now); d.Allowed {
		t.Fatalf("a floor in the past refilled the bucket: %+v", d)
	}
	// A floor in the past on a fresh subject: a full bucket.
	if d := l.AdmitFrom("b", p, 1, now, now-1); !d.Allowed || d.Remaining != 9 {
		t.Fatalf("fresh subject with a past floor: %+v", d)
	}
}
