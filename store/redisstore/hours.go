package redisstore

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/metering"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// The hour index (store.HourIndex): P{b:N(s)}:active:<hourID> (Pactive:<hourID>
// on a single Redis) is the set of the subjects s, in bucket N(s), that
// reserved or settled in the UTC hour. It expires store.HourIndexRetention
// after the hour's start.
//
// A subject's first metering call of an hour in this process that counted
// something (an admitted reservation of units, an applied settlement)
// starts the index write in the background once its script ran, and the
// request does not wait for it: it is one SADD per subject, hour and
// process, off the request path. A denied call writes nothing. A write
// that fails is tried again by the subject's next call. A crash between
// the script and the write loses the index entry (never the usage): the
// reporter's daily full pass covers it.

// hourMemoHours is how many hours the memo of indexed subjects keeps.
const hourMemoHours = 4

// hourMemo remembers, per hour, the subjects whose index write succeeded
// (true) or is in flight (false) in this process.
type hourMemo struct {
	mu    sync.Mutex
	hours map[string]map[string]bool
}

// activeKey is bucket b's index of hourID.
func (s *Store) activeKey(b int, hourID string) string {
	return s.prefix + s.tagAt(b) + "active:" + hourID
}

// indexMetered indexes a metering call of subject for hourID that counted
// something: in the hour's index, and as late when the hour is over.
func (s *Store) indexMetered(subject, hourID string) {
	s.indexHour(subject, hourID)
	s.markLate(subject, hourID)
}

// indexHour starts the index write of (subject, hourID) unless this
// process made or is making it.
func (s *Store) indexHour(subject, hourID string) {
	m := &s.hourMemo
	m.mu.Lock()
	if m.hours == nil {
		m.hours = make(map[string]map[string]bool)
	}
	subs := m.hours[hourID]
	if subs == nil {
		if len(m.hours) >= hourMemoHours {
			oldest := hourID
			for h := range m.hours {
				oldest = min(oldest, h)
			}
			if oldest == hourID { // a replay of an hour older than every kept one
				m.mu.Unlock()
				s.writeHourIndex(subject, hourID, nil)
				return
			}
			delete(m.hours, oldest)
		}
		subs = make(map[string]bool)
		m.hours[hourID] = subs
	}
	if _, ok := subs[subject]; ok {
		m.mu.Unlock()
		return
	}
	subs[subject] = false
	m.mu.Unlock()
	s.writeHourIndex(subject, hourID, func(ok bool) {
		m.mu.Lock()
		defer m.mu.Unlock()
		if subs := m.hours[hourID]; subs != nil {
			if ok {
				subs[subject] = true
			} else {
				delete(subs, subject)
			}
		}
	})
}

// writeHourIndex adds subject to hourID's index in a goroutine bounded by
// OpTimeout (see background), then calls done (when not nil) with its
// outcome.
func (s *Store) writeHourIndex(subject, hourID string, done func(ok bool)) {
	start, err := metering.ParseTimeID(hourID)
	if err != nil {
		return // the metering call refuses it
	}
	key := s.activeKey(bucketOf(subject), hourID)
	if s.life.Err() != nil {
		return // closed
	}
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		err := s.background(func(ctx context.Context) error {
			_, err := s.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.SAdd(ctx, key, subject)
				p.ExpireAt(ctx, key, start.Add(store.HourIndexRetention))
				return nil
			})
			return err
		})
		if done != nil {
			done(err == nil)
		}
	}()
}

// background runs op, an index write off the request path, within
// OpTimeout and until Close. It bypasses the circuit breaker: an index
// write that fails must not make metering calls fail fast.
func (s *Store) background(op func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(s.life, s.opTimeout)
	defer cancel()
	return op(ctx)
}

// HourSubjects implements store.HourIndex: one SMEMBERS per bucket, in
// one pipeline (one round trip per master).
func (s *Store) HourSubjects(ctx context.Context, hourID string) ([]string, error) {
	var out []string
	err := s.call(ctx, func(ctx context.Context) error {
		bs := s.bucketList()
		cmds := make([]*redis.StringSliceCmd, len(bs))
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, b := range bs {
				cmds[i] = p.SMembers(ctx, s.activeKey(b, hourID))
			}
			return nil
		})
		if err != nil {
			return err
		}
		out = out[:0]
		for _, c := range cmds {
			out = append(out, c.Val()...)
		}
		return nil
	})
	return out, err
}

