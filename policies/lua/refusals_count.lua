-- Count one security refusal of kind ARGV[2] in the current bucket.
-- KEYS[1] counts  hash  "<bucket>:<kind>" -> refusals
-- ARGV[1] now (seconds) for tests, or "" to use the server's TIME
-- ARGV[2] kind
-- ARGV[3] bucket width, seconds
-- ARGV[4] buckets kept
-- returns the refusals of this kind in the current bucket
local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local width = tonumber(ARGV[3])
local kept = tonumber(ARGV[4])
local bucket = math.floor(now / width)
local n = redis.call('HINCRBY', KEYS[1], bucket .. ':' .. ARGV[2], 1)
if n == 1 then
  -- a new field: drop the buckets that are no longer kept (amortised over a bucket)
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    local b = tonumber(string.match(field, '^(%d+):'))
    if b == nil or b <= bucket - kept then
      redis.call('HDEL', KEYS[1], field)
    end
  end
  -- Set from the start of the bucket, the expiry outlives every bucket kept.
  redis.call('PEXPIRE', KEYS[1], math.ceil(width * (kept + 1) * 1000))
end
return n
