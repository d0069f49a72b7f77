-- Read a bulkhead without changing it: its stored limit and its live leases.
-- KEYS[1] leases  zset  holder -> lease expiry (server time, seconds)
-- KEYS[2] meta    hash  limit (stored by the last acquire)
-- returns {limit or '', holder1, seconds_left1, holder2, seconds_left2, ...}
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {redis.call('HGET', KEYS[2], 'limit') or ''}
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
for i = 1, #rows, 2 do
  out[#out + 1] = rows[i]
  out[#out + 1] = tostring(tonumber(rows[i + 1]) - now)
end
return out
