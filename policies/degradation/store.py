"""Where degradation levels live: the level enum, one step's answer, memory and Redis stores.

One store call is one step of a service's state machine (one Lua script call
for Redis, `degradation_step.lua`):

- `set`: an operator sets the level exactly; it is also the floor above
  which automatic recovery never lifts the service.
- `degrade`: automatic; the level becomes at least the given one, and any
  healthy stretch ends.
- `recover`: automatic; one level up once the service has been healthy for
  `recovery_step` seconds since its last change (never two at once).
- `snapshot`: read everything.

Leaving `full` stamps the time; returning to `full` measures the outage and
keeps it (last and a short history). Every change is PUBLISHed on the
service's channel as JSON `{gen, level, from, reason}`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, Literal, Protocol

import redis

from policies import keys
from policies.clock import Clock, monotonic
from policies.index import NameIndex, Reader, raise_error
from policies.scripts import ScriptedRedisStore
from policies.watch import feed_for

POLICY = "degradation"
Op = Literal["set", "degrade", "recover", "snapshot"]
Callback = Callable[[bytes | None], None]


class Level(IntEnum):
    """Degradation levels, ordered from healthy (full) to down (offline)."""

    full = 0
    degraded = 1
    minimal = 2
    offline = 3

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, value: Level | str | int) -> Level:
        """A level from its name (any case) or rank; ValueError naming the choices."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value.lower() in cls.__members__:
            return cls[value.lower()]
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3:
            return cls(value)
        raise ValueError(
            f"unknown degradation level {value!r}: accepts {', '.join(cls.__members__)}"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceState:
    """A service's degradation state after one step (everything `bulwark status` shows)."""

    service: str
    level: Level
    #: The level before this step.
    from_level: Level
    #: Whether this step changed the level.
    changed: bool
    gen: int
    reason: str
    #: operator | auto | "" (never set)
    source: str
    #: The operator's level: automatic recovery stops there.
    floor: Level
    #: Store time (Redis TIME or the memory clock) at this step.
    now: float
    changed_at: float | None
    left_full_at: float | None
    healthy_since: float | None
    #: The outage this very step ended (seconds), if it returned the service to full.
    recovered: float | None
    last_recovery: float | None
    #: Measured recovery durations, newest first.
    recoveries: tuple[float, ...]
    #: redis | memory | local (Redis unreachable)
    source_store: str = "redis"

    @property
    def down_for(self) -> float | None:
        """Seconds since the service left full (None while at full)."""
        return None if self.left_full_at is None else self.now - self.left_full_at

    @classmethod
    def parse(cls, service: str, raw: list[Any], store: str) -> ServiceState:
        v = [x.decode() if isinstance(x, bytes) else x for x in raw[:13]]

        def opt(text: str) -> float | None:
            return float(text) if text != "" else None

        history = tuple(float(x) for x in raw[13])
        return cls(
            service=service,
            from_level=Level(int(v[0])),
            level=Level(int(v[1])),
            gen=int(v[2]),
            changed=v[3] == "1",
            recovered=opt(v[4]),
            now=float(v[5]),
            reason=v[6],
            source=v[7],
            floor=Level(int(v[8])),
            left_full_at=opt(v[9]),
            changed_at=opt(v[10]),
            last_recovery=opt(v[11]),
            healthy_since=opt(v[12]),
            recoveries=history,
            source_store=store,
        )


def payload(state: ServiceState) -> bytes:
    """The change message published on the service's channel."""
    return json.dumps(
        {
            "gen": state.gen,
            "level": int(state.level),
            "from": int(state.from_level),
            "reason": state.reason,
        }
    ).encode()


class DegradationStore(Protocol):
    source: str

    def step(
        self,
        service: str,
        op: Op,
        *,
        level: Level = Level.full,
        reason: str = "",
        recovery_step: float = 0.0,
        history: int = 10,
    ) -> ServiceState: ...

    def watch(self, service: str, callback: Callback) -> None:
        """Call back with each change message; None when changes may have been missed."""

    def cache_trusted(self) -> bool:
        """Whether a level cached from this store may be used without asking."""


@dataclass(slots=True)
class _Record:
    level: Level = Level.full
    floor: Level = Level.full
    reason: str = ""
    source: str = ""
    gen: int = 0
    changed_at: float | None = None
    left_full_at: float | None = None
    healthy_since: float | None = None
    last_recovery: float | None = None
    recoveries: tuple[float, ...] = ()


class MemoryDegradationStore:
    """Levels of this process only, on a given clock: the same state machine as the script."""

    source = "memory"

    def __init__(self, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        self._callbacks: dict[str, list[Callback]] = {}

    def seed(self, service: str, level: Level) -> None:
        """Start `service` at `level` (the last level known from Redis) unless already known."""
        with self._lock:
            self._records.setdefault(service, _Record(level=level))

    def step(
        self,
        service: str,
        op: Op,
        *,
        level: Level = Level.full,
        reason: str = "",
        recovery_step: float = 0.0,
        history: int = 10,
    ) -> ServiceState:
        with self._lock:
            now = self._clock()
            old = self._records.get(service, _Record())
            rec = self._advance(replace(old), op, level, reason, recovery_step, now)
            recovered = None
            if rec.level != old.level:
                rec.gen += 1
                rec.changed_at = now
                rec.reason = reason
                if old.level == Level.full:
                    rec.left_full_at = now
                if rec.level == Level.full and rec.left_full_at is not None:
                    recovered = now - rec.left_full_at
                    rec.last_recovery = recovered
                    rec.recoveries = (recovered, *rec.recoveries)[:history]
                    rec.left_full_at = None
            if op != "snapshot":
                self._records[service] = rec
            state = ServiceState(
                service=service,
                level=rec.level,
                from_level=old.level,
                changed=rec.level != old.level,
                gen=rec.gen,
                reason=rec.reason,
                source=rec.source,
                floor=rec.floor,
                now=now,
                changed_at=rec.changed_at,
                left_full_at=rec.left_full_at,
                healthy_since=rec.healthy_since,
                recovered=recovered,
                last_recovery=rec.last_recovery,
                recoveries=rec.recoveries,
                source_store=self.source,
            )
            callbacks = list(self._callbacks.get(service, ())) if state.changed else []
        for callback in callbacks:
            callback(payload(state))
        return state

    @staticmethod
    def _advance(
        rec: _Record, op: Op, level: Level, reason: str, recovery_step: float, now: float
    ) -> _Record:
        if op == "set":
            rec.level = rec.floor = level
            rec.source, rec.reason, rec.healthy_since = "operator", reason, None
        elif op == "degrade":
            rec.healthy_since = None
            if level > rec.level:
                rec.level, rec.source = level, "auto"
        elif op == "recover":
            if rec.level > rec.floor:
                if rec.healthy_since is None:
                    rec.healthy_since = now
                start = rec.healthy_since
                if rec.changed_at is not None:
                    start = max(start, rec.changed_at)
                if now - start >= recovery_step:
                    rec.level, rec.source = Level(rec.level - 1), "auto"
            else:
                rec.healthy_since = None
        return rec

    def watch(self, service: str, callback: Callback) -> None:
        with self._lock:
            self._callbacks.setdefault(service, []).append(callback)

    def cache_trusted(self) -> bool:
        return True

    def services(self) -> list[str]:
        return sorted(self._records)


@functools.cache
def _keys(service: str) -> tuple[tuple[str, str], str]:
    """KEYS of degradation_step.lua and the service's channel (built once per service)."""
    state, recoveries = (keys.key(POLICY, service, f) for f in ("state", "recoveries"))
    return (state, recoveries), keys.channel(POLICY, service)


class RedisDegradationStore(ScriptedRedisStore):
    """Levels shared by the fleet through Redis (degradation_step.lua; `clock`: tests only)."""

    def __init__(self, client: redis.Redis, *, clock: Clock | None = None) -> None:
        super().__init__(client, clock=clock)
        self.index = NameIndex(client, POLICY)

    def _args(
        self, service: str, op: Op, level: Level, reason: str, recovery_step: float, history: int
    ) -> list[Any]:
        return [
            op,
            _keys(service)[1],
            self._now(),
            int(level),
            reason,
            repr(float(recovery_step)),
            history,
        ]

    def step(
        self,
        service: str,
        op: Op,
        *,
        level: Level = Level.full,
        reason: str = "",
        recovery_step: float = 0.0,
        history: int = 10,
    ) -> ServiceState:
        if op != "snapshot":
            self.index.add(service)
        raw = self._scripts["degradation_step"](
            keys=_keys(service)[0],
            args=self._args(service, op, level, reason, recovery_step, history),
        )
        return ServiceState.parse(service, raw, self.source)

    def queue_snapshot(self, pipe: redis.client.Pipeline, service: str) -> Reader[ServiceState]:
        """Queue a snapshot of `service` on `pipe`; the returned reader parses its reply."""
        args = self._args(service, "snapshot", Level.full, "", 0.0, 10)
        queued = self._scripts.queue(pipe, "degradation_step", _keys(service)[0], args)
        return lambda results: ServiceState.parse(
            service, raise_error(queued.reply(results)), self.source
        )

    def watch(self, service: str, callback: Callback) -> None:
        feed_for(self.client).watch(_keys(service)[1], callback)

    def cache_trusted(self) -> bool:
        return feed_for(self.client).healthy
