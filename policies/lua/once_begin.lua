-- Begin one execution of a task that must run at most once (see policies/once.py).
-- KEYS[1] entry  hash  state (running|done|failed), owner, started_at (Redis TIME),
--                      result (JSON), reason (why it failed)
-- ARGV[1] owner (who runs it: host and pid)
-- ARGV[2] seconds the entry is kept
-- returns {'run'}                       : claimed; run the body
--         {'done', result}              : it ran already; this is its result
--         {'running', owner, age}       : a delivery began `age` seconds ago and has not finished
--         {'failed', reason}            : it ran and failed for good (it was dead-lettered)
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
if state == 'failed' then
  return {'failed', redis.call('HGET', KEYS[1], 'reason') or ''}
end
local started = tonumber(redis.call('HGET', KEYS[1], 'started_at')) or now
return {'running', redis.call('HGET', KEYS[1], 'owner') or '', tostring(now - started)}
