-- Count calls into the current time bucket of a retry budget's sliding window.
-- KEYS[1] window  hash  "c:<bucket>" -> calls, "r:<bucket>" -> retries spent
-- ARGV[1] now (seconds) for tests, or "" to use the server's TIME
-- ARGV[2] bucket width, seconds
-- ARGV[3] buckets per window
-- ARGV[4] calls to add
-- returns the calls in the current bucket
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
local n = redis.call('HINCRBY', KEYS[1], 'c:' .. bucket, tonumber(ARGV[4]))
if n == tonumber(ARGV[4]) then
  -- a new bucket: drop the ones that left the window (amortised over a bucket)
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if tonumber(string.sub(field, 3)) <= bucket - nbuckets then
      redis.call('HDEL', KEYS[1], field)
    end
  end
  -- Set from the start of the bucket, the expiry outlives every bucket still in the window.
  redis.call('PEXPIRE', KEYS[1], math.ceil(width * (nbuckets + 1) * 1000))
end
return n
