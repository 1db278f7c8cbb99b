package redisstore

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"math/bits"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/apimonetize/caddy-api-monetize/limiter"
	"github.com/apimonetize/caddy-api-monetize/store"
)

// Metering keys, under Options.KeyPrefix (P), all hash-tagged by subject
// except the last:
//
//	P{<s>}:rl                  rate state "<TAT>,<interval>" carried into the
//	                           next period: written (PX until the TAT) only
//	                           when the state reaches past the period's end
//	P{<s>}:u:<period>          hash of the period, EXPIREAT period end +
//	                           store.Retention, with the fields
//	                             c           the period's counters and rate
//	                                         state: billed, overage, requests,
//	                                         TAT, interval (0, 0: no rate
//	                                         state); the tier rate and the
//	                                         throttle both use the state
//	                             crossed     ",80,100,": thresholds crossed
//	                             h:<hour>    billed, overage, requests of one
//	                                         hour with usage
//	                             c:<m>, crossed:<m>, h:<hour>:<m>
//	                                         the same for meter <m> other
//	                                         than the default one
//	                                         (store.MeterReservation):
//	                                         billed, overage, requests
//	                                         (no rate state)
//	                             w:<origin>  replay window of an origin: the
//	                                         highest seq, then its state,
//	                                         store.SeqWindow digits, the i-th
//	                                         for seq highest-i: 0 none,
//	                                         1 reserved, 2 settled (or
//	                                         nothing to settle)
//	                           Numbers in c, h: and w: are little-endian
//	                           int64s, 8 bytes each (struct.pack "<i8" in the
//	                           scripts): reading and writing them costs the
//	                           script far less than decimal text (strtod and
//	                           sprintf were about a tenth of its
//	                           instructions). Development builds before
//	                           2026-11-27 kept decimal text in
//	                           P{<s>}:q:<period>; the new name keeps such a
//	                           hash from being read as packed numbers (it is
//	                           not migrated: no release had it).
//	P{<s>}:idem:<key>          an idempotency key held or billed:
//	                           "<repeats>:<fingerprint>" (older records hold
//	                           "1", which no fingerprint matches); PX the
//	                           reservation's idempotency window
//	P{<s>}:outbox              list of threshold events, oldest first:
//	                           "<period>|<threshold>|<used>|<included>|<at µs>|<expires s>",
//	                           preceded by "@<m>|" for meter <m>;
//	                           expired entries are popped from its head when
//	                           one is added; expires with its newest entry
//	Poutbox:subjects           sorted set of subjects with outbox entries,
//	                           scored by when their newest entry expires
//
// Everything a reservation reads and writes about its period, the rate
// state included, is in the period hash, so the common path is three
// commands inside one script (TIME, HMGET and HSET of the period): write
// commands cost Redis several µs each inside a script, and the script's
// cost caps the throughput of one Redis. The rate key is read only by the
// first rated reservation of a period, and written only while the rate
// state reaches past the period's end (the minutes before it, for usual
// rates), so the GCRA state crosses period boundaries exactly. (A tier
// change that moves a customer to another kind of period starts the new
// period's state from the rate key as well, so it loses a state that ended
// before the old period's end: at most one burst.)
//
// Replay windows live in the period hash of the reservations they track:
// a replay carries the quota (and so the period) of its reservation, so the
// window it is checked against is the one its reservation was marked in,
// and it lasts as long as the period's counters.
//
// Redis memory per active subject is bounded: one hash per period with at
// most 745 hour fields (31 days and a daylight-saving hour) and one window
// per instance origin, a few outbox entries per period; all of them
// expire. The only per-request keys are idempotency keys, bounded by the
// request rate of callers that send Idempotency-Key over
// the idempotency window.
//
// Reserve and Settle also write Poutbox:subjects when a threshold is
// crossed, which is outside the subject's hash slot: in a Redis Cluster
// the script leaves it out and the store indexes the subject in its
// bucket afterwards (see Store.indexOutbox).
//
// All numbers (units, seqs, µs) are integers below 2^53, exact in Lua's
// doubles; Reserve and Settle reject larger ones.

// maxExact is the first integer a Lua double cannot tell from its
// successor.
const maxExact = 1 << 53

// maxMeterNumbers is how many numbers a metering script call carries at
// most: six shared ones and the reserve script's seven.
const maxMeterNumbers = 13

