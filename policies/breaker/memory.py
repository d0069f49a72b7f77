"""The in-process breaker store: the same state machine as breaker_step.lua, in Python.

Used for tests (with a FakeClock), for single-process users, and as the local
fallback of a Redis-backed breaker while Redis is unreachable.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from policies.breaker.config import WINDOW_BUCKETS, BreakerConfig, WindowStats
from policies.breaker.store import COMMANDS, BreakerSnapshot, Permit, Reply
from policies.clock import Clock, monotonic

_COMMAND_MODES = {
    "force_open": ("forced_open", "operator forced open"),
    "disable": ("disabled", "operator disabled the breaker"),
    "metrics_only": ("metrics_only", "operator set metrics_only"),
}


@dataclass(slots=True)
class _Circuit:
    mode: str = "normal"
    state: str = "closed"
    gen: int = 0
    consecutive: int = 0
    opened_until: float = 0.0
    open_count: int = 0
    trips: int = 0
    successes: int = 0
    buckets: dict[int, list[int]] = field(default_factory=dict)  # bucket -> [calls, failures]
    trials: dict[str, float] = field(default_factory=dict)  # permit id -> lease expiry
    # Set by `move` for the reply of the current step.
    moved: tuple[str, str, str] | None = None

    def shown(self) -> str:
        return self.state if self.mode == "normal" else self.mode

    def move(self, mode: str, state: str, why: str) -> None:
        if mode != self.mode:
            before = self.shown()
            self.mode, self.state = mode, state
            self.moved = (before, self.shown(), why)
        else:
            reason = why if mode == "normal" else f"{mode}, not enforced: {why}"
            self.moved = (self.state, state, reason)
            self.state = state
        self.gen += 1

    def clear(self) -> None:
        self.open_count = self.consecutive = self.successes = 0
        self.opened_until = 0.0
        self.trials.clear()
        self.buckets.clear()

    def trip(self, config: BreakerConfig, now: float, why: str) -> None:
        self.open_count += 1
        self.trips += 1
        self.opened_until = now + config.open_timeout_after(self.open_count)
        self.successes = 0
        self.trials.clear()
        self.move(self.mode, "open", why)

    def window(self, now: float, width: float, prune: bool) -> tuple[int, int]:
        current = math.floor(now / width)
        old = [b for b in self.buckets if b <= current - WINDOW_BUCKETS]
        live = [v for b, v in self.buckets.items() if b > current - WINDOW_BUCKETS]
        if prune:
            for b in old:
                del self.buckets[b]
        return sum(v[0] for v in live), sum(v[1] for v in live)

    def reply(
        self, admitted: bool, retry_after: float = 0.0, trial: bool = False, would: bool = False
    ) -> Reply:
        moved, self.moved = self.moved, None
        return Reply(
            admitted=admitted,
            mode=self.mode,
            state=self.state,
            gen=self.gen,
            retry_after=max(0.0, retry_after),
            trial=trial,
            would_reject=would,
            transition=moved,
        )


class MemoryBreakerStore:
    """Breaker state in this process only; thread-safe; time from `clock`."""

    def __init__(self, clock: Clock = monotonic, *, source: str = "memory") -> None:
        self.source = source
        self._clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, _Circuit] = {}

    def _get(self, name: str) -> _Circuit:
        return self._circuits.setdefault(name, _Circuit())

    def acquire(self, name: str, config: BreakerConfig, permit_id: str) -> Reply:
        with self._lock:
            return self._acquire(self._get(name), config, permit_id, self._clock())

    def _acquire(self, c: _Circuit, config: BreakerConfig, permit_id: str, now: float) -> Reply:
        if c.mode == "disabled":
            return c.reply(True)
        if c.mode == "forced_open":
            return c.reply(False, config.open_timeout)
        enforce = c.mode != "metrics_only"
        if c.state == "open":
            if now < c.opened_until:
                return c.reply(not enforce, c.opened_until - now, would=not enforce)
            c.successes = 0
            c.trials.clear()
            c.move(c.mode, "half_open", "open timeout elapsed")
        if c.state == "half_open":
            for held, expiry in list(c.trials.items()):
                if expiry <= now:
                    del c.trials[held]
            if c.successes + len(c.trials) < config.success_threshold:
                c.trials[permit_id] = now + config.trial_ttl
                return c.reply(True, trial=True)
            wait = min(c.trials.values()) - now if c.trials else config.trial_ttl
            return c.reply(not enforce, wait, would=not enforce)
        return c.reply(True)

    def record(self, name: str, config: BreakerConfig, permit: Permit, failed: bool) -> Reply:
        with self._lock:
            return self._record(self._get(name), config, permit, failed, self._clock())

    def _record(
        self, c: _Circuit, config: BreakerConfig, permit: Permit, failed: bool, now: float
    ) -> Reply:
        if c.mode == "disabled":
            return c.reply(False)
        if permit.trial:
            held = c.trials.pop(permit.id, None) is not None
            if held and c.state == "half_open" and permit.gen == c.gen:
                if failed:
                    c.trip(config, now, "a trial call failed")
                else:
                    c.successes += 1
                    if c.successes >= config.success_threshold:
                        c.clear()
                        c.move(
                            c.mode, "closed", f"{config.success_threshold} trial calls succeeded"
                        )
        elif c.state == "closed":
            width = config.trip.window / WINDOW_BUCKETS
            counts = c.buckets.setdefault(math.floor(now / width), [0, 0])
            counts[0] += 1
            counts[1] += int(failed)
            calls, failures = c.window(now, width, prune=True)
            c.consecutive = c.consecutive + 1 if failed else 0
            why = config.trip(
                WindowStats(consecutive=c.consecutive, calls=calls, failures=failures)
            )
            if why is not None:
                c.trip(config, now, why)
        return c.reply(False, c.opened_until - now if c.state == "open" else 0.0)

    def release(self, name: str, config: BreakerConfig, permit: Permit) -> Reply:
        with self._lock:
            c = self._get(name)
            c.trials.pop(permit.id, None)
            return c.reply(False)

    def command(self, name: str, config: BreakerConfig, op: str) -> Reply:
        if op not in COMMANDS:
            raise ValueError(f"unknown breaker command {op!r}")
        with self._lock:
            c = self._get(name)
            if op == "reset":
                c.clear()
                c.move("normal", "closed", "operator reset")
            else:
                mode, why = _COMMAND_MODES[op]
                if c.mode != mode:
                    c.move(mode, c.state, why)
            return c.reply(False)

    def snapshot(self, name: str, config: BreakerConfig | None) -> BreakerSnapshot:
        window = (config or BreakerConfig()).trip.window
        with self._lock:
            c = self._get(name)
            now = self._clock()
            calls, failures = c.window(now, window / WINDOW_BUCKETS, prune=False)
            is_open = c.state == "open"
            return BreakerSnapshot(
                name=name,
                state=c.shown(),
                circuit=c.state,
                failures=c.consecutive,
                window_calls=calls,
                window_failures=failures,
                opened_until=c.opened_until if is_open else None,
                retry_after=max(0.0, c.opened_until - now) if is_open else 0.0,
                trips=c.trips,
                trials_in_flight=sum(1 for e in c.trials.values() if e > now),
                trial_successes=c.successes,
                gen=c.gen,
                source=self.source,
            )

    def watch(self, name: str, callback: Callable[[bytes | None], None]) -> None:
        """Nothing to watch: every step is answered in this process."""

    def cache_trusted(self) -> bool:
        return False
