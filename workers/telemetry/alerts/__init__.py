"""Alert evaluation and dispatch, on the `alerts` queue.

model (Alert, Condition, Silence) -> rules (callables over a fleet snapshot)
-> plan (dedup, group wait, repeat, resolved, silences) -> store (Redis
state) -> sinks (log, webhook, Slack, Alertmanager, email). The Celery tasks
live in `tasks.alerts`; `bulwark alerts ...` in `workers.ops.alerts`.
"""
