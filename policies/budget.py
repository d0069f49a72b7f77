"""The fleet-wide retry budget: retries capped at a share of calls over a sliding window.

A failing dependency must not be hammered by every worker retrying at once:
retries over the window may not exceed `min_retries + ratio * calls`. The
window is `buckets` time buckets (one Redis hash per budget); `record_call()`
is one small script call (or one command queued on the caller's pipeline),
`try_spend()` is one script call that counts and spends atomically.

The worker counts its calls with `count_call_in()`: calls are added up in the
process and booked at most once per `BOOK_EVERY` seconds, on a pipeline the
caller sends anyway, and always before a spend or a snapshot of this process.
Other processes' calls so reach the window up to a second late, and a
process that dies loses at most its last second of calls: the budget is then
briefly stricter than its ratio, never looser. (Retries are never deferred:
a spend is booked at once.)

When the budget is exhausted the caller defers the retry or dead-letters the
task (`spend_or_raise()` raises `RetryBudgetExhausted` with `retry_after`).
If Redis is unreachable the budget runs on a local, per-process window and
says so with `StoreUnavailable` / `StoreRestored`.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis

from policies import events, keys
from policies.clock import Clock, monotonic
from policies.errors import RetryBudgetExhausted
from policies.outage import Outage
from policies.retry import require, require_int, require_seconds
from policies.scripts import Queued, ScriptedRedisStore

POLICY = "retry-budget"
#: Seconds between bookings of the calls a process counted (`count_call_in`).
BOOK_EVERY = 1.0
T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetConfig:
    """How many retries a window of calls buys."""

    #: Share of the window's calls that may be retried.
    ratio: float = 0.2
    #: Sliding window, seconds.
    window: float = 60.0
    #: Retries always allowed per window, so that a quiet service can still retry.
    min_retries: int = 10
    #: Time buckets the window is made of (its resolution).
    buckets: int = 10

    def __post_init__(self) -> None:
        ok = (
            isinstance(self.ratio, int | float)
            and not isinstance(self.ratio, bool)
            and math.isfinite(self.ratio)
            and self.ratio >= 0
        )
        require(self, "ratio", ok, "a finite number >= 0 (0.2 = one retry per five calls)")
        require_seconds(self, "window")
        require_int(self, "min_retries", 0)
        require_int(self, "buckets", 1)
        require(self, "buckets", self.buckets <= 600, "an integer from 1 to 600")

    @property
    def width(self) -> float:
        """Seconds per bucket."""
        return self.window / self.buckets


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetState:
    """The window of one budget as one spend (or peek) saw it."""

    granted: bool
    calls: int
    retries: int
    allowance: float
    #: Seconds until the oldest spent retry leaves the window (0 when granted).
    retry_after: float
    source: str


class BudgetStore(Protocol):
    source: str

    def record(self, name: str, config: BudgetConfig, count: int = 1) -> None: ...

    def spend(self, name: str, config: BudgetConfig, *, peek: bool = False) -> BudgetState: ...


class MemoryBudgetStore:
    """Budgets of this process only, on a given clock (tests; the local fallback)."""

    source = "memory"

    def __init__(self, clock: Clock = monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        #: name -> bucket -> [calls, retries]
        self._windows: dict[str, dict[int, list[int]]] = {}

    def _window(self, name: str, config: BudgetConfig) -> tuple[dict[int, list[int]], int]:
        bucket = math.floor(self._clock() / config.width)
        window = self._windows.setdefault(name, {})
        for old in [b for b in window if b <= bucket - config.buckets]:
            del window[old]
        return window, bucket

    def record(self, name: str, config: BudgetConfig, count: int = 1) -> None:
        with self._lock:
            window, bucket = self._window(name, config)
            window.setdefault(bucket, [0, 0])[0] += count

    def spend(self, name: str, config: BudgetConfig, *, peek: bool = False) -> BudgetState:
        with self._lock:
            window, bucket = self._window(name, config)
            calls = sum(c for c, _ in window.values())
            retries = sum(r for _, r in window.values())
            allowance = config.min_retries + config.ratio * calls
            granted = retries + 1 <= allowance + 1e-9
            retry_after = 0.0
            if granted and not peek:
                window.setdefault(bucket, [0, 0])[1] += 1
                retries += 1
            elif not granted:
                oldest = min((b for b, (_, r) in window.items() if r > 0), default=bucket)
                retry_after = (oldest + config.buckets) * config.width - self._clock()
            return BudgetState(
                granted=granted,
                calls=calls,
                retries=retries,
                allowance=allowance,
                retry_after=max(0.0, retry_after),
                source=self.source,
            )


@functools.cache
def _keys(name: str) -> tuple[str]:
    """KEYS of the budget scripts (built once per name)."""
    return (keys.key(POLICY, name, "window"),)


class RedisBudgetStore(ScriptedRedisStore):
    """Budgets shared by the fleet (budget_record.lua, budget_spend.lua)."""

    def record_args(self, config: BudgetConfig, count: int = 1) -> list[Any]:
        return [self._now(), repr(config.width), config.buckets, count]

    def record(self, name: str, config: BudgetConfig, count: int = 1) -> None:
        args = self.record_args(config, count)
        self._scripts["budget_record"](keys=_keys(name), args=args)

    def queue_record(
        self, pipe: redis.client.Pipeline, name: str, config: BudgetConfig, count: int = 1
    ) -> Queued:
        """Queue the record script on `pipe` (a bare EVALSHA, no SCRIPT EXISTS round trip)."""
        args = self.record_args(config, count)
        return self._scripts.queue(pipe, "budget_record", _keys(name), args)

    def spend(self, name: str, config: BudgetConfig, *, peek: bool = False) -> BudgetState:
        raw = self._scripts["budget_spend"](
            keys=_keys(name),
            args=[
                self._now(),
                repr(config.width),
                config.buckets,
                repr(float(config.ratio)),
                config.min_retries,
                "peek" if peek else "spend",
            ],
        )
        v = [x.decode() if isinstance(x, bytes) else x for x in raw]
        return BudgetState(
            granted=v[0] == "1",
            calls=int(float(v[1])),
            retries=int(float(v[2])),
            allowance=float(v[3]),
            retry_after=max(0.0, float(v[4])),
            source=self.source,
        )


@dataclass(frozen=True, slots=True)
class PendingCount:
    """Calls booked on a caller's pipeline by `RetryBudget.count_call_in`."""

    budget: RetryBudget
    queued: Queued
    count: int

    def settle(self, results: Sequence[Any] | BaseException) -> None:
        """Read the booking's reply (re-run after NOSCRIPT); an error keeps the calls locally."""
        self.budget._booked(self.count, self.queued.reply(results))