// meterLua is the part shared by the reserve and settle scripts: it reads
// the period hash once, and flush writes it back once. The common path of
// a reservation runs three commands and no string scanning: threshold
// crossing is checked against the least usage that reaches a threshold and
// ARGV 8 first.
//
// KEYS: 1 rate, 2 idempotency, 3 period, 4 outbox, 5 outbox subjects.
// ARGV: 1 mode (meter, block, bill, throttle), 2 the numbers, packed as
// little-endian int64s (see command.ints): included, expiry of the period
// (Unix s), has an idempotency key (0/1), seq (0: none), replay (0/1), the
// least usage that reaches a threshold (-1: none can be crossed), and
// then the script's own numbers; 3 period id, 4 the hour's field
// (h:<hour id>), 5 thresholds ("80,100,120"), 6 subject, 7 the replay
// window's field (w:<origin>), 8 the crossed field once every threshold is
// crossed in order (",80,100,120,"), 9 the idempotency fingerprint (only
// with an idempotency key). A call with other meters (see newMeterCall)
// always sends 9 (empty without a key), then 10 their numbers, six packed
// int64s each, and three arguments each from 11 on: the meter's name, its
// thresholds and its crossed field once every threshold is crossed.
// Numbers travel packed because tonumber (strtod) is among the costliest
// things a script does. The replay window's size is written into the
// source.
const meterLua = `
local t = redis.call('TIME')
local nows = tonumber(t[1])
local now = nows * 1000000 + tonumber(t[2])
local format, sub, spack, sunpack = string.format, string.sub, struct.pack, struct.unpack
local mode = ARGV[1]
local included, expiry, idem, seq, replay, level = sunpack('<i8i8i8i8i8i8', ARGV[2])
idem, replay = idem == 1, replay == 1
local W = @SEQ_WINDOW@

local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- M is the number of meters besides the default one (ARGV 10 on): their
-- fields follow the default's in p, three each (see mfield).
local M = 0
if ARGV[10] then M = #ARGV[10] / 48 end
local p
if M == 0 then
  p = redis.call('HMGET', KEYS[3], 'c', 'crossed', ARGV[4], ARGV[7])
else
  local f = {'c', 'crossed', ARGV[4], ARGV[7]}
  for i = 1, M do
    local name = ARGV[8 + 3 * i]
    f[3 * i + 2], f[3 * i + 3], f[3 * i + 4] = 'c:' .. name, 'crossed:' .. name, ARGV[4] .. ':' .. name
  end
  p = redis.call('HMGET', KEYS[3], unpack(f))
end
-- The period's counters and rate state (tat 0 and from 0: none), as
-- read; flush writes cb, co, cr, ctat, cfrom back when cdirty.
local used, pover, preqs, tat, from = 0, 0, 0, 0, 0
if p[1] then used, pover, preqs, tat, from = sunpack('<i8i8i8i8i8', p[1]) end
local cb, co, cr, ctat, cfrom, cdirty = used, pover, preqs, tat, from, false

-- writes holds the other period hash fields to set, written by flush.
local writes = {}

-- metering.Overage
local function overage(before, cost)
  if mode == 'meter' then return 0 end
  if before >= included then return cost end
  local o = cost - (included - before)
  if o < 0 then return 0 end
  return o
end

-- count adds to the period's and the hour's counters.
local function count(billed, over, requests)
  local hb, ho, hr = 0, 0, 0
  if p[3] then hb, ho, hr = sunpack('<i8i8i8', p[3]) end
  cb, co, cr, cdirty = cb + billed, co + over, cr + requests, true
  local n = #writes
  writes[n + 1], writes[n + 2] = ARGV[4], spack('<i8i8i8', hb + billed, ho + over, hr + requests)
end

-- crossAt records the thresholds ths ("80,100") of a meter with inc
-- included units reached at usage u and not crossed before in the period
-- (lvl: the least usage reaching one, -1 for none; seen: the crossed field
-- as read, all: its value once every threshold is crossed), writes the
-- crossed field and one outbox entry each (tag before it), and returns
-- them (nil for none); crossedAny is set once it wrote one.
local crossedAny = false
local function crossAt(u, inc, lvl, field, seen, ths, all, tag)
  local crossed = seen or ','
  if lvl < 0 or crossed == all or u < lvl then return nil end
  local got = {}
  -- reached: u*100 >= th*inc, exactly
  local q = idiv(inc, 100)
  local r = inc - q * 100
  local x = crossed
  for ts in string.gmatch(ths, '%d+') do
    local th = tonumber(ts)
    if not string.find(x, ',' .. ts .. ',', 1, true) and not (q > 0 and th > 9007199254740992 / q)
        and u >= th * q + idiv(th * r + 99, 100) then
      x = x .. ts .. ','
      got[#got + 1] = th
    end
  end
  if #got == 0 then return nil end
  writes[#writes + 1], writes[#writes + 2] = field, x
  while not crossedAny do
    local head = redis.call('LINDEX', KEYS[4], 0)
    if not head then break end
    local exp = tonumber(string.match(head, '|(%d+)$'))
    if not exp or exp > nows then break end
    redis.call('LPOP', KEYS[4])
  end
  for _, th in ipairs(got) do
    redis.call('RPUSH', KEYS[4], tag .. format('%s|%d|%d|%d|%d|%d', ARGV[3], th, u, inc, now, expiry))
  end
  if crossedAny then return got end
  local left, exp = expiry - nows, format('%d', expiry)
  if redis.call('TTL', KEYS[4]) < left then redis.call('EXPIREAT', KEYS[4], exp) end
  crossedAny = true
  -- In a cluster the outbox subjects index is in another slot: the store
  -- writes it after the script (see Store.indexOutbox).
  if KEYS[5] then
    redis.call('ZADD', KEYS[5], 'GT', exp, ARGV[6])
    redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', format('%d', nows))
    if redis.call('TTL', KEYS[5]) < left then redis.call('EXPIREAT', KEYS[5], exp) end
  end
  return got
end

-- The other meters: ARGV 10 holds six packed numbers each (the script's
-- own), and ARGV 8+3i, 9+3i, 10+3i the name, the thresholds and the
-- crossed field once every threshold is crossed of meter i. Their fields
-- are c:<m> (billed, overage, requests), crossed:<m> and h:<hour>:<m>,
-- read into p[3i+2], p[3i+3], p[3i+4]. Modes are numbers: 0 meter,
-- 1 block, 2 bill, 3 throttle.
local mnums, mcounters, mcount, mcross, moverage
if M > 0 then
  mnums = function(i) return sunpack('<i8i8i8i8i8i8', ARGV[10], 48 * i - 47) end
  mcounters = function(i)
    local v = p[3 * i + 2]
    if v then return sunpack('<i8i8i8', v) end
    return 0, 0, 0
  end
  -- mcount adds to meter i's period counters (b, o, r as read) and hour.
  mcount = function(i, b, o, r, billed, over, requests)
    local name = ARGV[8 + 3 * i]
    local hb, ho, hr = 0, 0, 0
    if p[3 * i + 4] then hb, ho, hr = sunpack('<i8i8i8', p[3 * i + 4]) end
    local n = #writes
    writes[n + 1], writes[n + 2] = 'c:' .. name, spack('<i8i8i8', b + billed, o + over, r + requests)
    writes[n + 3], writes[n + 4] = ARGV[4] .. ':' .. name, spack('<i8i8i8', hb + billed, ho + over, hr + requests)
  end
  mcross = function(i, u, inc, lvl)
    if lvl < 0 or u < lvl then return nil end -- crossAt's first check, before building names
    local name = ARGV[8 + 3 * i]
    return crossAt(u, inc, lvl, 'crossed:' .. name, p[3 * i + 3], ARGV[9 + 3 * i], ARGV[10 + 3 * i], '@' .. name .. '|')
  end
  -- metering.Overage
  moverage = function(before, cost, inc)
    if before >= inc then return cost end
    local o = cost - (inc - before)
    if o < 0 then return 0 end
    return o
  end
end

-- The replay window of (subject, origin) in this period: the highest seq
-- seen and one state digit per seq below it; slot is the state of seq as
-- read: '0' when above the window, nil below it.
local high, state, slot = 0, nil, '0'
local track = seq > 0
if track and p[4] and #p[4] == 8 + W then
  high, state = sunpack('<i8c@SEQ_WINDOW@', p[4])
  if seq <= high then
    slot = nil
    if high - seq < W then slot = sub(state, high - seq + 1, high - seq + 1) end
  end
end

-- mark sets the state of seq, sliding the window up to it.
local function mark(c)
  if seq > high then
    local shift = seq - high
    if shift >= W or not state then
      state = c .. string.rep('0', W - 1)
    elseif shift == 1 then
      state = c .. sub(state, 1, W - 1)
    else
      state = c .. string.rep('0', shift - 1) .. sub(state, 1, W - shift)
    end
    high = seq
  else
    local i = high - seq
    if i >= W then return end
    state = sub(state, 1, i) .. c .. sub(state, i + 2)
  end
  writes[#writes + 1], writes[#writes + 2] = ARGV[7], spack('<i8c0', high, state)
end

-- flush writes the period hash fields set, and the hash's expiry when it
-- had no counters yet.
local function flush()
  if cdirty then
    writes[#writes + 1], writes[#writes + 2] = 'c', spack('<i8i8i8i8i8', cb, co, cr, ctat, cfrom)
  end
  if #writes == 0 then return end
  redis.call('HSET', KEYS[3], unpack(writes))
  if not p[1] then redis.call('EXPIREAT', KEYS[3], format('%d', expiry)) end
end
`

