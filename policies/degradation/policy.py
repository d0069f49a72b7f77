"""Degradation levels per service, shared by the fleet, with fallbacks.

Each service is at one `Level` (full < degraded < minimal < offline). The
level lives in Redis; every change is one Lua step that PUBLISHes on the
service's channel, and each process keeps the level in a local cache that the
change feed keeps current: reading the level costs no Redis round trip while
the feed is healthy.

`execute_with_fallback(fn, *args, **kwargs)` runs a call according to the
level and returns a frozen `Outcome`:

- executed: ran normally at full;
- degraded: ran normally at a lower level (an adjuster may change the
  arguments, e.g. `pass_level()` hands the level to the function);
- fallback: a fallback handler's value, because the level does not allow the
  call (or a handler is registered for that very level), or because the call
  raised a failure kind listed in `fall_back_on`;
- unavailable: the level does not allow the call and there is no fallback.

Operators set levels exactly (`set_level`); `observe()` applies the automatic
rule (`AutoDegrade`): it degrades at once and recovers one level per
`recovery_step` seconds of health, never further than the operator's level.
The time from leaving full to returning to it is measured by the store
(Redis TIME) and reported as `events.Recovered(duration)`.

If Redis is unreachable the level is the last one known here (or full),
changes apply to this process only, and `StoreUnavailable` / `StoreRestored`
say so. With degradation disabled the level is always full.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import redis

from policies import events, keys
from policies.classify import Classifier, FailureKind, default_classifier
from policies.degradation.store import (
    POLICY,
    DegradationStore,
    Level,
    MemoryDegradationStore,
    Op,
    RedisDegradationStore,
    ServiceState,
)
from policies.errors import ServiceDegraded
from policies.index import read_all
from policies.outage import Outage
from policies.retry import require, require_int, require_seconds

__all__ = [
    "AutoDegrade",
    "Degradation",
    "DegradationConfig",
    "Outcome",
    "list_services",
    "pass_level",
]

Status = Literal["executed", "degraded", "fallback", "unavailable"]
#: handler(level, *args, **kwargs) -> the value the call would have returned
Fallback = Callable[..., Any]
#: adjuster(level, args, kwargs) -> (args, kwargs) for the primary call
Adjuster = Callable[
    [Level, tuple[Any, ...], dict[str, Any]], tuple[tuple[Any, ...], dict[str, Any]]
]


@dataclass(frozen=True, slots=True, kw_only=True)
class DegradationConfig:
    """How a service degrades, recovers and falls back."""

    #: Off: the level is always full (nothing is read from Redis).
    enabled: bool = True
    #: Seconds of health per level of automatic recovery.
    recovery_step: float = 30.0
    #: The lowest level at which the primary call still runs.
    run_up_to: Level = Level.minimal
    #: Failure kinds of the primary call that are answered by a fallback (if one exists).
    fall_back_on: frozenset[FailureKind] = frozenset({FailureKind.degraded})
    #: Measured recovery durations kept.
    history: int = 10

    def __post_init__(self) -> None:
        require(self, "enabled", isinstance(self.enabled, bool), "True or False")
        require_seconds(self, "recovery_step", zero=True)
        require(
            self,
            "run_up_to",
            isinstance(self.run_up_to, Level) and self.run_up_to < Level.offline,
            "Level.full, Level.degraded or Level.minimal",
        )
        ok = isinstance(self.fall_back_on, frozenset) and all(
            isinstance(k, FailureKind) for k in self.fall_back_on
        )
        require(self, "fall_back_on", ok, "a frozenset of FailureKind")
        require_int(self, "history", 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class AutoDegrade:
    """The automatic rule: the level a service's health calls for."""

    #: At least this level while the service's breaker is open.
    breaker_open_level: Level = Level.degraded
    #: Recent failures at or over this count...
    failure_threshold: int = 10
    #: ...call for at least this level.
    failure_level: Level = Level.minimal

    def __post_init__(self) -> None:
        for name in ("breaker_open_level", "failure_level"):
            require(self, name, isinstance(getattr(self, name), Level), "a Level")
        require_int(self, "failure_threshold", 1)

    def assess(self, *, breaker_open: bool = False, failures: int = 0) -> tuple[Level, str]:
        """The level called for, and why."""
        level, why = Level.full, []
        if breaker_open:
            level = max(level, self.breaker_open_level)
            why.append("breaker open")
        if failures >= self.failure_threshold:
            level = max(level, self.failure_level)
            why.append(f"{failures} failures (threshold {self.failure_threshold})")
        return level, ", ".join(why) or "healthy"


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What `execute_with_fallback` did, at which level."""

    status: Status
    value: Any
    level: Level
    #: The failure that led to the fallback, or ServiceDegraded when unavailable.
    error: BaseException | None = None


def pass_level(keyword: str = "level") -> Adjuster:
    """An adjuster that hands the current level to the function as `keyword=`."""

    def adjust(
        level: Level, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return args, {**kwargs, keyword: level}

    return adjust


class Degradation:
    """One service's degradation level, fallbacks and automatic rule."""

    def __init__(
        self,
        service: str,
        store: DegradationStore,
        config: DegradationConfig | None = None,
        *,
        auto: AutoDegrade | None = None,
        classifier: Classifier = default_classifier,
        emitter: events.Emitter | None = None,
    ) -> None:
        keys.key(POLICY, service, "state")  # validates the name
        self.service = service
        self.store = store
        self.config = config or DegradationConfig()
        self.auto = auto or AutoDegrade()
        self.classifier = classifier
        self.emitter = emitter or events.default_emitter
        self._shared = not isinstance(store, MemoryDegradationStore)
        self._local = MemoryDegradationStore() if self._shared else store
        self._reseed = True
        self._outage = Outage(
            policy=POLICY,
            name=service,
            mode="last known level, changes local",
            emitter=self.emitter,
        )
        self._lock = threading.Lock()
        self._cache: tuple[Level, int] | None = None
        self._last_known = Level.full
        self._watching = False
        self._fallbacks: dict[Level | None, Fallback] = {}
        self._adjuster: Adjuster | None = None

    # --- fallbacks

    def register_fallback(self, handler: Fallback, level: Level | str | None = None) -> Fallback:
        """Use `handler(level, *args, **kwargs)` at `level` (None: any level needing one)."""
        target = None if level is None else Level.parse(level)
        if target is Level.full:
            raise ValueError("a fallback for level full would replace every call")
        self._fallbacks[target] = handler
        return handler

    def fallback(self, level: Level | str | None = None) -> Callable[[Fallback], Fallback]:
        """Decorator form of `register_fallback`."""
        return lambda handler: self.register_fallback(handler, level)

    def adjust(self, adjuster: Adjuster) -> Adjuster:
        """Pass the primary call's arguments through `adjuster(level, args, kwargs)`."""
        self._adjuster = adjuster
        return adjuster

    # --- the level

    def level(self) -> Level:
        """The service's level: from the local cache while the change feed is healthy."""
        if not self.config.enabled:
            return Level.full
        self._ensure_watch()
        with self._lock:
            cached = self._cache
        if cached is not None and self.store.cache_trusted():
            return cached[0]
        trusted = self.store.cache_trusted()
        state = self._step("snapshot")
        if trusted and state.source_store != "local":
            with self._lock:
                if self._cache is None or state.gen >= self._cache[1]:
                    self._cache = (state.level, state.gen)
        return state.level

    def snapshot(self) -> ServiceState:
        """Everything about the service now (one round trip)."""
        return self._step("snapshot")

    def set_level(self, level: Level | str, reason: str = "set by operator") -> ServiceState:
        """Set the level exactly (operators: `bulwark degrade SERVICE LEVEL`)."""
        return self._step("set", level=Level.parse(level), reason=reason)

    def observe(self, *, breaker_open: bool = False, failures: int = 0) -> ServiceState | None:
        """Apply the automatic rule to the service's health (one round trip, or none).

        Call it from a periodic health check or on breaker transitions, not per task.
        """
        if not self.config.enabled:
            return None
        target, why = self.auto.assess(breaker_open=breaker_open, failures=failures)
        current = self.level()
        if target == current == Level.full:
            return None
        if target >= current:
            return self._step("degrade", level=target, reason=f"auto: {why}")
        return self._step("recover", reason=f"auto: recovering ({why})")

    # --- running calls

    def execute_with_fallback(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
        """Run `fn(*args, **kwargs)` as the level allows; see the module docstring."""
        level = self.level()
        specific = self._fallbacks.get(level)
        handler = specific or self._fallbacks.get(None)
        if level > self.config.run_up_to or specific is not None:
            if handler is None:
                error = ServiceDegraded(self.service, str(level), self.config.recovery_step)
                return Outcome(status="unavailable", value=None, level=level, error=error)
            return Outcome(status="fallback", value=handler(level, *args, **kwargs), level=level)
        call_args, call_kwargs = args, kwargs
        if self._adjuster is not None:
            call_args, call_kwargs = self._adjuster(level, args, dict(kwargs))
        try:
            value = fn(*call_args, **call_kwargs)
        except Exception as exc:
            kind = self.classifier.classify(exc).kind
            if handler is None or kind not in self.config.fall_back_on:
                raise
            value = handler(level, *args, **kwargs)
            return Outcome(status="fallback", value=value, level=level, error=exc)
        status: Status = "executed" if level == Level.full else "degraded"
        return Outcome(status=status, value=value, level=level)

    # --- internals

    def _ensure_watch(self) -> None:
        if not self._watching:
            self._watching = True
            self.store.watch(self.service, self._on_change)

    def _on_change(self, message: bytes | None) -> None:
        with self._lock:
            if message is None:
                self._cache = None
                return
            data = json.loads(message)
            gen, level = int(data["gen"]), Level(int(data["level"]))
            if self._cache is None or gen > self._cache[1]:
                self._cache = (level, gen)
            self._last_known = self._cache[0]

    def _step(self, op: Op, *, level: Level = Level.full, reason: str = "") -> ServiceState:
        options: dict[str, Any] = {
            "level": level,
            "reason": reason,
            "recovery_step": self.config.recovery_step,
            "history": self.config.history,
        }

        def remote() -> ServiceState:
            state = self.store.step(self.service, op, **options)
            self._reseed = True
            return state

        def local() -> ServiceState:
            if self._shared and self._reseed:
                self._local = MemoryDegradationStore()
                self._local.seed(self.service, self._last_known)
                self._reseed = False
            state = self._local.step(self.service, op, **options)
            return replace(state, source_store="local") if self._shared else state

        state = self._outage.call(remote if self._shared else None, local)
        with self._lock:
            self._last_known = state.level
            # Our own change: do not wait for its message to come back.
            if (
                self._cache is not None
                and state.gen > self._cache[1]
                and state.source_store != "local"
            ):
                self._cache = (state.level, state.gen)
        if state.changed:
            self._announce(state)
        return state

    def _announce(self, state: ServiceState) -> None:
        self.emitter.emit(
            events.DegradationChanged(
                name=self.service,
                from_level=str(state.from_level),
                to_level=str(state.level),
                reason=state.reason,
            )
        )
        if state.recovered is not None:
            self.emitter.emit(
                events.Recovered(policy=POLICY, name=self.service, duration=state.recovered)
            )


def list_services(client: redis.Redis) -> list[ServiceState]:
    """A snapshot of every service with a degradation state in Redis, sorted by name."""
    return read_all(client, POLICY, RedisDegradationStore(client).queue_snapshot)
