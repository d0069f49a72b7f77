-- Claim one run of a scheduled job for one time slot, fleet-wide, as the current leader.
-- KEYS[1] lock  hash  holder, token (see leader_hold.lua)
-- KEYS[2] slot  string  set once per (job, slot) by the leader that runs it
-- KEYS[3] last  string  when the job was last sent by any leader (unix seconds)
-- ARGV[1] the claimer's fencing token   ARGV[2] seconds the claim is kept   ARGV[3] now
-- returns 1: claimed, run it; 0: this slot ran already; -1: not the leader any more
if tonumber(redis.call('HGET', KEYS[1], 'token') or '-1') ~= tonumber(ARGV[1]) then return -1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[2])
  return 1
end
return 0
