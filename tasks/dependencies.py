"""Stand-ins for the downstream services the catalogue calls.

Each simulated dependency reads its condition from the broker's Redis (not
the policies' Redis: a dependency is somewhere else), so every worker in the
fleet sees the same outage: `bulwark demo` (or a test) sets it with
`set_outage(...)`. A call takes a short simulated latency, then returns, or, if
the dependency is down by then, raises `DependencyDown` (a `ConnectionError`, so
it is classified transient), as a service that stops answering mid-call does.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from policies import keys
from workers.resources import broker_redis


class DependencyDown(ConnectionError):
    """The simulated dependency is unreachable."""


@dataclass(frozen=True, slots=True)
class Dependency:
    name: str
    latency: float = 0.01

    @property
    def _outage_key(self) -> str:
        return keys.key("demo", self.name, "outage")

    @property
    def _latency_key(self) -> str:
        return keys.key("demo", self.name, "latency")

    @property
    def _calls_key(self) -> str:
        return keys.key("demo", self.name, "calls")

    def call(self, operation: str, **params: Any) -> str:
        client = broker_redis()
        with client.pipeline(transaction=False) as pipe:
            pipe.incr(self._calls_key)
            pipe.get(self._latency_key)
            _, slow = pipe.execute()
        time.sleep(float(slow) if slow is not None else self.latency)
        if client.exists(self._outage_key):
            raise DependencyDown(f"{self.name} is unreachable ({operation})")
        return uuid.uuid4().hex[:12]

    def set_outage(self, seconds: float) -> None:
        """Make the dependency fail for `seconds` (0 ends the outage now)."""
        client = broker_redis()
        if seconds <= 0:
            client.delete(self._outage_key)
        else:
            client.set(self._outage_key, "1", px=int(seconds * 1000))

    def set_latency(self, seconds: float | None) -> None:
        """Make every call take `seconds` (None: the default latency again)."""
        client = broker_redis()
        if seconds is None:
            client.delete(self._latency_key)
        else:
            client.set(self._latency_key, repr(float(seconds)))

    def calls(self) -> int:
        return int(broker_redis().get(self._calls_key) or 0)


def dependency(name: str) -> Dependency:
    return Dependency(name)
