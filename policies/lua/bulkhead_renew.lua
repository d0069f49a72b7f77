-- Extend a live bulkhead lease; a lease found expired is lost (and removed).
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds)
-- ARGV[1] holder id
-- ARGV[2] lease ttl (seconds)
-- returns {renewed 1|0 (0: the lease was lost), in_use (live leases)}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local holder, ttl = ARGV[1], tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], holder)
if score and tonumber(score) > now then
  redis.call('ZADD', KEYS[1], 'XX', now + ttl, holder)
  -- As in bulkhead_acquire.lua: the leases live 2 * (ttl + 1 s) past the last push
  -- (extended, never shortened).
  local keep = 2 * (math.ceil(ttl * 1000) + 1000)
  if redis.call('PTTL', KEYS[1]) < keep then redis.call('PEXPIRE', KEYS[1], keep) end
  return {1, redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')}
end
if score then redis.call('ZREM', KEYS[1], holder) end
return {0, redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')}
