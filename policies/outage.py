"""Redis outages of one policy instance: said once, said when over, probed sparingly.

Every policy degrades to local, in-process state while Redis is unreachable.
`Outage` is the bookkeeping they share: the first failure emits
`StoreUnavailable` (once per outage), the first success after it emits
`StoreRestored`, and meanwhile Redis is tried again at most every
`probe_interval` seconds, so callers do not each wait for a connect timeout.

    outage = Outage(policy="retry-budget", name="payments", mode="local per-process budget")
    value = outage.call(lambda: shared_store.read(), lambda: local_store.read())
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from policies import events
from policies.clock import Clock

__all__ = ["STORE_ERRORS", "Outage"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: What "Redis is unreachable" looks like to a policy.
STORE_ERRORS = (redis.RedisError, ConnectionError, TimeoutError, OSError)


class Outage:
    """The Redis outages of one policy instance (thread-safe)."""

    def __init__(
        self,
        *,
        policy: str,
        name: str,
        mode: str,
        emitter: events.Emitter | None = None,
        probe_interval: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.policy = policy
        self.name = name
        #: What the policy does meanwhile (the `mode` of StoreUnavailable).
        self.mode = mode
        self.emitter = emitter or events.default_emitter
        #: Seconds between attempts to reach Redis while it is down.
        self.probe_interval = probe_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._down = False
        self._next_probe = 0.0

    @property
    def down(self) -> bool:
        """True from a failure until the next success."""
        return self._down

    def should_try(self) -> bool:
        """Whether to ask Redis now: always while up, once per `probe_interval` while down."""
        return not self._down or self._clock() >= self._next_probe

    def next_try_in(self) -> float:
        """Seconds until Redis is due another try (0 while up)."""
        return max(0.0, self._next_probe - self._clock()) if self._down else 0.0

    def failed(self, exc: BaseException) -> bool:
        """Redis failed: schedule the next probe; True (and StoreUnavailable) on the first."""
        with self._lock:
            self._next_probe = self._clock() + self.probe_interval
            first, self._down = not self._down, True
        if first:
            error = str(exc) or repr(exc)
            logger.warning(
                "%s %r: Redis unreachable (%s); %s", self.policy, self.name, error, self.mode
            )
            self.emitter.emit(
                events.StoreUnavailable(
                    policy=self.policy, name=self.name, error=error, mode=self.mode
                )
            )
        return first

    def ok(self) -> bool:
        """Redis answered: True (and StoreRestored) if that ends an outage."""
        if not self._down:
            return False
        with self._lock:
            was, self._down = self._down, False
        if was:
            logger.info("%s %r: Redis reachable again", self.policy, self.name)
            self.emitter.emit(events.StoreRestored(policy=self.policy, name=self.name))
        return was

    def call(self, remote: Callable[[], T] | None, local: Callable[[], T]) -> T:
        """`remote()` unless Redis is down (or there is no remote), else `local()`."""
        if remote is None or not self.should_try():
            return local()
        try:
            result = remote()
        except STORE_ERRORS as exc:
            self.failed(exc)
            return local()
        self.ok()
        return result
