-- Take one permit of a bulkhead if one is free.
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds); a lease whose expiry
--                       is not after now is dead: it counts for nothing and is purged lazily
-- KEYS[2] meta    hash  limit, ttl (for `bulwark status`), avg_hold (moving average, seconds)
-- ARGV[1] holder id (taking a lease the holder already has only renews it: safe to retry)
-- ARGV[2] limit
-- ARGV[3] lease ttl (seconds)
-- ARGV[4] "1" to also store limit and ttl, purge dead leases and push the expiry on: each
--         process asks for it on its first acquire and then every ttl / 2 (the hot path
--         stays at three commands)
-- returns {granted 1|0, in_use, retry_after seconds as a string (0 when granted),
--          the lease's start (server time, seconds, as a string; '' when refused)}
-- The leases expire 2 * (ttl + 1 s) after the last upkeep or renewal, so the dead lease of
-- a crashed holder does not outlive the bulkhead's use by much. Every live lease was taken
-- within ttl / 2 of its process's last upkeep, so no expiry can take a live lease with it.
-- (A key the last release emptied is gone; the next lease makes it again, without an
-- expiry until the next upkeep, which comes within ttl / 2 if the bulkhead is still used.)
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local L, holder, limit, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local upkeep = ARGV[4] == '1'
if upkeep then
  redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
  redis.call('HSET', KEYS[2], 'limit', ARGV[2], 'ttl', ARGV[3])
end
-- At upkeep the expiry is pushed on, granted or refused; never shortened (another
-- process may use a longer ttl).
local function push()
  if not upkeep then return end
  local keep = 2 * (math.ceil(ttl * 1000) + 1000)
  if redis.call('PTTL', L) < keep then redis.call('PEXPIRE', L, keep) end
end
local live = redis.call('ZCOUNT', L, '(' .. now, '+inf')
local function granted()
  -- A grant between upkeeps may create the key (the last release emptied it) with no
  -- expiry: safe, it only delays the cleanup of a dead lease to the next upkeep.
  push()
  return {1, live, '0', tostring(now)}
end
if live < limit then
  if redis.call('ZADD', L, 'NX', now + ttl, holder) == 1 then
    live = live + 1
    return granted()
  end
  -- The holder has a lease (a retried acquire): renew it; a dead one comes back to life.
  if tonumber(redis.call('ZSCORE', L, holder)) <= now then live = live + 1 end
  redis.call('ZADD', L, 'XX', now + ttl, holder)
  return granted()
end
local score = redis.call('ZSCORE', L, holder)
if score and tonumber(score) > now then
  redis.call('ZADD', L, 'XX', now + ttl, holder)
  return granted()
end
push()
-- Full. Dead leases go now. The earliest expiry bounds the wait if nobody renews; the
-- average hold time says when the oldest holder (its lease taken ttl before that expiry,
-- unless it renewed) is likely to finish, if that is sooner.
redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
local first = redis.call('ZRANGE', L, 0, 0, 'WITHSCORES')
local wait = tonumber(first[2]) - now
local avg = tonumber(redis.call('HGET', KEYS[2], 'avg_hold') or '')
if avg then wait = math.min(wait, math.max(tonumber(first[2]) - ttl + avg - now, 0)) end
return {0, live, tostring(wait), ''}
