-- Give a bulkhead permit back (idempotent) and announce it to waiters.
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds)
-- KEYS[2] since   hash  holder -> time the lease was taken
-- KEYS[3] meta    hash  avg_hold is updated here (moving average of hold time, weight 0.2)
-- ARGV[1] holder id
-- ARGV[2] pub/sub channel of this bulkhead
-- returns {released 1|0 (0: already released or expired), in_use}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local holder = ARGV[1]
local score = redis.call('ZSCORE', KEYS[1], holder)
local released = 0
if score and tonumber(score) > now then
  released = 1
  local since = tonumber(redis.call('HGET', KEYS[2], holder) or '')
  if since then
    local held = math.max(now - since, 0)
    local avg = tonumber(redis.call('HGET', KEYS[3], 'avg_hold') or '')
    if avg then avg = avg * 0.8 + held * 0.2 else avg = held end
    redis.call('HSET', KEYS[3], 'avg_hold', tostring(avg))
  end
end
if score then
  redis.call('ZREM', KEYS[1], holder)
  redis.call('HDEL', KEYS[2], holder)
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(expired))
end
if released == 1 or #expired > 0 then redis.call('PUBLISH', ARGV[2], 'released') end
return {released, redis.call('ZCARD', KEYS[1])}
