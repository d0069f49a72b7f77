-- Give a bulkhead permit back (idempotent) and announce it to waiters.
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds)
-- KEYS[2] meta    hash  avg_hold is updated here (moving average of hold time, weight 0.2)
-- ARGV[1] holder id
-- ARGV[2] pub/sub channel of this bulkhead
-- ARGV[3] limit: a release from a full bulkhead is announced (only then can anyone wait)
--         and always feeds the average hold time (only then is the estimate read)
-- ARGV[4] the lease's start (server time, from the acquire; '' if not known)
-- ARGV[5] "1" to feed the average hold time anyway (the client samples releases)
-- returns {released 1|0 (0: already released or expired), in_use}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local L, holder = KEYS[1], ARGV[1]
local score = redis.call('ZSCORE', L, holder)
local released = 0
if score then
  released = tonumber(score) > now and 1 or 0
  redis.call('ZREM', L, holder)
end
local in_use = redis.call('ZCOUNT', L, '(' .. now, '+inf')
if released == 1 then
  local was_full = in_use + 1 >= tonumber(ARGV[3])
  local since = tonumber(ARGV[4])
  if since and (was_full or ARGV[5] == '1') then
    local held = math.max(now - since, 0)
    local avg = tonumber(redis.call('HGET', KEYS[2], 'avg_hold') or '')
    if avg then avg = avg * 0.8 + held * 0.2 else avg = held end
    redis.call('HSET', KEYS[2], 'avg_hold', tostring(avg))
  end
  if was_full then redis.call('PUBLISH', ARGV[2], 'released') end
end
return {released, in_use}
