"""Where a circuit breaker keeps its state: the store protocol and the Redis store.

One store call is one step of the state machine (one Lua script call for
Redis): `acquire` admits or refuses a call, `record` books its outcome,
`command` runs an operator command, `snapshot` reads everything at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from policies import keys
from policies.breaker.config import BreakerConfig
from policies.clock import Clock
from policies.index import NameIndex, Reader, raise_error, read_all
from policies.scripts import Queued, ScriptedRedisStore
from policies.watch import feed_for

SCRIPT = "breaker_step"
COMMANDS = ("force_open", "reset", "disable", "metrics_only")


@dataclass(frozen=True, slots=True, kw_only=True)
class Permit:
    """Leave to make one call; give it back to `record`."""

    name: str
    id: str
    gen: int
    #: One of the K half-open trial slots (a lease with an expiry).
    trial: bool = False
    #: metrics_only: an enforcing breaker would have refused this call.
    would_reject: bool = False
    #: Where it came from: redis | memory | cache (no round trip) | local (Redis down) | disabled
    source: str = "redis"


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What one step of the state machine answered."""

    admitted: bool
    mode: str
    state: str
    gen: int
    retry_after: float
    trial: bool = False
    would_reject: bool = False
    #: (from, to, reason) when this very step changed the state.
    transition: tuple[str, str, str] | None = None

    @property
    def shown(self) -> str:
        """The state operators see: the mode when it overrides the circuit."""
        return self.state if self.mode == "normal" else self.mode

    @classmethod
    def parse(cls, raw: list[Any]) -> Reply:
        text = [v.decode() if isinstance(v, bytes) else v for v in raw]
        return cls(
            admitted=bool(int(text[0])),
            mode=text[1],
            state=text[2],
            gen=int(text[3]),
            retry_after=max(0.0, float(text[4])),
            trial=bool(int(text[5])),
            would_reject=bool(int(text[6])),
            transition=(text[7], text[8], text[9]) if text[7] else None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerSnapshot:
    """Everything about one breaker at one instant (for `bulwark status`)."""

    name: str
    #: closed | open | half_open | forced_open | disabled | metrics_only
    state: str
    #: The circuit under any operator mode: closed | open | half_open
    circuit: str
    failures: int
    window_calls: int
    window_failures: int
    #: Store time (Redis TIME, or the memory store's clock) until which it stays open.
    opened_until: float | None
    retry_after: float
    trips: int
    trials_in_flight: int
    trial_successes: int
    gen: int
    source: str

    @classmethod
    def parse(cls, name: str, raw: list[Any], source: str) -> BreakerSnapshot:
        v = [x.decode() if isinstance(x, bytes) else x for x in raw]
        mode, circuit, now, until = v[0], v[1], float(v[10]), float(v[4])
        return cls(
            name=name,
            state=circuit if mode == "normal" else mode,
            circuit=circuit,
            failures=int(v[3]),
            window_calls=int(v[8]),
            window_failures=int(v[9]),
            opened_until=until if circuit == "open" else None,
            retry_after=max(0.0, until - now) if circuit == "open" else 0.0,
            trips=int(v[5]),
            trials_in_flight=int(v[7]),
            trial_successes=int(v[6]),
            gen=int(v[2]),
            source=source,
        )


class BreakerStore(Protocol):
    """The state of breakers, one step per call."""

    #: The `source` of the permits and snapshots it hands out.
    source: str

    def acquire(self, name: str, config: BreakerConfig, permit_id: str) -> Reply: ...

    def record(self, name: str, config: BreakerConfig, permit: Permit, failed: bool) -> Reply: ...

    def release(self, name: str, config: BreakerConfig, permit: Permit) -> Reply: ...

    def command(self, name: str, config: BreakerConfig, op: str) -> Reply: ...

    def snapshot(self, name: str, config: BreakerConfig | None) -> BreakerSnapshot: ...

    def watch(self, name: str, callback: Callable[[bytes | None], None]) -> None:
        """Call back when another process changes the breaker (None: feed lost)."""

    def cache_trusted(self) -> bool:
        """Whether a local cache of this store's state may be used without asking."""


@functools.cache
def _keys(name: str) -> tuple[tuple[str, ...], str]:
    """KEYS of breaker_step.lua and the breaker's channel (built once per name)."""
    fields = ("state", "window", "trials")
    return tuple(keys.key("breaker", name, f) for f in fields), keys.channel("breaker", name)


class RedisBreakerStore(ScriptedRedisStore):
    """Breaker state shared by every process through Redis (breaker_step.lua).

    `clock` is for tests only: it overrides Redis TIME so that property tests
    can move time; production leaves it None and the script reads TIME.
    """

    def __init__(self, client: redis.Redis, *, clock: Clock | None = None) -> None:
        super().__init__(client, clock=clock)
        self.index = NameIndex(client, "breaker")
        self._config_args: tuple[BreakerConfig | None, list[str]] = (None, [""] * 9)

    def _args(self, op: str, name: str, config: BreakerConfig | None) -> list[str]:
        cfg = self._config_args
        if cfg[0] is not config:
            args = config.script_args() if config is not None else [""] * 9
            cfg = self._config_args = (config, args)
        return [op, _keys(name)[1], self._now(), *cfg[1]]

    def _run(self, name: str, args: list[str]) -> Any:
        return self._scripts[SCRIPT](keys=_keys(name)[0], args=args)

    def acquire(self, name: str, config: BreakerConfig, permit_id: str) -> Reply:
        self.index.add(name)
        return Reply.parse(self._run(name, [*self._args("acquire", name, config), permit_id]))

    def record_args(
        self, name: str, config: BreakerConfig, permit: Permit, failed: bool
    ) -> list[str]:
        """ARGV of the record step: to queue it on a caller's pipeline (see `queue_record`)."""
        flags = [permit.id, str(permit.gen), "1" if permit.trial else "0", "1" if failed else "0"]
        return [*self._args("record", name, config), *flags]

    def record(self, name: str, config: BreakerConfig, permit: Permit, failed: bool) -> Reply:
        return Reply.parse(self._run(name, self.record_args(name, config, permit, failed)))

    def queue_record(
        self,
        pipe: redis.client.Pipeline,
        name: str,
        config: BreakerConfig,
        permit: Permit,
        failed: bool,
    ) -> Queued:
        """Queue the record step on `pipe` (a bare EVALSHA); `Reply.parse` its `reply()`."""
        args = self.record_args(name, config, permit, failed)
        self.index.queue_add(pipe, name)
        return self._scripts.queue(pipe, SCRIPT, _keys(name)[0], args)

    def release(self, name: str, config: BreakerConfig, permit: Permit) -> Reply:
        return Reply.parse(self._run(name, [*self._args("release", name, config), permit.id]))

    def command(self, name: str, config: BreakerConfig, op: str) -> Reply:
        if op not in COMMANDS:
            raise ValueError(f"unknown breaker command {op!r}")
        self.index.add(name)
        return Reply.parse(self._run(name, self._args(op, name, config)))

    def snapshot(self, name: str, config: BreakerConfig | None) -> BreakerSnapshot:
        raw = self._run(name, self._args("snapshot", name, config))
        return BreakerSnapshot.parse(name, raw, self.source)

    def queue_snapshot(self, pipe: redis.client.Pipeline, name: str) -> Reader[BreakerSnapshot]:
        """Queue a snapshot of `name` on `pipe`; the returned reader parses its reply."""
        queued = self._scripts.queue(
            pipe, SCRIPT, _keys(name)[0], self._args("snapshot", name, None)
        )
        return lambda results: BreakerSnapshot.parse(
            name, raise_error(queued.reply(results)), self.source
        )

    def watch(self, name: str, callback: Callable[[bytes | None], None]) -> None:
        feed_for(self.client).watch(_keys(name)[1], callback)

    def cache_trusted(self) -> bool:
        return feed_for(self.client).healthy


def list_breakers(client: redis.Redis) -> list[BreakerSnapshot]:
    """A snapshot of every breaker that has state in Redis, sorted by name (two round trips)."""
    return read_all(client, "breaker", RedisBreakerStore(client).queue_snapshot)
