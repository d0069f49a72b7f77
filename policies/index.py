"""Which instances of a policy exist in Redis: one set of names per policy.

Listing breakers, bulkheads or services by SCAN costs a round trip per batch
of the whole keyspace. Instead each Redis store adds a name to its policy's
set (`keys.index(policy)`) when it changes that instance's state, and readers
take `SMEMBERS` then pipeline one snapshot per name: two round trips, however
large the keyspace. A store adds a name again every `refresh` seconds (one
SADD), so a Redis that restarted empty, or was flushed, learns the names of
the instances still in use within that time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from policies import keys
from policies.clock import Clock, monotonic

__all__ = ["NameIndex", "Reader", "read_all"]

T = TypeVar("T")
#: Reads one entry's value out of `pipe.execute(raise_on_error=False)`'s results.
Reader = Callable[[Sequence[Any]], T]


class NameIndex:
    """The set of instance names of one policy, in Redis."""

    def __init__(
        self, client: redis.Redis, policy: str, *, refresh: float = 10.0, clock: Clock = monotonic
    ) -> None:
        self._client = client
        self.key = keys.index(policy)
        self.refresh = refresh
        self._clock = clock
        self._due: dict[str, float] = {}

    def _is_due(self, name: str) -> bool:
        now = self._clock()
        if now < self._due.get(name, now):
            return False
        self._due[name] = now + self.refresh
        return True

    def add(self, name: str) -> None:
        """Record `name`: one SADD if it is due (first use, or `refresh` s since), else nothing."""
        if self._is_due(name):
            self._client.sadd(self.key, name)

    def queue_add(self, pipe: redis.client.Pipeline, name: str) -> None:
        """`add`, queued on a caller's pipeline: no round trip of its own."""
        if self._is_due(name):
            pipe.sadd(self.key, name)

    def names(self) -> list[str]:
        return decode_names(self._client.smembers(self.key))


def decode_names(raw: Sequence[Any] | set[Any]) -> list[str]:
    """Sorted text names from an SMEMBERS reply."""
    return sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)


def read_all(
    client: redis.Redis, policy: str, queue: Callable[[redis.client.Pipeline, str], Reader[T]]
) -> list[T]:
    """One snapshot per indexed name of `policy`: SMEMBERS, then one pipeline of `queue`s."""
    names = NameIndex(client, policy).names()
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    readers = [queue(pipe, name) for name in names]
    results = pipe.execute(raise_on_error=False)
    return [read(results) for read in readers]


def raise_error(raw: Any) -> Any:
    """`raw`, unless it is the error a pipeline returned in its place: then raise it."""
    if isinstance(raw, BaseException):
        raise raw
    return raw
