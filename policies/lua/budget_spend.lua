-- Spend one retry from a retry budget if retries stay within min + ratio * calls
-- over the sliding window; or only look ("peek").
-- KEYS[1] window  hash  "c:<bucket>" -> calls, "r:<bucket>" -> retries spent
-- ARGV[1] now (seconds) for tests, or "" to use the server's TIME
-- ARGV[2] bucket width, seconds
-- ARGV[3] buckets per window
-- ARGV[4] ratio of calls that may be retried
-- ARGV[5] retries always allowed per window
-- ARGV[6] "spend" | "peek"
-- returns {granted 0|1, calls, retries (after this spend), allowance, retry_after} (numbers as strings)
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local width = tonumber(ARGV[2])
local nbuckets = tonumber(ARGV[3])
local bucket = math.floor(now / width)
local low = bucket - nbuckets + 1
local calls, retries, oldest = 0, 0, nil
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local field, value = flat[i], tonumber(flat[i + 1])
  local b = tonumber(string.sub(field, 3))
  if b < low then
    redis.call('HDEL', KEYS[1], field)
  elseif string.sub(field, 1, 1) == 'c' then
    calls = calls + value
  else
    retries = retries + value
    if value > 0 and (oldest == nil or b < oldest) then oldest = b end
  end
end
local allowance = tonumber(ARGV[5]) + tonumber(ARGV[4]) * calls
local granted = 0
if retries + 1 <= allowance + 1e-9 then
  granted = 1
  if ARGV[6] == 'spend' then
    redis.call('HINCRBY', KEYS[1], 'r:' .. bucket, 1)
    redis.call('PEXPIRE', KEYS[1], math.ceil(width * (nbuckets + 1) * 1000))
    retries = retries + 1
  end
end
local retry_after = 0
if granted == 0 then
  if oldest == nil then oldest = bucket end
  retry_after = (oldest + nbuckets) * width - now
end
return {tostring(granted), tostring(calls), tostring(retries), tostring(allowance), tostring(retry_after)}
