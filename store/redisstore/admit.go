package redisstore

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// admitScript is limiter.Policy.Decide run atomically in Redis, with the
// Redis server's clock.
//
// KEYS[1] holds "<TAT>,<interval>": the TAT in integer microseconds since
// the epoch and the emission interval it was stored under, so that a rate
// change rescales it like limiter.Policy.Rescale. ARGV:
// interval (µs), burst (units), cost (units). It returns {allowed (0/1),
// remaining, retry_after_us, reset_after_us, cost_exceeds_burst (0/1),
// now_us}.
//
// Lua numbers are doubles, exact for integers up to 2^53. The script works
// relative to now: d = max(TAT, now) - now, and every intermediate value is
// at most interval*burst plus interval*cost (each ≤ limiter.MaxBurstSpan =
// 2^52 for a valid policy and cost ≤ burst) plus a stored d, so all of them
// stay within 2^53; the absolute TAT it stores is now + d ≤ now + 2^52,
// below 2^53 until the year 2112. Divisions are corrected to exact floors,
// and numbers are written with %d: tostring would round to 14 digits.
// A denied request and a zero cost write nothing.
var admitScript = redis.NewScript(`
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local span = interval * burst

local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

local d = 0
local stored = redis.call('GET', KEYS[1])
if stored then
  local tat, from = string.match(stored, '^(%d+),(%d+)$')
  tat, from = tonumber(tat), tonumber(from)
  if tat and tat > now then
    d = tat - now
    if from ~= interval and from > 0 then
      -- a changed rate carries over the units owed, not the time
      local owed = idiv(d + from - 1, from)
      if owed > burst then owed = burst end
      d = owed * interval
    end
  end
end
local avail = 0
if span > d then avail = idiv(span - d, interval) end

if cost <= 0 then return {1, avail, 0, d, 0, now} end
if cost > burst then return {0, avail, 0, d, 1, now} end
local nd = d + interval * cost
if nd > span then return {0, avail, nd - span, d, 0, now} end
redis.call('SET', KEYS[1], string.format('%d,%d', now + nd, interval), 'PX', string.format('%d', idiv(nd, 1000) + 1))
return {1, idiv(span - nd, interval), 0, nd, 0, now}
`)

// Admit implements store.Store with one EVALSHA round trip. It decides
// exactly as limiter.Policy.Decide would at the Redis server's time, so all
// instances sharing the Redis share one budget per subject. An invalid
// policy is decided without contacting Redis.
func (s *Store) Admit(ctx context.Context, a store.Admission) (limiter.Decision, error) {
	d, _, err := s.admit(ctx, a)
	return d, err
}

// admit is Admit that also returns the Redis time of the decision (µs).
func (s *Store) admit(ctx context.Context, a store.Admission) (limiter.Decision, int64, error) {
	if !a.Rate.Valid() {
		_, d := a.Rate.Decide(0, 0, a.Cost)
		return d, 0, nil
	}
	probe, err := s.breaker.allow()
	if err != nil {
		return limiter.Decision{}, 0, err
	}
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	r, err := admitScript.Run(octx, s.client, []string{s.rateKey(a.Subject)},
		a.Rate.Interval(), a.Rate.BurstUnits(), a.Cost).Int64Slice()
	cancel()
	if err = s.finish(ctx, probe, err); err != nil {
		return limiter.Decision{}, 0, err
	}
	if len(r) != 6 {
		return limiter.Decision{}, 0, fmt.Errorf("redisstore: rate-limit script returned %d values, want 6", len(r))
	}
	return limiter.Decision{
		Allowed:          r[0] == 1,
		Remaining:        r[1],
		RetryAfter:       time.Duration(r[2]) * time.Microsecond,
		ResetAfter:       time.Duration(r[3]) * time.Microsecond,
		CostExceedsBurst: r[4] == 1,
	}, r[5], nil
}
