"""A bounded pool of reusable resources (connections, clients) for one dependency.

`ResourcePool(factory, max_size=...)` hands out at most `max_size` resources at a
time; `with pool.checkout() as conn:` waits at most `checkout_timeout` seconds for
one and raises `PoolExhausted` naming the pool when none frees up. On checkout an
idle resource is checked (`check(resource)`; False or an exception: it is closed and
replaced), and one idle longer than `idle_timeout` or older than `max_lifetime` is
closed and replaced. A factory that fails is counted and raises `PoolError` naming
the pool and the cause; the slot is given back. A resource the caller reports broken
(`checkout().broken()`, or an exception from `broken_on`) is closed, not reused.

Use a well-kept pool where one fits (redis-py's own for Redis, urllib3's for HTTP:
`workers.pools`); this one is for what has none. Counts (created, closed, failed,
waited seconds, timed out) go to `on_count(kind, value)`; the resources in use and idle
to `on_level(in_use, idle)` after each change.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from policies.errors import PolicyConfigError

__all__ = ["Checkout", "PoolError", "PoolExhausted", "ResourcePool"]

R = TypeVar("R")


class PoolError(RuntimeError):
    """A resource could not be made."""


class PoolExhausted(PoolError):
    """No resource freed up within the checkout timeout."""


@dataclass(slots=True)
class _Slot(Generic[R]):
    resource: R
    created: float
    idle_since: float


class Checkout(Generic[R]):
    """One resource out of the pool; `broken()` keeps it from being reused."""

    def __init__(self, resource: R) -> None:
        self.resource = resource
        self.is_broken = False

    def broken(self) -> None:
        self.is_broken = True


class ResourcePool(Generic[R]):
    """At most `max_size` resources from `factory`, reused, checked, retired."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], R],
        *,
        max_size: int,
        check: Callable[[R], bool] | None = None,
        close: Callable[[R], None] | None = None,
        checkout_timeout: float = 5.0,
        idle_timeout: float = 300.0,
        max_lifetime: float = 3600.0,
        broken_on: tuple[type[BaseException], ...] = (),
        on_count: Callable[[str, float], None] | None = None,
        on_level: Callable[[int, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise PolicyConfigError(f"pool {name}: max_size must be >= 1, got {max_size}")
        timings = {"checkout_timeout": checkout_timeout, "idle_timeout": idle_timeout,
                   "max_lifetime": max_lifetime}  # fmt: skip
        for what, value in timings.items():
            if not value > 0:
                raise PolicyConfigError(f"pool {name}: {what} must be > 0, got {value}")
        self.name = name
        self.max_size = max_size
        self._factory = factory
        self._check = check
        self._close = close
        self._timeout = checkout_timeout
        self._idle_timeout = idle_timeout
        self._max_lifetime = max_lifetime
        self._broken_on = broken_on
        self._count = on_count or (lambda kind, value: None)
        self._level = on_level or (lambda in_use, idle: None)
        self._clock = clock
        self._idle: deque[_Slot[R]] = deque()
        self._out = 0  # checked out, or being made for a checkout
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._out

    @property
    def idle(self) -> int:
        with self._cond:
            return len(self._idle)

    @contextlib.contextmanager
    def checkout(self, timeout: float | None = None) -> Iterator[Checkout[R]]:
        """A resource for the `with` block; given back (or closed, if broken) after it."""
        slot = self._take(self._timeout if timeout is None else timeout)
        out = Checkout(slot.resource)
        try:
            yield out
        except self._broken_on:
            out.broken()
            raise
        finally:
            self._give_back(slot, out.is_broken)

    def _take(self, timeout: float) -> _Slot[R]:
        started = self._clock()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._idle and self._out >= self.max_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._count("timed_out", 1)
                    raise PoolExhausted(
                        f"pool {self.name}: no resource free within {timeout:g} s "
                        f"({self.max_size} in use)"
                    )
                self._cond.wait(left)
            self._out += 1
            slot = self._idle.popleft() if self._idle else None
            self._level(self._out, len(self._idle))
        self._count("waited_seconds", max(0.0, self._clock() - started))
        if slot is not None and self._usable(slot):
            return slot
        if slot is not None:
            self._retire(slot.resource)
        return self._make()

    def _usable(self, slot: _Slot[R]) -> bool:
        now = self._clock()
        if now - slot.idle_since > self._idle_timeout or now - slot.created > self._max_lifetime:
            return False
        if self._check is None:
            return True
        try:
            return bool(self._check(slot.resource))
        except Exception:
            return False

    def _make(self) -> _Slot[R]:
        try:
            resource = self._factory()
        except Exception as exc:
            with self._cond:
                self._out -= 1
                self._level(self._out, len(self._idle))
                self._cond.notify()
            self._count("failed", 1)
            raise PoolError(f"pool {self.name}: could not make a resource: {exc}") from exc
        self._count("created", 1)
        now = self._clock()
        return _Slot(resource, now, now)

    def _retire(self, resource: R) -> None:
        self._count("closed", 1)
        if self._close is not None:
            with contextlib.suppress(Exception):
                self._close(resource)

    def _give_back(self, slot: _Slot[R], broken: bool) -> None:
        if broken:
            self._retire(slot.resource)
        with self._cond:
            self._out -= 1
            if not broken:
                slot.idle_since = self._clock()
                self._idle.append(slot)
            self._level(self._out, len(self._idle))
            self._cond.notify()

    def close(self) -> None:
        """Close every idle resource (one checked out now comes back to the pool as usual)."""
        with self._cond:
            idle, self._idle = list(self._idle), deque()
            self._level(self._out, 0)
        for slot in idle:
            self._retire(slot.resource)
