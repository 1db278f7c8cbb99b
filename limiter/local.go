package limiter

import (
	"hash/maphash"
	"sync"
)

// Local is an in-process GCRA limiter holding one TAT per subject. It is safe
// for concurrent use. Subjects whose bucket is full again are forgotten, so
// memory stays bounded by the number of subjects active within their reset
// time.
type Local struct {
	seed   maphash.Seed
	shards [localShards]localShard
}

const localShards = 64

type localShard struct {
	mu   sync.Mutex
	tats map[string]int64
}

// NewLocal returns an empty in-process limiter.
func NewLocal() *Local {
	l := &Local{seed: maphash.MakeSeed()}
	for i := range l.shards {
		l.shards[i].tats = make(map[string]int64)
	}
	return l
}

// Admit decides cost units for subject under p at now (microseconds since
// the epoch), storing the new TAT when admitted.
func (l *Local) Admit(subject string, p Policy, cost, now int64) Decision {
	s := &l.shards[maphash.String(l.seed, subject)%localShards]
	s.mu.Lock()
	tat := s.tats[subject]
	newTAT, d := p.Decide(tat, now, cost)
	if newTAT != tat && newTAT > now {
		s.tats[subject] = newTAT
	}
	s.mu.Unlock()
	return d
}