// meterScript returns a metering script: meterLua and then body, with the
// constants written in.
func meterScript(body string) *luaScript {
	return newLuaScript(strings.NewReplacer(
		"@SEQ_WINDOW@", strconv.Itoa(store.SeqWindow),
		"@RETENTION_S@", strconv.FormatInt(int64(store.Retention/time.Second), 10),
	).Replace(meterLua + body))
}

// The rate decision of reserveScript is limiter.Policy.Decide (with Policy.Rescale for a TAT stored under
// another interval) at the Redis server's time. Lua numbers are doubles,
// exact for integers up to 2^53: the rate part works relative to now,
// d = max(TAT, now) - now, and every intermediate value is at most
// interval*burst plus interval*cost (each ≤ limiter.MaxBurstSpan = 2^52 for
// a valid policy and cost ≤ burst), so all stay within 2^53; the absolute
// TAT stored is now + d, below 2^53 until the year 2112. Divisions are
// corrected to exact floors, and numbers are written with %d (tostring
// would round to 14 digits).
//
// reserveScript is one reservation (see Store.Reserve). Its own numbers:
// cost, the tier rate's interval (µs) and burst, the throttle's (an
// interval of 0 means no policy, -1 an invalid one), the most repeats of
// an idempotency key that are duplicates and its window (ms), these two
// only with an idempotency key.
//
// It returns {flags, remaining, retry_after_us, reset_after_us, used,
// overage, now_us, crossed...}, flags holding one bit each (see
// reserveFlags). With other meters (their numbers: amount, included,
// mode, the throttle's interval and burst, level) it returns {flags,
// remaining, retry_after_us, reset_after_us, used, overage, now_us, the
// index (1-based) of the meter whose block quota denied or 0, the count of
// the default meter's crossed thresholds, them, and per meter: used,
// overage, throttled (0/1), the count of its crossed thresholds, them}
// (see Store.reservedMeters); flagCrossed is then set when any threshold
// was crossed.
var reserveScript = meterScript(`
local cost, interval, burst, tInterval, tBurst = sunpack('<i8i8i8i8i8', ARGV[2], 49)

-- storedTAT is the TAT read by rate (0: none).
local storedTAT = 0

-- rate decides cost under the policy and returns the decision (applied,
-- allowed, remaining, retry after, reset after, cost exceeds burst) and,
-- when admitted, the new TAT offset from now. The state is the period
-- hash's rl field, or, before the period has one, the rate key, which holds
-- the state whenever it reaches past the period's end (see below).
local function rate(interval, burst, c)
  if interval == 0 then return 0, 1, 0, 0, 0, 0 end
  if interval < 0 then
    if c > 0 then return 1, 0, 0, 0, 0, 1 end
    return 1, 0, 0, 0, 0, 0
  end
  local span = interval * burst
  local d = 0
  local stat, sfrom = tat, from
  if sfrom == 0 then
    local stored = redis.call('GET', KEYS[1])
    if stored then
      local a, b = string.match(stored, '^(%d+),(%d+)$')
      stat, sfrom = tonumber(a) or 0, tonumber(b) or 0
    end
  end
  storedTAT = stat
  if stat > now then
    d = stat - now
    if sfrom ~= interval and sfrom > 0 then
      local owed = idiv(d + sfrom - 1, sfrom)
      if owed > burst then owed = burst end
      d = owed * interval
    end
  end
  local avail = 0
  if span > d then avail = idiv(span - d, interval) end
  if c <= 0 then return 1, 1, avail, 0, d, 0 end
  if c > burst then return 1, 0, avail, 0, d, 1 end
  local nd = d + interval * c
  if nd > span then return 1, 0, avail, nd - span, d, 0 end
  return 1, 1, idiv(span - nd, interval), 0, nd, 0, nd
end

-- The other meters' state: mn[i] = {amount, included, mode, level, used,
-- overage, requests, reserved overage, crossed}; mthr[i] is 1 when meter i
-- is used up in throttle mode; qexm is the meter whose block quota denies.
-- (Created only with meters: the common path creates no table or
-- function it does not use.)
local mn, mthr, qexm, mreply = nil, nil, 0, nil
if M > 0 then
mn, mthr = {}, {}

-- mreply appends the meters to the reply out: qexm, the default meter's
-- crossed thresholds (count first), then per meter used, overage,
-- throttled, and its crossed thresholds (count first).
mreply = function(out, crossed)
  if crossedAny then out[1] = out[1] + 128 end
  out[8] = qexm
  local n = 9
  out[9] = 0
  if crossed then
    out[9] = #crossed
    for i = 1, #crossed do out[9 + i] = crossed[i] end
    n = 9 + #crossed
  end
  for i = 1, M do
    local m = mn[i]
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = m[5], m[8], mthr[i], 0
    local c = m[9]
    if c then
      out[n + 4] = #c
      for j = 1, #c do out[n + 4 + j] = c[j] end
      n = n + #c
    end
    n = n + 4
  end
  return out
end
end

-- reply is the script's reply; the rate decision comes last, as rate
-- returns it (applied, allowed, remaining, retry, reset, exceeds). The
-- seven flags go in one integer, one bit each (see reserveFlags).
local function reply(allowed, throttled, qex, u, over, dup, crossed, applied, ok, avail, retry, reset, exceeds)
  local out = {allowed + 2 * applied + 4 * ok + 8 * exceeds + 16 * throttled + 32 * qex + 64 * dup,
    avail, retry, reset, u, over, now}
  if M > 0 then return mreply(out, crossed) end
  if crossed then
    for i = 1, #crossed do out[7 + i] = crossed[i] end
  end
  return out
end

local throttled = 0
-- units is what the rate spends: cost, or 1 for a zero cost a meter's
-- throttle applies to (store.Admission.Units).
local units = cost
if mode == 'throttle' and used >= included then
  throttled = 1
  interval, burst = tInterval, tBurst
end
-- Any meter used up in throttle mode throttles; the slowest throttle
-- applies (store.SlowerPolicy on the encoded policies).
for i = 1, M do
  local amount, inc, mm, ti, tb, lvl = mnums(i)
  local b, o, r = mcounters(i)
  mn[i] = {amount, inc, mm, lvl, b, o, r, 0, nil}
  mthr[i] = 0
  if mm == 3 and b >= inc then
    mthr[i] = 1
    if units == 0 then units = 1 end
    local slower
    if ti == interval then slower = tb < burst
    elseif ti == -1 then slower = true
    elseif interval == -1 or ti == 0 then slower = false
    else slower = interval == 0 or ti > interval end
    if throttled == 0 or slower then interval, burst = ti, tb end
    throttled = 1
  end
end

-- A zero cost without meters only reports; with meters it counts them
-- (the default meter is left alone below). A replay already applied
-- applies no policy: 0, 1, 0, 0, 0, 0.
if cost <= 0 and M == 0 then
  return reply(1, throttled, 0, used, 0, 0, nil, rate(interval, burst, 0))
end
-- A seq already marked (a replay applied, a void, or this very call run
-- before) counts nothing again; only a replay is skipped below the window.
if track and slot ~= '0' and (replay or slot) then
  return reply(1, 0, 0, used, 0, 1, nil, 0, 1, 0, 0, 0, 0)
end
-- A repeat of a held key is decided like any request below; it is a
-- duplicate (not counted) only when it repeats the same request (ARGV 9)
-- fewer than maxRepeats times so far.
local held, dup = false, false
local repeats, fp, maxRepeats, idemTTL
if idem then
  maxRepeats, idemTTL = sunpack('<i8i8', ARGV[2], 89)
  local rec = redis.call('GET', KEYS[2])
  if rec then
    held = true
    repeats, fp = string.match(rec, '^(%d+):(.*)$')
    dup = fp ~= nil and fp ~= '' and fp == ARGV[9] and tonumber(repeats) < maxRepeats
  end
end

local applied, ok, avail, retry, reset, exceeds, nd = 0, 1, 0, 0, 0, 0, nil
if replay then
  throttled = 0
else
  if mode == 'block' and cost > 0 and used + cost > included then
    return reply(0, throttled, 1, used, 0, 0, nil, rate(interval, burst, 0))
  end
  for i = 1, M do
    local m = mn[i]
    if m[3] == 1 and ((m[1] > 0 and m[1] > m[2] - m[5]) or (m[1] == 0 and m[5] >= m[2])) then
      qexm = i
      return reply(0, throttled, 1, used, 0, 0, nil, rate(interval, burst, 0))
    end
  end
  applied, ok, avail, retry, reset, exceeds, nd = rate(interval, burst, units)
  if ok == 0 then
    return reply(0, throttled, 0, used, 0, 0, nil, applied, ok, avail, retry, reset, exceeds)
  end
end

if nd then
  -- The state goes in the period hash; when it reaches past the period's
  -- end (or did before this request), also in the rate key, which the
  -- next period starts from: the GCRA carries over the boundary exactly.
  ctat, cfrom, cdirty = now + nd, interval, true
  local boundary = (expiry - @RETENTION_S@) * 1000000
  if now + nd > boundary or storedTAT > boundary then
    redis.call('SET', KEYS[1], format('%d,%d', now + nd, interval), 'PX', format('%d', idiv(nd, 1000) + 1))
  end
end
if dup then
  redis.call('SET', KEYS[2], format('%d:%s', tonumber(repeats) + 1, fp), 'KEEPTTL')
  if track then mark('2') end
  flush()
  return reply(1, throttled, 0, used, 0, 1, nil, applied, ok, avail, retry, reset, exceeds)
end
local over, got = 0, nil
if cost > 0 then
  over = overage(used, cost)
  count(cost, over, 1)
end
if idem and not held then redis.call('SET', KEYS[2], '0:' .. ARGV[9], 'PX', format('%d', idemTTL)) end
if track then mark('1') end
if cost > 0 then got = crossAt(used + cost, included, level, 'crossed', p[2], ARGV[5], ARGV[8], '') end
for i = 1, M do
  local m = mn[i]
  if m[1] > 0 then
    local o = 0
    if m[3] ~= 0 then o = moverage(m[5], m[1], m[2]) end
    mcount(i, m[5], m[6], m[7], m[1], o, 1)
    m[5], m[8] = m[5] + m[1], o
    if m[3] ~= 0 then m[9] = mcross(i, m[5], m[2], m[4]) end
  end
end
flush()
return reply(1, throttled, 0, used + cost, over, 0, got, applied, ok, avail, retry, reset, exceeds)
`)

