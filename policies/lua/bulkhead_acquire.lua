-- Take one permit of a bulkhead if one is free, purging expired leases first.
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds)
-- KEYS[2] since   hash  holder -> time the lease was taken
-- KEYS[3] meta    hash  limit, ttl (for `bulwark status`), avg_hold (moving average, seconds)
-- ARGV[1] holder id (taking a lease the holder already has only renews it: safe to retry)
-- ARGV[2] limit
-- ARGV[3] lease ttl (seconds)
-- returns {granted 1|0, in_use, retry_after seconds as a string (0 when granted)}
-- Both keys expire 2 * (ttl + 1 s) after a grant or renewal (refreshed once past half that),
-- so a bulkhead nobody uses any more leaves nothing behind.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local holder, limit, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(expired))
end
local meta = redis.call('HMGET', KEYS[3], 'limit', 'ttl')
if meta[1] ~= ARGV[2] or meta[2] ~= ARGV[3] then
  redis.call('HSET', KEYS[3], 'limit', ARGV[2], 'ttl', ARGV[3])
end
-- leases and since always hold the same holders, so one PTTL stands for both.
local function keep_keys()
  local keep = math.ceil(ttl * 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < keep then
    for i = 1, 2 do redis.call('PEXPIRE', KEYS[i], 2 * keep) end
  end
end
local in_use = redis.call('ZCARD', KEYS[1])
if in_use < limit then
  if redis.call('ZADD', KEYS[1], now + ttl, holder) == 1 then
    redis.call('HSET', KEYS[2], holder, tostring(now))
    in_use = in_use + 1
  end
  keep_keys()
  return {1, in_use, '0'}
end
if redis.call('ZSCORE', KEYS[1], holder) then
  redis.call('ZADD', KEYS[1], now + ttl, holder)
  keep_keys()
  return {1, in_use, '0'}
end
-- Full. The earliest expiry bounds the wait if nobody renews; the average hold
-- time says when the oldest holder is likely to finish, if that is sooner.
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = tonumber(first[2]) - now
local avg = tonumber(redis.call('HGET', KEYS[3], 'avg_hold') or '')
if avg then
  local oldest = nil
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
    local s = tonumber(v)
    if oldest == nil or s < oldest then oldest = s end
  end
  if oldest then wait = math.min(wait, math.max(oldest + avg - now, 0)) end
end
return {0, in_use, tostring(wait)}
