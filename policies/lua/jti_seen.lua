-- Note a signed message's unique id (jti) as delivered; say what was known of it before.
-- KEYS[1] the jti's key
-- ARGV[1] seconds to keep it (until the message expires, and a margin)
-- returns nil (first delivery), 'a' (delivered before, never acknowledged: a redelivery)
--         or 'd' (acknowledged before: a replay)
local old = redis.call('GET', KEYS[1])
if not old then
  redis.call('SET', KEYS[1], 'a', 'EX', ARGV[1])
end
return old