class RetryBudget:
    """One named retry budget (usually one per dependency)."""

    def __init__(
        self,
        name: str,
        config: BudgetConfig | None = None,
        *,
        store: BudgetStore,
        emitter: events.Emitter | None = None,
        clock: Clock = monotonic,
    ) -> None:
        """`clock` paces the booking of counted calls (`count_call_in`); tests move it."""
        keys.key(POLICY, name, "window")  # validates the name
        self.name = name
        self.config = config or BudgetConfig()
        self.store = store
        shared = not isinstance(store, MemoryBudgetStore)
        #: Where calls go when Redis is down: a window of this process only.
        self._local: BudgetStore = MemoryBudgetStore() if shared else store
        self._shared = shared
        self._outage = Outage(
            policy=POLICY,
            name=name,
            mode="local per-process budget",
            emitter=emitter or events.default_emitter,
        )
        self._counted = 0  # calls counted here, not booked yet
        self._book_at = 0.0  # monotonic time the next booking is due
        self._counted_lock = threading.Lock()
        self._clock = clock

    def _call(self, fn: Callable[[BudgetStore], T]) -> T:
        remote = (lambda: fn(self.store)) if self._shared else None
        return self._outage.call(remote, lambda: fn(self._local))

    def record_call(self, count: int = 1) -> None:
        """Count `count` calls (each run of the task body) into the window."""
        self._call(lambda s: s.record(self.name, self.config, count))

    def queue_record_call(self, pipe: redis.client.Pipeline, count: int = 1) -> Queued:
        """Queue the record step on the caller's pipeline (Redis store only).

        After `pipe.execute(raise_on_error=False)`, pass its results to the
        returned handle's `reply()`: that re-runs the step if the server
        answered NOSCRIPT (it restarted and lost its script cache).
        """
        if not isinstance(self.store, RedisBudgetStore):
            raise TypeError("queue_record_call needs a RedisBudgetStore")
        return self.store.queue_record(pipe, self.name, self.config, count)

    def count_call_in(self, pipe: redis.client.Pipeline) -> PendingCount | None:
        """Count one call; book the calls counted so far on `pipe` when a booking is due
        (at most every `BOOK_EVERY` seconds). Returns the queued booking: `settle` it with
        `pipe.execute(raise_on_error=False)`'s results. None when nothing was queued.

        Without a Redis store, or while Redis is down, the call is recorded at once (in
        the local window while down).
        """
        if not isinstance(self.store, RedisBudgetStore) or self._outage.down:
            self.record_call()
            return None
        now = self._clock()
        with self._counted_lock:
            self._counted += 1
            if now < self._book_at:
                return None
            count, self._counted, self._book_at = self._counted, 0, now + BOOK_EVERY
        return PendingCount(self, self.store.queue_record(pipe, self.name, self.config, count),
                            count)  # fmt: skip

    def _booked(self, count: int, reply: Any) -> None:
        """A booking's reply: on an error the calls go to the local window, not lost."""
        if isinstance(reply, BaseException):
            self._outage.failed(reply)
            self._local.record(self.name, self.config, count)
        else:
            self._outage.ok()

    def _book_counted(self) -> None:
        """Book the calls counted and not booked yet (before a spend or a snapshot)."""
        with self._counted_lock:
            count, self._counted = self._counted, 0
        if count:
            self.record_call(count)

    def _spend(self, peek: bool) -> BudgetState:
        self._book_counted()
        return self._call(lambda s: s.spend(self.name, self.config, peek=peek))

    def spend(self) -> BudgetState:
        """Spend one retry if the budget allows it; the state says whether it did."""
        return self._spend(peek=False)

    def try_spend(self) -> bool:
        """Spend one retry if the budget allows it (one script call)."""
        return self._spend(peek=False).granted

    def spend_or_raise(self) -> BudgetState:
        """Spend one retry or raise RetryBudgetExhausted (with retry_after)."""
        state = self._spend(peek=False)
        if not state.granted:
            raise RetryBudgetExhausted(self.name, state.retry_after)
        return state

    def snapshot(self) -> BudgetState:
        """The window as it is, spending nothing (`granted`: would a spend pass now)."""
        return self._spend(peek=True)
