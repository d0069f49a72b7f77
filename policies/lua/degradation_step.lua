-- One step of a service's degradation state machine, announced on its channel.
-- Levels are ranks: 0 full, 1 degraded, 2 minimal, 3 offline.
-- KEYS[1] state       hash  level, floor, reason, source, gen, changed_at, left_full_at,
--                            healthy_since, last_recovery
-- KEYS[2] recoveries  list  measured recovery durations (seconds), newest first
-- ARGV[1] op: "set" (operator, exact; also the floor auto-recovery stops at)
--             | "degrade" (auto: at least this level; ends any healthy stretch)
--             | "recover" (auto: one level up once healthy for ARGV[6] seconds)
--             | "snapshot"
-- ARGV[2] pub/sub channel
-- ARGV[3] now (seconds) for tests, or "" to use the server's TIME
-- ARGV[4] level rank (set, degrade)
-- ARGV[5] reason
-- ARGV[6] recovery step, seconds
-- ARGV[7] recoveries kept
-- returns {from, level, gen, changed, recovered, now, reason, source, floor, left_full_at,
--          changed_at, last_recovery, healthy_since, {recoveries...}} (numbers as strings)
local now
if ARGV[3] ~= '' then
  now = tonumber(ARGV[3])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local op = ARGV[1]
local s = redis.call('HMGET', KEYS[1], 'level', 'floor', 'reason', 'source', 'gen', 'changed_at',
  'left_full_at', 'healthy_since', 'last_recovery')
local cur = tonumber(s[1]) or 0
local floor = tonumber(s[2]) or 0
local reason = s[3] or ''
local source = s[4] or ''
local gen = tonumber(s[5]) or 0
local changed_at = s[6] or ''
local left_full_at = s[7] or ''
local healthy_since = s[8] or ''
local last_recovery = s[9] or ''
local new = cur
local recovered = ''

if op == 'set' then
  new = tonumber(ARGV[4])
  floor = new
  source = 'operator'
  reason = ARGV[5]
  healthy_since = ''
elseif op == 'degrade' then
  healthy_since = ''
  if tonumber(ARGV[4]) > cur then
    new = tonumber(ARGV[4])
    source = 'auto'
  end
elseif op == 'recover' then
  if cur > floor then
    if healthy_since == '' then healthy_since = tostring(now) end
    local start = tonumber(healthy_since)
    if changed_at ~= '' and tonumber(changed_at) > start then start = tonumber(changed_at) end
    if now - start >= tonumber(ARGV[6]) then
      new = cur - 1
      source = 'auto'
    end
  else
    healthy_since = ''
  end
end

if new ~= cur then
  gen = gen + 1
  changed_at = tostring(now)
  reason = ARGV[5]
  if cur == 0 then left_full_at = tostring(now) end
  if new == 0 and left_full_at ~= '' then
    recovered = tostring(now - tonumber(left_full_at))
    last_recovery = recovered
    redis.call('LPUSH', KEYS[2], recovered)
    redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[7]) - 1)
    left_full_at = ''
  end
end

if op ~= 'snapshot' then
  redis.call('HSET', KEYS[1], 'level', new, 'floor', floor, 'reason', reason, 'source', source,
    'gen', gen, 'changed_at', changed_at, 'left_full_at', left_full_at,
    'healthy_since', healthy_since, 'last_recovery', last_recovery)
end
if new ~= cur then
  redis.call('PUBLISH', ARGV[2], cjson.encode({gen = gen, level = new, from = cur, reason = reason}))
end
return {tostring(cur), tostring(new), tostring(gen), new ~= cur and '1' or '0', recovered,
  tostring(now), reason, source, tostring(floor), left_full_at, changed_at, last_recovery,
  healthy_since, redis.call('LRANGE', KEYS[2], 0, -1)}
