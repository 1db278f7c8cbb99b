package limiter

import (
	"hash/maphash"
	"sync"
)

// Local is an in-process GCRA limiter holding one TAT per subject. It is safe
// for concurrent use. A subject whose TAT is at or before now has a full
// bucket, which is the same as not being stored, so such entries are
// forgotten: every shard sweeps itself after a number of writes at least as
// large as its size after the previous sweep. The sweep is amortized O(1)
// per write and keeps each shard within about twice its live entries (plus
// a small constant), with no background goroutine. Callers should take now
// from one clock: a sweep forgets subjects as of its own now, so a request
// evaluated at an earlier now may find a bucket fuller than it was then.
type Local struct {
	seed   maphash.Seed
	shards [localShards]localShard
}

const (
	localShards = 64
	// minSweepWrites is the fewest writes to a shard between two sweeps.
	minSweepWrites = 128
)

// localState is a subject's TAT and the emission interval it was stored
// under, so a rate change can rescale it (see Policy.Rescale).
type localState struct {
	tat, interval int64
}

type localShard struct {
	mu   sync.Mutex
	tats map[string]localState
	// writes counts stores since the last sweep; the next sweep runs when
	// it reaches sweepAt.
	writes, sweepAt int
	// peak is the largest size since the map was last allocated; a sweep
	// that leaves far fewer entries reallocates it, since Go maps do not
	// shrink.
	peak int
	// Keeps neighbouring shards' mutexes on different cache lines.
	_ [64]byte
}

// NewLocal returns an empty in-process limiter.
func NewLocal() *Local {
	l := &Local{seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].tats = make(map[string]localState)
		l.shards[i].sweepAt = minSweepWrites
	}
	return l
}

// Admit decides cost units for subject under p at now (microseconds since
// the epoch), storing the new TAT when admitted. See Policy.Decide.
func (l *Local) Admit(subject string, p Policy, cost, now int64) Decision {
	return l.AdmitFrom(subject, p, cost, now, 0)
}

// AdmitFrom is Admit for a subject whose TAT is at least floor (a
// microsecond instant, under p's interval): the bucket is never fuller than
// floor says, whatever the stored TAT. A floor at or before now changes
// nothing.
func (l *Local) AdmitFrom(subject string, p Policy, cost, now, floor int64) Decision {
	s := &l.shards[maphash.String(l.seed, subject)%localShards]
	s.mu.Lock()
	st := s.tats[subject]
	tat := max(p.Rescale(st.tat, now, st.interval), floor)
	newTAT, d := p.Decide(tat, now, cost)
	if newTAT != tat {
		s.tats[subject] = localState{tat: newTAT, interval: p.Interval()}
		s.peak = max(s.peak, len(s.tats))
		if s.writes++; s.writes >= s.sweepAt {
			s.sweep(now)
		}
	}
	s.mu.Unlock()
	return d
}

// Len returns the number of subjects currently stored, including expired
// ones not yet swept.
func (l *Local) Len() int {
	n := 0
	for i := range l.shards {
		s := &l.shards[i]
		s.mu.Lock()
		n += len(s.tats)
		s.mu.Unlock()
	}
	return n
}

// sweep forgets the shard's subjects whose bucket is full at now. The caller
// holds s.mu.
func (s *localShard) sweep(now int64) {
	for k, st := range s.tats {
		if st.tat <= now {
			delete(s.tats, k)
		}
	}
	if n := len(s.tats); s.peak > 4*n && s.peak > 4*minSweepWrites {
		m := make(map[string]localState, n)
		for k, st := range s.tats {
			m[k] = st
		}
		s.tats, s.peak = m, n
	}
	s.writes = 0
	s.sweepAt = max(minSweepWrites, len(s.tats))
}
