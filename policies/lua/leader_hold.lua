-- Take or keep the leadership of a role (one holder fleet-wide), with a fencing token.
-- KEYS[1] lock    hash  holder, token; expires unless its holder renews it
-- KEYS[2] tokens  string  the last token given (INCR): each new leader gets a larger one
-- ARGV[1] holder id    ARGV[2] lock ttl, milliseconds
-- returns the holder's token (it leads), or 0 (another holder leads)
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'token'))
end
if holder then return 0 end
local token = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'token', token)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return token