// settleScript is one settlement (see Store.Settle). Its own numbers:
// reserved, the reservation's overage, actual, void (0/1, see
// store.Settlement.Void); each other meter's:
// reserved, the reservation's overage, actual, included, mode, level. It returns 1 when
// applied, 2 when applied and a threshold was crossed, 0 when a replay was
// skipped.
var settleScript = meterScript(`
local reserved, resOver, actual, void = sunpack('<i8i8i8i8', ARGV[2], 49)
if replay and track and slot ~= '1' then
  -- A void of a seq never seen marks it settled: the original, should it
  -- run later, counts nothing.
  if void == 1 and slot == '0' then
    mark('2')
    flush()
  end
  return 0
end
if void == 1 and idem and ARGV[9] and ARGV[9] ~= '' then
  -- A repeat of the voided request served as its duplicate is paid for
  -- by this reservation: it stays counted.
  local rec = redis.call('GET', KEYS[2])
  local n, f = nil, nil
  if rec then n, f = string.match(rec, '^(%d+):(.*)$') end
  if f == ARGV[9] and tonumber(n) > 0 then
    mark('2')
    flush()
    return 0
  end
end
local billed, over, requests = 0, 0, 0
-- taken returns the overage to take back when d units are released: the
-- reservation's own overage first, and as much more as keeps the period's
-- overage no larger than its excess over the included units (a reservation
-- made below the quota while later ones were counted as overage).
local function taken(d)
  local r = math.min(resOver, d)
  if mode == 'meter' then return r end
  local excess = used - d - included
  if excess < 0 then excess = 0 end
  if pover - excess > r then r = pover - excess end
  if r > d then r = d end
  if r > pover then r = pover end
  if r < 0 then r = 0 end
  return r
end
if actual == reserved then
  -- Only the other meters change (a zero cost's settlement).
elseif actual <= 0 then
  billed, over, requests = -reserved, -taken(reserved), -1
  if idem and ARGV[9] and ARGV[9] ~= '' then
    -- Forget the key if this request stored it, so a retry is billed.
    local rec = redis.call('GET', KEYS[2])
    if rec and string.match(rec, '^%d+:(.*)$') == ARGV[9] then redis.call('DEL', KEYS[2]) end
  end
elseif actual < reserved then
  billed = actual - reserved
  over = -taken(reserved - actual)
elseif actual > reserved then
  billed = actual - reserved
  over = overage(used, billed)
end
if billed ~= 0 or over ~= 0 or requests ~= 0 then
  count(billed, over, requests)
end
if billed > 0 then crossAt(used + billed, included, level, 'crossed', p[2], ARGV[5], ARGV[8], '') end
-- The other meters: reserved, the reservation's overage, actual, included,
-- mode, level each. A meter's request counts when its units go from none
-- to some and is taken back with all its units.
for i = 1, M do
  local mres, mover, mact, inc, mm, lvl = mnums(i)
  local b, o, r = mcounters(i)
  local db, dov, dr = 0, 0, 0
  if mact < mres then
    local back = mres - mact
    db = -math.min(back, b)
    local t = math.min(mover, back)
    if mm ~= 0 then
      local excess = b - back - inc
      if excess < 0 then excess = 0 end
      if o - excess > t then t = o - excess end
    end
    if t > back then t = back end
    if t > o then t = o end
    if t < 0 then t = 0 end
    dov = -t
    if mact == 0 and r > 0 then dr = -1 end
  elseif mact > mres then
    db = mact - mres
    if mres == 0 then dr = 1 end
    if mm ~= 0 then dov = moverage(b, db, inc) end
  end
  if db ~= 0 or dov ~= 0 or dr ~= 0 then mcount(i, b, o, r, db, dov, dr) end
  if db > 0 and mm ~= 0 then mcross(i, b + db, inc, lvl) end
end
if track then mark('2') end
flush()
if crossedAny then return 2 end
return 1
`)