var _ store.HourIndex = (*Store)(nil)

// Late calls (store.HourIndex.LateSubjects): P{b:N(s)}:late (Plate on a
// single Redis) is a sorted set of the subjects s, in bucket N(s), whose
// metering call ran after the hour it metered, scored by a version that
// each such call increments. The call's script has run when its version
// is incremented, so a reader that sees a version sees its usage; DoneLate
// removes a subject only at the version it read. Late calls are
// coalesced per subject: while one increment is in flight, the next ones
// make one more increment after it. The set expires
// store.HourIndexRetention after its last write.

// lateState is a subject's late increment in flight, and whether another
// one is due after it.
type lateState struct{ again bool }

// lateKey is bucket b's late set.
func (s *Store) lateKey(b int) string { return s.prefix + s.tagAt(b) + "late" }

// markLate records, after a metering call of subject for hourID ran,
// that it was late: when hourID is before the current hour.
func (s *Store) markLate(subject, hourID string) {
	if hourID >= metering.TimeID(time.Now().UTC().Truncate(time.Hour)) || s.life.Err() != nil {
		return // not late, or closed
	}
	s.lateMu.Lock()
	if st := s.late[subject]; st != nil {
		st.again = true
		s.lateMu.Unlock()
		return
	}
	if s.late == nil {
		s.late = make(map[string]*lateState)
	}
	st := &lateState{}
	s.late[subject] = st
	s.lateMu.Unlock()
	key := s.lateKey(bucketOf(subject))
	s.bg.Add(1)
	go func() {
		defer s.bg.Done()
		for {
			_ = s.background(func(ctx context.Context) error {
				_, err := s.client.TxPipelined(ctx, func(p redis.Pipeliner) error {
					p.ZIncrBy(ctx, key, 1, subject)
					p.Expire(ctx, key, store.HourIndexRetention)
					return nil
				})
				return err
			}) // lost: the reporter's daily full pass reads every customer
			s.lateMu.Lock()
			if st.again && s.life.Err() == nil {
				st.again = false
				s.lateMu.Unlock()
				continue
			}
			delete(s.late, subject)
			s.lateMu.Unlock()
			return
		}
	}()
}

// LateSubjects implements store.HourIndex: one ZRANGE per bucket, in one
// pipeline.
func (s *Store) LateSubjects(ctx context.Context) ([]store.LateSubject, error) {
	var out []store.LateSubject
	err := s.call(ctx, func(ctx context.Context) error {
		bs := s.bucketList()
		cmds := make([]*redis.ZSliceCmd, len(bs))
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, b := range bs {
				cmds[i] = p.ZRangeWithScores(ctx, s.lateKey(b), 0, -1)
			}
			return nil
		})
		if err != nil {
			return err
		}
		out = out[:0]
		for _, c := range cmds {
			for _, z := range c.Val() {
				if sub, ok := z.Member.(string); ok {
					out = append(out, store.LateSubject{Subject: sub, Version: int64(z.Score)})
				}
			}
		}
		return nil
	})
	return out, err
}

// doneLateScript removes from KEYS[1] each member ARGV[2i-1] whose score
// is still ARGV[2i]. It is sent with EVAL (rare, small): a pipeline cannot
// fall back from EVALSHA.
const doneLateScript = `
for i = 1, #ARGV, 2 do
  local v = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if v and tonumber(v) == tonumber(ARGV[i + 1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
`

// DoneLate implements store.HourIndex: one script per bucket with done
// subjects, in one pipeline.
func (s *Store) DoneLate(ctx context.Context, done []store.LateSubject) error {
	if len(done) == 0 {
		return nil
	}
	byBucket := make(map[int][]any)
	for _, d := range done {
		b := 0
		if s.cluster != nil {
			b = bucketOf(d.Subject)
		}
		byBucket[b] = append(byBucket[b], d.Subject, d.Version)
	}
	return s.call(ctx, func(ctx context.Context) error {
		_, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for b, args := range byBucket {
				p.Eval(ctx, doneLateScript, []string{s.lateKey(b)}, args...)
			}
			return nil
		})
		return err
	})
}
