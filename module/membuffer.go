package module

import (
	"context"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/apimonetize/caddy-api-monetize/store"
	"github.com/apimonetize/caddy-api-monetize/store/spool"
)

// memBufferMax bounds the usage records kept in memory while the embedded
// store cannot write (a few hundred bytes each): about 30 MB at most.
const memBufferMax = 100_000

// memBuffer keeps, in memory and in order, the usage records the embedded
// store could not write (a full disk, an I/O error), for replay once it
// can: the embedded store has no spool, its disk being the one that
// failed. It holds at most max records; Append refuses more, and the
// caller counts them as lost. Records still held when Caddy stops are
// lost. Safe for concurrent use; one Replay at a time.
type memBuffer struct {
	mu   sync.Mutex
	recs []spool.Record
	max  int
	// replayMu makes Replay calls wait for each other.
	replayMu sync.Mutex
}

func newMemBuffer(max int) *memBuffer { return &memBuffer{max: max} }

// Append keeps rec, and reports false when the buffer is full.
func (b *memBuffer) Append(rec spool.Record) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.recs) >= b.max {
		return false
	}
	b.recs = append(b.recs, rec)
	return true
}

// Len is the number of records held.
func (b *memBuffer) Len() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.recs)
}

// Pending reports whether records wait for replay.
func (b *memBuffer) Pending() bool { return b.Len() > 0 }

// Replay applies the records held, oldest first, into m, forgetting each
// once applied; it stops at the first failure, keeping that record and
// the later ones. It returns how many it applied.
func (b *memBuffer) Replay(ctx context.Context, m store.Meter) (int, error) {
	b.replayMu.Lock()
	defer b.replayMu.Unlock()
	b.mu.Lock()
	batch := b.recs[:len(b.recs):len(b.recs)] // appends made meanwhile do not touch it
	b.mu.Unlock()
	applied := 0
	var err error
	for _, rec := range batch {
		if err = spool.Apply(ctx, m, rec); err != nil {
			break
		}
		applied++
	}
	b.mu.Lock()
	b.recs = append(b.recs[:0:0], b.recs[applied:]...)
	b.mu.Unlock()
	return applied, err
}

// memLogEvery is the shortest time between two log lines about usage kept
// in memory.
const memLogEvery = 10 * time.Second

// logMemBuffer logs, at most every memLogEvery, that the embedded store
// cannot write and usage is kept in memory (kept), or lost because the
// buffer is full.
func (s *shared) logMemBuffer(kept bool) {
	now, last := time.Now().UnixNano(), s.memLogged.Load()
	if now-last < int64(memLogEvery) || !s.memLogged.CompareAndSwap(last, now) {
		return
	}
	if kept {
		s.logger.Error("the embedded store cannot write (disk full or failing; see the store call errors): usage is kept in memory and written once it can",
			zap.Int("records_in_memory", s.mem.Len()), zap.Int("max_records", s.mem.max))
		return
	}
	s.logger.Error("the embedded store cannot write and the usage kept in memory reached its bound: usage is lost (counted in lost_usage_records_total)",
		zap.Int("max_records", s.mem.max))
}

// dropMemBuffer makes a last attempt to write the usage kept in memory
// into the store before it closes, and counts what remains as lost.
func (s *shared) dropMemBuffer() {
	b, st := s.mem, s.st.Load()
	if b == nil || st == nil || !b.Pending() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := b.Replay(ctx, st)
	if n > 0 {
		getMetrics().replayed.Add(float64(n))
	}
	if left := b.Len(); left > 0 {
		getMetrics().lostUsage.Add(float64(left))
		s.logger.Error("the embedded store still cannot write: usage kept in memory is lost at shutdown",
			zap.Int("records", left), zap.Error(err))
	}
}