// Metering key names (see the list above): a subject's keys are its tag
// and then one of these.
const (
	rateKeySuffix         = "rl"
	idemKeySuffix         = "idem:" // + the idempotency key
	periodKeySuffix       = "u:"    // + the period id
	outboxKeySuffix       = "outbox"
	outboxSubjectsKeyName = "outbox:subjects" // after the prefix only
)

// tag is the start of every key of subject, hash-tagged by it.
func (s *Store) tag(subject string) string { return s.prefix + "{" + subject + "}:" }

func (s *Store) periodKey(subject, period string) string {
	return s.tag(subject) + periodKeySuffix + period
}
func (s *Store) outboxKey(subject string) string { return s.tag(subject) + outboxKeySuffix }
func (s *Store) outboxSubjectsKey() string       { return s.prefix + outboxSubjectsKeyName }

var _ store.Meter = (*Store)(nil)

// newMeterCall validates and encodes a reservation or settlement: the keys
// of the metering scripts and their arguments (see meterLua), own being
// the script's own numbers, written straight into the command sent. The
// keys are rate, idempotency (P{s}:idem: when there is no key: declared,
// never used), period, outbox and outbox subjects.
//
// ms are the call's other meters: ARGV 9 is then always sent (the
// fingerprint, empty without a key), ARGV 10 packs their numbers, and each
// adds its name, thresholds and all-crossed field.
func (s *Store) newMeterCall(subject string, q store.Quota, idemKey, idemFP, origin string, seq int64, replay bool, own []int64, ms []meterArg) (*command, error) {
	var mode string
	switch q.Mode {
	case store.QuotaMeter:
		mode = "meter"
	case store.QuotaBlock, store.QuotaBill, store.QuotaThrottle:
		mode = q.Mode
	default:
		return nil, fmt.Errorf("redisstore: unknown quota mode %q", q.Mode)
	}
	switch {
	case subject == "":
		return nil, errors.New("redisstore: empty subject")
	case q.PeriodID == "" || q.HourID == "" || q.PeriodEnd.IsZero():
		return nil, errors.New("redisstore: quota without a period id, period end or hour id")
	case q.Included < 0 || q.Included >= maxExact || seq < 0 || seq >= maxExact:
		return nil, errors.New("redisstore: included units or seq out of range")
	case len(idemFP) > store.MaxIdempotencyFingerprintLen:
		return nil, fmt.Errorf("redisstore: idempotency fingerprint longer than %d bytes", store.MaxIdempotencyFingerprintLen)
	}
	if origin == "" {
		seq = 0 // no replay window without an origin
	}
	var ts [64]byte
	levels := appendThresholds(ts[:0], q.Thresholds)
	c := &command{b: make([]byte, 0, 384+2*len(s.prefix)+5*len(subject)+len(q.PeriodID)+len(idemKey)+len(idemFP)+len(origin)+2*len(levels))}
	tag := s.tag(subject)
	if s.cluster != nil {
		c.int(4) // no outbox subjects key: it is in another slot
	} else {
		c.int(5)
	}
	c.str(tag, rateKeySuffix)
	c.str(tag+idemKeySuffix, idemKey)
	c.str(tag+periodKeySuffix, q.PeriodID)
	c.str(tag, outboxKeySuffix)
	if s.cluster == nil {
		c.str(s.prefix, outboxSubjectsKeyName)
	}
	c.str(mode, "")
	var nums [maxMeterNumbers]int64
	n := append(nums[:0], q.Included, q.PeriodEnd.Add(store.Retention).Unix(), flag(idemKey != ""), seq, flag(replay), firstLevel(q))
	c.ints(append(n, own...))
	c.str(q.PeriodID, "")
	c.str("h:", q.HourID)
	c.bytes(levels)
	c.str(subject, "")
	c.str("w:", origin)
	// The crossed field once every threshold is crossed: ",80,100,120,".
	var all [66]byte
	crossed := append(append(all[:0], ','), levels...)
	if len(levels) > 0 {
		crossed = append(crossed, ',')
	}
	c.bytes(crossed)
	if idemKey != "" {
		c.str(idemFP, "")
	}
	if len(ms) == 0 {
		return c, nil
	}
	if idemKey == "" {
		c.str("", "")
	}
	mnums := make([]int64, 0, 6*len(ms))
	for _, m := range ms {
		mnums = append(mnums, m.nums[:]...)
	}
	c.ints(mnums)
	for _, m := range ms {
		c.str(m.name, "")
		levels := appendThresholds(nil, m.thresholds)
		c.bytes(levels)
		all := append([]byte{','}, levels...)
		if len(levels) > 0 {
			all = append(all, ',')
		}
		c.bytes(all)
	}
	return c, nil
}

// meterArg is one meter other than the default of a metering script call:
// its name, its thresholds and its six numbers (see the scripts).
type meterArg struct {
	name       string
	thresholds []int
	nums       [6]int64
}

// modeCode is a quota mode as the scripts number other meters' modes.
func modeCode(mode string) int64 {
	switch mode {
	case store.QuotaBlock:
		return 1
	case store.QuotaBill:
		return 2
	case store.QuotaThrottle:
		return 3
	}
	return 0
}

// appendThresholds appends thresholds encoded for the metering scripts:
// "80,100,120".
func appendThresholds(b []byte, ts []int) []byte {
	start := len(b)
	for _, t := range ts {
		if t <= 0 {
			continue
		}
		if len(b) > start {
			b = append(b, ',')
		}
		b = strconv.AppendInt(b, int64(t), 10)
	}
	return b
}

// firstLevel is the least usage at which q reaches one of its thresholds,
// or -1 when none can be crossed (metering only, no included units, no
// thresholds, or levels beyond 2^53).
func firstLevel(q store.Quota) int64 {
	return levelOf(q.Mode, q.Included, q.Thresholds)
}

// levelOf is firstLevel of a quota in mode with included units and
// thresholds.
func levelOf(mode string, included int64, thresholds []int) int64 {
	if mode == store.QuotaMeter || included <= 0 {
		return -1
	}
	level := int64(-1)
	for _, t := range thresholds {
		if t <= 0 {
			continue
		}
		// ceil(t*included/100), exactly: included = 100a + b. Levels of
		// 2^53 or more are never reached (usage stays below 2^53).
		a, b := uint64(included/100), uint64(included%100)
		hi, lo := bits.Mul64(uint64(t), a)
		l := lo + (uint64(t)*b+99)/100
		if hi != 0 || l < lo || l >= maxExact {
			continue
		}
		if level < 0 || int64(l) < level {
			level = int64(l)
		}
	}
	return level
}

