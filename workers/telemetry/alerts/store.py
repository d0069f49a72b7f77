"""Alert state in Redis: active alerts, silences, the dead-letter watermark.

Keys (one hash tag, so a transaction or script may touch them all):
    bulwark:{alerts:<name>}:active       hash fingerprint -> Alert JSON
    bulwark:{alerts:<name>}:silences     hash id -> Silence JSON
    bulwark:{alerts:<name>}:deadletters  hash total, grew_at, grew_by

An evaluation reads the active alerts and silences under WATCH, plans in
Python (`plan.plan`) and writes back in MULTI; if another evaluator changed
them meanwhile it starts over, so two evaluators never both send one alert.
Time is Redis `TIME`, never the worker's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from policies import keys
from workers.telemetry.alerts.model import Alert, Condition, Silence
from workers.telemetry.alerts.plan import AlertConfig, Plan, plan

# KEYS[1] deadletters watermark hash
# ARGV[1] the dead-letter store's total now
# Returns {grew_at or false, grew_by}: when the total last grew (Redis time) and by how much.
# The first call only records the total: dead letters from before alerting do not alert.
T = TypeVar("T")

DEADLETTER_WATERMARK = """
local total = tonumber(ARGV[1])
local prev = tonumber(redis.call('HGET', KEYS[1], 'total'))
if prev ~= nil and total > prev then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    redis.call('HSET', KEYS[1], 'grew_at', tostring(now), 'grew_by', tostring(total - prev))
end
redis.call('HSET', KEYS[1], 'total', tostring(total))
local grew = redis.call('HMGET', KEYS[1], 'grew_at', 'grew_by')
return {grew[1], grew[2]}
"""


@dataclass(frozen=True, slots=True)
class Growth:
    """When the dead-letter total last grew, and by how much."""

    at: float | None
    by: int


class AlertStore:
    """Active alerts and silences of one fleet, in Redis."""

    def __init__(self, client: redis.Redis, name: str = "fleet") -> None:
        self._client = client
        self.active_key = keys.key("alerts", name, "active")
        self.silences_key = keys.key("alerts", name, "silences")
        self.deadletters_key = keys.key("alerts", name, "deadletters")
        self._watermark = client.register_script(DEADLETTER_WATERMARK)

    def now(self) -> float:
        seconds, micros = self._client.time()
        return float(seconds) + micros / 1_000_000

    def reconcile(self, conditions: Iterable[Condition], config: AlertConfig) -> Plan:
        """Apply this evaluation's conditions; return what to send (already marked sent)."""
        found = list(conditions)
        with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.active_key, self.silences_key)  # type: ignore[no-untyped-call]
                    now = self._now(pipe)
                    stored = _decode(pipe.hgetall(self.active_key), Alert.from_json)
                    silences = _decode(pipe.hgetall(self.silences_key), Silence.from_json)
                    result = plan(stored, found, silences.values(), now, config)
                    pipe.multi()
                    if result.alerts:
                        pipe.hset(
                            self.active_key,
                            mapping={fp: a.to_json() for fp, a in result.alerts.items()},
                        )
                    if result.removed:
                        pipe.hdel(self.active_key, *result.removed)
                    expired = [s.id for s in silences.values() if s.ends_at <= now]
                    if expired:
                        pipe.hdel(self.silences_key, *expired)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    continue

    def alerts(self) -> list[Alert]:
        """Every firing alert, oldest first."""
        found = _decode(self._client.hgetall(self.active_key), Alert.from_json)
        return sorted(found.values(), key=lambda a: (a.starts_at, a.id))

    def silenced(self, alert: Alert, now: float | None = None) -> bool:
        at = self.now() if now is None else now
        return any(s.active(at) and s.matches(alert) for s in self.silences())

    def add_silence(
        self, matchers: Mapping[str, str], duration: float, *, comment: str = "", by: str = ""
    ) -> Silence:
        now = self.now()
        silence = Silence(
            matchers=dict(matchers),
            starts_at=now,
            ends_at=now + duration,
            comment=comment,
            created_by=by,
        )
        self._client.hset(self.silences_key, silence.id, silence.to_json())
        return silence

    def silences(self) -> list[Silence]:
        """Silences not yet expired, soonest to end first."""
        now = self.now()
        found = _decode(self._client.hgetall(self.silences_key), Silence.from_json)
        return sorted((s for s in found.values() if s.ends_at > now), key=lambda s: s.ends_at)

    def remove_silence(self, silence_id: str) -> bool:
        return bool(self._client.hdel(self.silences_key, silence_id))

    def observe_deadletters(self, total: int) -> Growth:
        """Record the dead-letter total; return when it last grew (one script)."""
        grew_at, grew_by = self._watermark(keys=[self.deadletters_key], args=[total])
        if grew_at is None:
            return Growth(None, 0)
        return Growth(float(grew_at), int(grew_by))

    @staticmethod
    def _now(pipe: redis.client.Pipeline) -> float:
        seconds, micros = pipe.execute_command("TIME")  # by name: see workers.fleet
        return float(seconds) + micros / 1_000_000


def _decode(raw: Mapping[Any, Any], parse: Callable[[bytes], T]) -> dict[str, T]:
    """A hash from HGETALL (bytes keys and values) parsed value by value."""
    return {k.decode(): parse(v) for k, v in raw.items()}
