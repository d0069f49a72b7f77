-- Give the leadership up if (and only if) this holder still has it.
-- KEYS[1] lock  hash  holder, token    ARGV[1] holder id
-- returns 1 if it was given up, 0 otherwise
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