func flag(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// policyArgs encodes a rate policy for the reserve script: its interval
// and burst, (0, 0) for none (a zero Limit) and (-1, 0) for an invalid one,
// which admits nothing.
func policyArgs(p limiter.Policy) (interval, burst int64) {
	switch {
	case p.Limit == 0:
		return 0, 0
	case !p.Valid():
		return -1, 0
	}
	return p.Interval(), p.BurstUnits()
}

// run runs a metering script of subject under the breaker and OpTimeout,
// in a pipeline shared with concurrent calls (see batcher); in a cluster,
// on the master that owns the subject's slot (see Store.runCluster).
func (s *Store) run(ctx context.Context, subject string, script *luaScript, args *command) ([]int64, error) {
	if s.cluster != nil {
		return s.runCluster(ctx, s.tag(subject), script, args)
	}
	probe, err := s.breaker.allow()
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(s.opTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	call := &scriptCall{script: script, args: args, deadline: deadline}
	if err = s.scripts.do(ctx, call); err != nil {
		// The call may still be in flight (its caller gave up): its
		// fields are not this goroutine's to read.
		return nil, s.finish(ctx, probe, err)
	}
	return call.reply, s.finish(ctx, probe, call.err)
}

// Reserve implements store.Meter with one EVALSHA round trip: the replay
// window, the idempotency key, the quota, the rate limit (the tier's, or
// the throttle once the period's usage has reached Included in throttle
// mode) at the Redis server's clock, the period and hourly counters and the
// threshold outbox are decided and written atomically.
//
// Decisions beyond the store.Meter contract (shared with the contract
// suite, storetest.RunMeter):
//   - A block quota is checked before the rate: QuotaExceeded is reported
//     even when the rate would deny too, and Rate then only reports the
//     rate state.
//   - Overage is metering.Overage(used before, Cost, Included) in every
//     mode but store.QuotaMeter (where it is 0); in block mode it is
//     non-zero only for replays and settlements beyond the quota.
//   - The tier rate and the throttle share the subject's rate state, so
//     units owed under one carry over to the other, capped at its burst.
//   - A replay already applied is a Duplicate that reports Used and no
//     rate state (Rate zero, Throttled false). A repeat of a held
//     idempotency key is decided like any reservation (block quota, then
//     the rate or throttle, whose units it spends) and reports that state;
//     admitted, it is a Duplicate when it repeats the stored fingerprint
//     within Reservation.IdempotencyRepeats.
//   - Replay window: a Replay with a Seq above the highest seen, or within
//     the last store.SeqWindow and never reserved, is applied. A Replay
//     with a Seq more than store.SeqWindow below the highest Seq seen is
//     NOT applied (reported as a Duplicate): the store cannot tell, and
//     the only way a replay falls that far behind is an unknown outcome
//     (a timeout) while 64 later calls of the same instance succeeded,
//     i.e. Redis was answering and most likely ran it. The window is
//     forgotten store.IdempotencyWindow after its last write; a Replay
//     after that is applied.
//   - A reservation without an Origin has no replay window: a Replay
//     without an Origin is always applied.
//   - A Replay is checked against its idempotency key too: if it repeats
//     the held key's request within the bound, it is a Duplicate (and
//     counts as a repeat).
//   - A non-Replay reservation whose Seq is already marked in the window
//     (voided, see store.Settlement.Void, or applied by its Replay first)
//     is not applied either: reported Allowed and Duplicate (its caller,
//     which gave up on it, is not listening). Below the window it is
//     applied.
func (s *Store) Reserve(ctx context.Context, r store.Reservation) (store.Reserved, error) {
	out, _, err := s.reserve(ctx, r)
	return out, err
}

// reserve is Reserve that also returns the Redis time of the decision
// (µs). An admitted reservation that counted units is then indexed (see
// hours.go); a denied one, a duplicate or one of no units wrote nothing.
// A replay is indexed even when it was applied before: the original call,
// whose outcome was unknown, may not have been.
func (s *Store) reserve(ctx context.Context, r store.Reservation) (store.Reserved, int64, error) {
	out, at, err := s.reserveOnce(ctx, r)
	if err == nil && out.Allowed && (!out.Duplicate || r.Replay) && reservesUnits(r) {
		s.indexMetered(r.Subject, r.Quota.HourID)
	}
	return out, at, err
}

// reservesUnits reports whether r counts units: its cost or a meter's
// amount.
func reservesUnits(r store.Reservation) bool {
	if r.Cost > 0 {
		return true
	}
	for _, m := range r.Meters {
		if m.Amount > 0 {
			return true
		}
	}
	return false
}

// reserveOnce is reserve without the index.
func (s *Store) reserveOnce(ctx context.Context, r store.Reservation) (store.Reserved, int64, error) {
	if r.Cost < 0 || r.Cost >= maxExact {
		return store.Reserved{}, 0, fmt.Errorf("redisstore: cost %d out of range", r.Cost)
	}
	ri, rb := policyArgs(r.Rate)
	ti, tb := policyArgs(r.Quota.Throttle)
	repeats, ttl := r.IdempotencyRepeats, r.IdempotencyTTL().Milliseconds()
	if repeats < 0 || repeats >= maxExact || ttl < 1 || ttl >= maxExact {
		return store.Reserved{}, 0, fmt.Errorf("redisstore: idempotency repeats %d or window %v out of range", repeats, r.IdempotencyTTL())
	}
	own := []int64{r.Cost, ri, rb, ti, tb, repeats, ttl}
	if r.IdempotencyKey == "" {
		own = own[:5] // the script reads the last two only with a key
	}
	var ms []meterArg
	if len(r.Meters) > 0 {
		if err := store.CheckMeters(r.Meters); err != nil {
			return store.Reserved{}, 0, fmt.Errorf("redisstore: %w", err)
		}
		ms = make([]meterArg, len(r.Meters))
		for i, m := range r.Meters {
			if m.Amount >= maxExact || m.Included >= maxExact {
				return store.Reserved{}, 0, fmt.Errorf("redisstore: meter %q amount %d or included %d out of range", m.Meter, m.Amount, m.Included)
			}
			ti, tb := policyArgs(m.Throttle)
			ms[i] = meterArg{name: m.Meter, thresholds: m.Thresholds,
				nums: [6]int64{m.Amount, m.Included, modeCode(m.Mode), ti, tb, levelOf(m.Mode, m.Included, m.Thresholds)}}
		}
	}
	c, err := s.newMeterCall(r.Subject, r.Quota, r.IdempotencyKey, r.IdempotencyFingerprint, r.Origin, r.Seq, r.Replay, own, ms)
	if err != nil {
		return store.Reserved{}, 0, err
	}
	v, err := s.run(ctx, r.Subject, reserveScript, c)
	if err != nil {
		return store.Reserved{}, 0, err
	}
	if len(ms) > 0 {
		return s.reservedMeters(ctx, r, v)
	}
	if s.cluster != nil && len(v) > 7 {
		s.indexOutbox(ctx, r.Subject, r.Quota)
	}
	if len(v) < 7 {
		return store.Reserved{}, 0, fmt.Errorf("redisstore: reserve script returned %d values, want at least 7", len(v))
	}
	f := reserveFlags(v[0])
	out := store.Reserved{
		Allowed:       f&flagAllowed != 0,
		Throttled:     f&flagThrottled != 0,
		QuotaExceeded: f&flagQuotaExceeded != 0,
		Used:          v[4],
		Overage:       v[5],
		Duplicate:     f&flagDuplicate != 0,
	}
	if f&flagRateApplied != 0 {
		out.Rate = limiter.Decision{
			Allowed:          f&flagRateAllowed != 0,
			Remaining:        v[1],
			RetryAfter:       time.Duration(v[2]) * time.Microsecond,
			ResetAfter:       time.Duration(v[3]) * time.Microsecond,
			CostExceedsBurst: f&flagCostExceedsBurst != 0,
		}
	}
	for _, t := range v[7:] {
		out.Crossed = append(out.Crossed, int(t))
	}
	return out, v[6], nil
}

// reservedMeters decodes the reserve script's reply v to r, a reservation
// with meters (see mreply in reserveScript), and returns it with the
// Redis time of the decision (µs).
func (s *Store) reservedMeters(ctx context.Context, r store.Reservation, v []int64) (store.Reserved, int64, error) {
	bad := fmt.Errorf("redisstore: reserve script returned %d values, malformed for %d meters", len(v), len(r.Meters))
	if len(v) < 9 {
		return store.Reserved{}, 0, bad
	}
	f := reserveFlags(v[0])
	if s.cluster != nil && f&flagCrossed != 0 {
		s.indexOutbox(ctx, r.Subject, r.Quota)
	}
	out := store.Reserved{
		Allowed:       f&flagAllowed != 0,
		Throttled:     f&flagThrottled != 0,
		QuotaExceeded: f&flagQuotaExceeded != 0,
		Used:          v[4],
		Overage:       v[5],
		Duplicate:     f&flagDuplicate != 0,
		Meters:        make([]store.MeterReserved, len(r.Meters)),
	}
	if f&flagRateApplied != 0 {
		out.Rate = limiter.Decision{
			Allowed:          f&flagRateAllowed != 0,
			Remaining:        v[1],
			RetryAfter:       time.Duration(v[2]) * time.Microsecond,
			ResetAfter:       time.Duration(v[3]) * time.Microsecond,
			CostExceedsBurst: f&flagCostExceedsBurst != 0,
		}
	}
	if q := v[7]; q > 0 && q <= int64(len(r.Meters)) {
		out.QuotaExceededMeter = r.Meters[q-1].Meter
	}
	// crossed reads a count and that many thresholds at v[i:].
	crossed := func(i int) ([]int, int, bool) {
		if i >= len(v) || v[i] < 0 || v[i] > int64(len(v)-i-1) {
			return nil, 0, false
		}
		n := int(v[i])
		var ts []int
		for _, t := range v[i+1 : i+1+n] {
			ts = append(ts, int(t))
		}
		return ts, i + 1 + n, true
	}
	var ok bool
	i := 8
	if out.Crossed, i, ok = crossed(i); !ok {
		return store.Reserved{}, 0, bad
	}
	for k := range out.Meters {
		if i+3 >= len(v) {
			return store.Reserved{}, 0, bad
		}
		m := &out.Meters[k]
		m.Used, m.Overage, m.Throttled = v[i], v[i+1], v[i+2] == 1
		if m.Crossed, i, ok = crossed(i + 3); !ok {
			return store.Reserved{}, 0, bad
		}
	}
	return out, v[6], nil
}

// reserveFlags is the first value of the reserve script's reply: one bit
// per yes/no answer, so the reply has seven integers instead of thirteen.
type reserveFlags int64

// The bits of reserveFlags, as the reserve script's reply function sets
// them.
const (
	flagAllowed reserveFlags = 1 << iota
	flagRateApplied
	flagRateAllowed
	flagCostExceedsBurst
	flagThrottled
	flagQuotaExceeded
	flagDuplicate
	// flagCrossed is set, in the reply to a reservation with meters, when
	// a threshold was crossed.
	flagCrossed
)

// Settle implements store.Meter with one EVALSHA round trip. Actual below
// Reserved takes the released units off the reservation's overage first;
// Actual above it counts the added units after the period's current usage
// (their overage is metering.Overage(used now, added, Included)) and may
// cross thresholds. A replayed settlement is applied only when its Seq is
// in the replay window and marked reserved (not settled); a settlement
// marks its Seq settled. A non-Replay settlement is always applied. A void
// (store.Settlement.Void) is applied like a replayed settlement to 0, and,
// when its Seq is in the window and was never reserved, marks it settled
// so that the reservation, should it run later, counts nothing.
func (s *Store) Settle(ctx context.Context, st store.Settlement) error {
	if st.Reserved < 0 || st.Reserved >= maxExact || st.Actual < 0 || st.Actual >= maxExact ||
		st.Overage < 0 || st.Overage > st.Reserved {
		return fmt.Errorf("redisstore: settlement amounts out of range (reserved %d, overage %d, actual %d)", st.Reserved, st.Overage, st.Actual)
	}
	var ms []meterArg
	if len(st.Meters) > 0 {
		if err := store.CheckMeterSettlements(st.Meters); err != nil {
			return fmt.Errorf("redisstore: %w", err)
		}
		ms = make([]meterArg, len(st.Meters))
		for i, m := range st.Meters {
			if m.Reserved >= maxExact || m.Actual >= maxExact || m.Quota.Included >= maxExact {
				return fmt.Errorf("redisstore: meter %q settlement amounts out of range", m.Meter)
			}
			ms[i] = meterArg{name: m.Meter, thresholds: m.Quota.Thresholds,
				nums: [6]int64{m.Reserved, m.Overage, m.Actual, m.Quota.Included, modeCode(m.Quota.Mode), levelOf(m.Quota.Mode, m.Quota.Included, m.Quota.Thresholds)}}
		}
	}
	void := int64(0)
	if st.Void {
		if !st.Replay || st.Actual != 0 || st.Overage != 0 || st.Origin == "" || st.Seq < 1 {
			return errors.New("redisstore: a void is a Replay with an Origin and Seq, Actual 0 and Overage 0")
		}
		for _, m := range st.Meters {
			if m.Actual != 0 || m.Overage != 0 {
				return fmt.Errorf("redisstore: a void settles meter %q to 0 with Overage 0", m.Meter)
			}
		}
		void = 1
	}
	c, err := s.newMeterCall(st.Subject, st.Quota, st.IdempotencyKey, st.IdempotencyFingerprint, st.Origin, st.Seq, st.Replay, []int64{st.Reserved, st.Overage, st.Actual, void}, ms)
	if err != nil {
		return err
	}
	v, err := s.run(ctx, st.Subject, settleScript, c)
	if err == nil && len(v) == 1 && v[0] >= 1 { // applied
		s.indexMetered(st.Subject, st.Quota.HourID)
	}
	if err == nil && s.cluster != nil && len(v) == 1 && v[0] == 2 {
		s.indexOutbox(ctx, st.Subject, st.Quota)
	}
	return err
}

// Usage implements store.Meter in one round trip: the period hash holds
// the period's counters and its hours. Hours whose counters all went back
// to zero (released reservations) are left out.
func (s *Store) Usage(ctx context.Context, subject, periodID string) (store.PeriodUsage, error) {
	u := store.PeriodUsage{PeriodID: periodID}
	err := s.call(ctx, func(ctx context.Context) error {
		fields, err := s.client.HGetAll(ctx, s.periodKey(subject, periodID)).Result()
		if err != nil {
			return err
		}
		// meters holds the other meters, by name.
		var meters map[string]*store.MeterUsage
		meter := func(name string) *store.MeterUsage {
			if meters == nil {
				meters = map[string]*store.MeterUsage{}
			}
			m := meters[name]
			if m == nil {
				m = &store.MeterUsage{Meter: name}
				meters[name] = m
			}
			return m
		}
		for f, v := range fields {
			switch {
			case strings.HasPrefix(f, "h:"):
				c, err := hourCounters(v)
				if err != nil {
					return err
				}
				if c == (store.Counters{}) {
					continue
				}
				if hour, name, ok := strings.Cut(f[2:], ":"); ok {
					m := meter(name)
					m.Hours = append(m.Hours, store.HourUsage{HourID: hour, Counters: c})
				} else {
					u.Hours = append(u.Hours, store.HourUsage{HourID: f[2:], Counters: c})
				}
			case f == "crossed":
				u.Thresholds = parseCrossed(v)
			case strings.HasPrefix(f, "crossed:"):
				meter(f[len("crossed:"):]).Thresholds = parseCrossed(v)
			case strings.HasPrefix(f, "c:"):
				c, err := hourCounters(v)
				if err != nil {
					return err
				}
				meter(f[2:]).Counters = c
			}
		}
		slices.Sort(u.Thresholds)
		slices.SortFunc(u.Hours, func(a, b store.HourUsage) int { return strings.Compare(a.HourID, b.HourID) })
		for _, name := range slices.Sorted(maps.Keys(meters)) {
			m := meters[name]
			slices.SortFunc(m.Hours, func(a, b store.HourUsage) int { return strings.Compare(a.HourID, b.HourID) })
			if m.Counters != (store.Counters{}) || len(m.Thresholds) > 0 || len(m.Hours) > 0 {
				u.Meters = append(u.Meters, *m)
			}
		}
		u.Counters, err = counters(fields)
		return err
	})
	if err != nil {
		return store.PeriodUsage{}, err
	}
	return u, nil
}

// parseCrossed reads a crossed field (",80,100,"), ascending.
func parseCrossed(v string) []int {
	var out []int
	for _, t := range strings.Split(strings.Trim(v, ","), ",") {
		if n, err := strconv.Atoi(t); err == nil {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// counters reads the counters of a period hash: the first three numbers
// of its c field (none: no usage yet).
func counters(fields map[string]string) (store.Counters, error) {
	v, ok := fields["c"]
	if !ok {
		return store.Counters{}, nil
	}
	n, ok := packedInts(v, 5)
	if !ok {
		return store.Counters{}, permanent{fmt.Errorf("redisstore: corrupt period counters %q", v)}
	}
	return store.Counters{Billed: n[0], Overage: n[1], Requests: n[2]}, nil
}

// hourCounters reads an hour field of a period hash: billed, overage,
// requests.
func hourCounters(v string) (store.Counters, error) {
	n, ok := packedInts(v, 3)
	if !ok {
		return store.Counters{}, permanent{fmt.Errorf("redisstore: corrupt hour counters %q", v)}
	}
	return store.Counters{Billed: n[0], Overage: n[1], Requests: n[2]}, nil
}

// packedInts decodes a field the scripts wrote with struct.pack: count
// little-endian int64s, and nothing else.
func packedInts(v string, count int) ([]int64, bool) {
	if len(v) != 8*count {
		return nil, false
	}
	n := make([]int64, count)
	for i := range n {
		n[i] = int64(binary.LittleEndian.Uint64([]byte(v[8*i : 8*i+8])))
	}
	return n, true
}

// ThresholdEvents implements store.Meter: the subject's outbox, or every
// subject's (listed in the outbox subjects set) merged by time, oldest
// first; events of one instant keep their outbox order.
func (s *Store) ThresholdEvents(ctx context.Context, subject string) ([]store.ThresholdEvent, error) {
	var events []store.ThresholdEvent
	if subject == "" && s.cluster != nil {
		s.maybeReconcileOutboxes(ctx)
	}
	err := s.call(ctx, func(ctx context.Context) error {
		subjects := []string{subject}
		if subject == "" && s.cluster != nil {
			var err error
			if subjects, err = s.outboxSubjects(ctx); err != nil {
				return err
			}
		} else if subject == "" {
			var err error
			subjects, err = s.client.ZRangeByScore(ctx, s.outboxSubjectsKey(), &redis.ZRangeBy{
				Min: strconv.FormatInt(time.Now().Unix(), 10), Max: "+inf",
			}).Result()
			if err != nil {
				return err
			}
			slices.Sort(subjects)
		}
		cmds := make([]*redis.StringSliceCmd, len(subjects))
		if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for i, sub := range subjects {
				cmds[i] = p.LRange(ctx, s.outboxKey(sub), 0, -1)
			}
			return nil
		}); err != nil {
			return err
		}
		for i, cmd := range cmds {
			for _, entry := range cmd.Val() {
				e, err := parseEvent(subjects[i], entry)
				if err != nil {
					return err
				}
				events = append(events, e)
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	slices.SortStableFunc(events, func(a, b store.ThresholdEvent) int { return a.At.Compare(b.At) })
	return events, nil
}

// parseEvent decodes an outbox entry of subject:
// "<period>|<threshold>|<used>|<included>|<at µs>|<expires s>", preceded
// by "@<meter>|" for a meter other than the default one.
func parseEvent(subject, entry string) (store.ThresholdEvent, error) {
	var meter string
	if rest, ok := strings.CutPrefix(entry, "@"); ok {
		var found bool
		if meter, entry, found = strings.Cut(rest, "|"); !found || meter == "" {
			return store.ThresholdEvent{}, permanent{fmt.Errorf("redisstore: corrupt outbox entry %q", "@"+rest)}
		}
	}
	f := strings.Split(entry, "|")
	if len(f) < 6 {
		return store.ThresholdEvent{}, permanent{fmt.Errorf("redisstore: corrupt outbox entry %q", entry)}
	}
	n := len(f)
	period := strings.Join(f[:n-5], "|")
	var nums [4]int64
	for i := range nums {
		v, err := strconv.ParseInt(f[n-5+i], 10, 64)
		if err != nil {
			return store.ThresholdEvent{}, permanent{fmt.Errorf("redisstore: corrupt outbox entry %q", entry)}
		}
		nums[i] = v
	}
	return store.ThresholdEvent{
		ID:        store.ThresholdEventID(subject, period, int(nums[0]), meter),
		Subject:   subject,
		PeriodID:  period,
		Threshold: int(nums[0]),
		Used:      nums[1],
		Included:  nums[2],
		At:        time.UnixMicro(nums[3]).UTC(),
		Meter:     meter,
	}, nil
}
