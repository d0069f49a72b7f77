-- Every change of one circuit breaker, in one script call (policies/breaker_store.py).
-- KEYS[1] state   hash  mode, state, gen, consecutive, opened_until, open_count, trips,
--                       successes, last_failure (time of the last failure booked while closed),
--                       window, k (the last two: config of the last writer, for snapshots)
-- KEYS[2] window  hash  c:<bucket> calls, f:<bucket> failures; bucket = floor(now / (window / 10))
-- KEYS[3] trials  zset  half-open trial permit id, scored by its lease expiry (server time)
-- ARGV[1]  op: acquire | record | release | force_open | reset | disable | metrics_only | snapshot
-- ARGV[2]  pub/sub channel; "<gen> <state>" is PUBLISHed on it whenever the state changes
-- ARGV[3]  time override in seconds, for tests only; "" in production (time from TIME)
-- ARGV[4]  trip after this many consecutive failures (0 = rule off)
-- ARGV[5]  trip at this failure rate in the window (0 = rule off)
-- ARGV[6]  window seconds           ARGV[7]  minimum calls in the window for the rate rule
-- ARGV[8]  open timeout seconds     ARGV[9]  timeout multiplier per repeated trip
-- ARGV[10] maximum open timeout     ARGV[11] K: half-open trial slots (all must succeed)
-- ARGV[12] trial lease seconds
-- ARGV[13] permit id (acquire: lease id if it becomes a trial; record, release: the permit's id)
-- ARGV[14] record: the permit's gen  ARGV[15] record: "1" if a trial permit
-- ARGV[16] record: "1" if the call counts as a failure
-- Config ARGV may be "" for snapshot (then the stored window and k are used).
-- returns acquire/record/operator ops:
--   {admitted, mode, state, gen, retry_after, trial, would_reject, from, to, reason}
-- returns snapshot:
--   {mode, state, gen, consecutive, opened_until, trips, successes, in_flight, calls, failures,
--    now, open_count}
local S, W, T = KEYS[1], KEYS[2], KEYS[3]
local op, chan = ARGV[1], ARGV[2]
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end

-- The hot path: the success of an ordinary (not a trial) call while closed, with no
-- failure in the window (or no failure-rate rule). Such a success trips no rule (with
-- a failure in the window, reaching min_calls could trip the rate rule), so it only
-- counts the call and ends a failure streak: three commands, not the full step below,
-- which it agrees with (see the model tests).
if op == 'record' and ARGV[15] ~= '1' and ARGV[16] ~= '1' then
  local m = redis.call('HMGET', S, 'mode', 'state', 'gen', 'consecutive', 'last_failure')
  local mode, window = m[1] or 'normal', tonumber(ARGV[6])
  local quiet = tonumber(ARGV[5]) == 0 or not m[5] or now - tonumber(m[5]) > window
  if quiet and (m[2] or 'closed') == 'closed' and mode ~= 'disabled' then
    local b = math.floor(now / (window / 10))
    if redis.call('HINCRBY', W, 'c:' .. b, 1) == 1 then
      -- A new bucket (once per window / 10): push the expiry on, drop buckets that left
      -- the window, and keep the config snapshots show.
      redis.call('PEXPIRE', W, math.ceil(window * 2000))
      for _, f in ipairs(redis.call('HKEYS', W)) do
        if tonumber(string.sub(f, 3)) <= b - 10 then redis.call('HDEL', W, f) end
      end
      redis.call('HSET', S, 'window', string.format('%.17g', window), 'k', ARGV[11])
    end
    if m[4] and m[4] ~= '0' then redis.call('HSET', S, 'consecutive', 0) end
    return {0, mode, 'closed', tonumber(m[3] or '0'), '0', 0, 0, '', '', ''}
  end
end

local h = {}
local raw = redis.call('HGETALL', S)
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local function n(field) return tonumber(h[field] or '0') end
local function num(v) return string.format('%.17g', v) end
local function arg(i, default) if ARGV[i] == '' or ARGV[i] == nil then return default end return tonumber(ARGV[i]) end

local threshold, rate = arg(4, 0), arg(5, 0)
local window, min_calls = arg(6, tonumber(h.window or '60')), arg(7, 0)
local open_timeout, multiplier, max_timeout = arg(8, 30), arg(9, 1), arg(10, 30)
local k, ttl = arg(11, tonumber(h.k or '3')), arg(12, 30)

local mode, state, gen = h.mode or 'normal', h.state or 'closed', n('gen')
local from_s, to_s, reason = '', '', ''

local function set(field, v) h[field] = tostring(v); redis.call('HSET', S, field, h[field]) end
-- What operators see: the mode when it overrides the circuit, else the circuit's state.
local function shown(m, s) if m == 'normal' then return s end return m end

-- Record a change: bump gen, announce it, remember it for the reply.
local function move(new_mode, new_state, why)
  if new_mode ~= mode then
    from_s, to_s, reason = shown(mode, state), shown(new_mode, new_state), why
  else
    from_s, to_s, reason = state, new_state, why
    if mode ~= 'normal' then reason = mode .. ', not enforced: ' .. why end
  end
  mode, state, gen = new_mode, new_state, gen + 1
  redis.call('HSET', S, 'mode', mode, 'state', state, 'gen', gen)
  redis.call('PUBLISH', chan, gen .. ' ' .. shown(mode, state))
end

local function trip(why)
  local count = n('open_count') + 1
  local timeout = math.min(max_timeout, open_timeout * multiplier ^ (count - 1))
  set('open_count', count)
  set('trips', n('trips') + 1)
  set('opened_until', num(now + timeout))
  set('successes', 0)
  redis.call('DEL', T)
  move(mode, 'open', why)
end

local function clear()
  redis.call('HSET', S, 'open_count', 0, 'consecutive', 0, 'successes', 0, 'opened_until', 0)
  h.open_count, h.consecutive, h.successes, h.opened_until = '0', '0', '0', '0'
  redis.call('DEL', T, W)
end

-- Sum the window's buckets (current and the 9 before it), dropping older ones.
local function window_stats(prune)
  local b = math.floor(now / (window / 10))
  local calls, failures = 0, 0
  local all = redis.call('HGETALL', W)
  for i = 1, #all, 2 do
    local f = all[i]
    if tonumber(string.sub(f, 3)) <= b - 10 then
      if prune then redis.call('HDEL', W, f) end
    elseif string.sub(f, 1, 1) == 'c' then
      calls = calls + tonumber(all[i + 1])
    else
      failures = failures + tonumber(all[i + 1])
    end
  end
  return calls, failures
end

local function reply(admitted, retry_after, trial, would_reject)
  return {admitted, mode, state, gen, num(retry_after), trial, would_reject, from_s, to_s, reason}
end

if op == 'snapshot' then
  local calls, failures = window_stats(false)
  local in_flight = redis.call('ZCOUNT', T, '(' .. num(now), '+inf')
  return {mode, state, gen, n('consecutive'), h.opened_until or '0', n('trips'), n('successes'),
          in_flight, calls, failures, num(now), n('open_count')}
end

if op == 'acquire' then
  if mode == 'disabled' then return reply(1, 0, 0, 0) end
  if mode == 'forced_open' then return reply(0, open_timeout, 0, 0) end
  local enforce = mode ~= 'metrics_only'
  if state == 'open' then
    local opened_until = n('opened_until')
    if now < opened_until then
      if enforce then return reply(0, opened_until - now, 0, 0) end
      return reply(1, opened_until - now, 0, 1)
    end
    set('successes', 0)
    redis.call('DEL', T)
    move(mode, 'half_open', 'open timeout elapsed')
  end
  if state == 'half_open' then
    redis.call('ZREMRANGEBYSCORE', T, '-inf', num(now))
    if n('successes') + redis.call('ZCARD', T) < k then
      redis.call('ZADD', T, num(now + ttl), ARGV[13])
      redis.call('PEXPIRE', T, math.ceil(ttl * 1000) + 1000)
      return reply(1, 0, 1, 0)
    end
    local first = redis.call('ZRANGE', T, 0, 0, 'WITHSCORES')
    local wait = ttl
    if first[2] then wait = tonumber(first[2]) - now end
    if enforce then return reply(0, wait, 0, 0) end
    return reply(1, wait, 0, 1)
  end
  return reply(1, 0, 0, 0)
end

if op == 'release' then
  -- A trial call that never ran gives its slot back without an outcome.
  redis.call('ZREM', T, ARGV[13])
  return reply(0, 0, 0, 0)
end

if op == 'record' then
  if mode == 'disabled' then return reply(0, 0, 0, 0) end
  local failed = ARGV[16] == '1'
  if ARGV[15] == '1' then
    local held = redis.call('ZREM', T, ARGV[13]) == 1
    if held and state == 'half_open' and tonumber(ARGV[14]) == gen then
      if failed then
        trip('a trial call failed')
      else
        set('successes', n('successes') + 1)
        if n('successes') >= k then
          clear()
          move(mode, 'closed', k .. ' trial calls succeeded')
        end
      end
    end
  elseif state == 'closed' then
    local b = math.floor(now / (window / 10))
    local calls, failures = 0, 0
    if redis.call('HINCRBY', W, 'c:' .. b, 1) == 1 then
      -- A new bucket (once per window / 10): prune old buckets and push the expiry on; set
      -- at the bucket's start, it outlives every bucket still in the window.
      redis.call('PEXPIRE', W, math.ceil(window * 2000))
      calls, failures = window_stats(true)
    elseif rate > 0 then
      calls, failures = window_stats(false)
    end
    if failed then
      redis.call('HINCRBY', W, 'f:' .. b, 1)
      failures = failures + 1
      set('last_failure', num(now))  -- successes take the hot path again a window later
      set('consecutive', n('consecutive') + 1)
    elseif n('consecutive') ~= 0 then
      set('consecutive', 0)
    end
    if h.window ~= num(window) or h.k ~= tostring(k) then
      redis.call('HSET', S, 'window', num(window), 'k', k)
    end
    if threshold > 0 and n('consecutive') >= threshold then
      trip(n('consecutive') .. ' consecutive failures')
    elseif rate > 0 and calls >= min_calls and failures >= rate * calls then
      trip('failure rate ' .. failures .. '/' .. calls .. ' in ' .. num(window) .. ' s')
    end
  end
  local retry_after = 0
  if state == 'open' then retry_after = n('opened_until') - now end
  return reply(0, retry_after, 0, 0)
end

-- Operator commands.
if op == 'reset' then
  clear()
  move('normal', 'closed', 'operator reset')
elseif op == 'force_open' then
  if mode ~= 'forced_open' then move('forced_open', state, 'operator forced open') end
elseif op == 'disable' then
  if mode ~= 'disabled' then move('disabled', state, 'operator disabled the breaker') end
elseif op == 'metrics_only' then
  if mode ~= 'metrics_only' then move('metrics_only', state, 'operator set metrics_only') end
else
  return redis.error_reply('unknown breaker op ' .. op)
end
return reply(0, 0, 0, 0)
