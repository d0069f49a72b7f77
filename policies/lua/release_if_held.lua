-- Delete a plain lock key if (and only if) it still holds this holder's token.
-- KEYS[1] lock (a string)    ARGV[1] token
-- returns 1 if it was deleted, 0 otherwise (it expired, or another holder has it now)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
