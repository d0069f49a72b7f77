-- Begin one execution of a task that must run at most once (see policies/once.py).
-- KEYS[1] entry  hash  state (running|done), owner, started_at (Redis TIME), result (JSON)
-- ARGV[1] owner (who runs it: host and pid)
-- ARGV[2] seconds the entry is kept
-- returns {'run'}                       : claimed; run the body
--         {'done', result}              : it ran already; this is its result
--         {'running', owner, age}       : a delivery began `age` seconds ago and has not finished
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('HSET', KEYS[1], 'state', 'running', 'owner', ARGV[1], 'started_at', tostring(now))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'run'}
end
if state == 'done' then
  return {'done', redis.call('HGET', KEYS[1], 'result') or 'null'}
end
local started = tonumber(redis.call('HGET', KEYS[1], 'started_at')) or now
return {'running', redis.call('HGET', KEYS[1], 'owner') or '', tostring(now - started)}
