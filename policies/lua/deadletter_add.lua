-- Add one dead-letter entry, stamped with the server's clock, and trim the oldest.
-- KEYS[1] entries  hash   id -> JSON entry, stored as given (never re-encoded: cjson
--                         would turn [] into {})
-- KEYS[2] index    zset   id scored by dead-lettering time (the entry's `dead_at`)
-- KEYS[3] total    string count of every entry ever added (for growth alerts)
-- ARGV[1] id
-- ARGV[2] JSON entry
-- ARGV[3] maximum entries kept
-- returns the server time (seconds, as a string) stamped on the entry
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('INCR', KEYS[3])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
end
return tostring(now)
