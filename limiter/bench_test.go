package limiter

import (
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// benchPolicy restores one unit per microsecond, so advancing now by one
// microsecond per operation keeps most decisions on the admitting path.
var benchPolicy = Policy{Limit: 1_000_000, Period: time.Second, Burst: 1000}

func BenchmarkDecide(b *testing.B) {
	var tat int64
	now := t0
	var d Decision
	for b.Loop() {
		now++
		tat, d = benchPolicy.Decide(tat, now, 1)
	}
	if !d.Allowed {
		b.Fatal("steady state denied")
	}
}

func benchSubjects(n int) []string {
	s := make([]string, n)
	for i := range s {
		s[i] = "key_" + strconv.Itoa(i)
	}
	return s
}

func BenchmarkLocalAdmit(b *testing.B) {
	// With 100k subjects each is revisited every 100ms of fake time, within
	// the 60ms-interval policy's reset, so all of them stay stored.
	for _, c := range []struct {
		n int
		p Policy
	}{{1, benchPolicy}, {100_000, Policy{Limit: 1000, Period: time.Minute}}} {
		n, p := c.n, c.p
		subjects := benchSubjects(n)
		b.Run("subjects="+strconv.Itoa(n), func(b *testing.B) {
			l := NewLocal()
			now := t0
			i := 0
			for b.Loop() {
				now++
				l.Admit(subjects[i], p, 1, now)
				if i++; i == n {
					i = 0
				}
			}
		})
		b.Run("parallel/subjects="+strconv.Itoa(n), func(b *testing.B) {
			l := NewLocal()
			var clock, next atomic.Int64
			clock.Store(t0)
			b.RunParallel(func(pb *testing.PB) {
				i := int(next.Add(7919)) % n
				for pb.Next() {
					l.Admit(subjects[i], p, 1, clock.Add(1))
					if i++; i == n {
						i = 0
					}
				}
			})
		})
	}
}
