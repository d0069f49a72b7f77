"""A two-level cache for idempotent dependency calls: in-process (L1), then Redis (L2).

`TieredCache(name, client).get_or_fill(key, fill)` answers from L1 (a bounded
cachetools TTL cache of this process), else from L2 (Redis, shared by the fleet:
JSON values of at most `max_value_bytes`), else calls `fill()` and keeps the result
in both. Only one process of the fleet fills a key at a time (a Redis lock with a
short TTL): the others poll L2 for up to `fill_wait` seconds, then fill themselves
rather than fail. `invalidate(key)` deletes it from L2 and publishes it, so every
process drops it from L1 (`policies.watch`). `None` results are kept only with a
`negative_ttl`.

While Redis cannot be reached the cache works on L1 alone, says so once (a
`StoreUnavailable` event) and never fails the call: a Redis error only turns into a
fill. Counts per level (hits, misses, fills, fill seconds, L1 evictions) go to
`on_count(kind, value)`, which the worker tier turns into metrics.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
from cachetools import TTLCache

from policies import events, keys
from policies.errors import PolicyConfigError
from policies.scripts import Scripts
from policies.watch import feed_for

__all__ = ["TieredCache"]

T = TypeVar("T")

#: What L1 and L2 keep for a `None` result (negative caching).
_NONE = {"__bulwark_none__": True}
_MISSING = object()

Counter = Callable[[str, float], None]


class _Evicting(TTLCache):  # type: ignore[type-arg]
    """cachetools' TTL cache, counting what it evicts for room (not what expired)."""

    def __init__(self, maxsize: int, ttl: float, on_evict: Callable[[], None]) -> None:
        super().__init__(maxsize, ttl)
        self._on_evict = on_evict

    def popitem(self) -> Any:
        item = super().popitem()
        self._on_evict()
        return item


class TieredCache:
    """L1 in this process, L2 in Redis, one fill per key fleet-wide at a time."""

    def __init__(
        self,
        name: str,
        client: redis.Redis,
        *,
        ttl: float = 60.0,
        l1_size: int = 1024,
        l1_ttl: float | None = None,
        negative_ttl: float | None = None,
        max_value_bytes: int = 64 * 1024,
        fill_wait: float = 2.0,
        on_count: Counter | None = None,
        emitter: events.Emitter | None = None,
    ) -> None:
        if not (ttl > 0 and l1_size >= 1 and max_value_bytes >= 1 and fill_wait >= 0):
            raise PolicyConfigError(
                f"cache {name}: ttl > 0, l1_size >= 1, max_value_bytes >= 1 and "
                f"fill_wait >= 0, got {ttl}, {l1_size}, {max_value_bytes}, {fill_wait}"
            )
        if negative_ttl is not None and negative_ttl <= 0:
            raise PolicyConfigError(f"cache {name}: negative_ttl must be > 0, got {negative_ttl}")
        self.name = name
        self.client = client
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_value_bytes = max_value_bytes
        self.fill_wait = fill_wait
        self._count = on_count or (lambda kind, value: None)
        self._emitter = emitter or events.default_emitter
        self._l1 = _Evicting(l1_size, min(l1_ttl or ttl, ttl), lambda: self._count("evicted", 1))
        self._lock = threading.Lock()
        self._scripts = Scripts(client)
        self._watching = False
        self._outage = False

    # -- keys -----------------------------------------------------------------------------

    def _value_key(self, key: str) -> str:
        return keys.key("cache", self.name, f"v:{key}")

    def _fill_key(self, key: str) -> str:
        return keys.key("cache", self.name, f"fill:{key}")

    @property
    def channel(self) -> str:
        return keys.channel("cache", self.name)

    # -- reading ---------------------------------------------------------------------------

    def get_or_fill(self, key: str, fill: Callable[[], T]) -> T:
        """The cached value of `key`, or `fill()`'s, kept for the next caller."""
        if not isinstance(key, str) or not 0 < len(key) <= 512 or not keys.safe(key):
            raise PolicyConfigError(
                f"cache {self.name}: a key is 1-512 safe characters, got {key!r}"
            )
        with self._lock:
            found = self._l1.get(key, _MISSING)
        if found is not _MISSING:
            self._count("hit_l1", 1)
            return cast(T, self._decode(found))
        try:
            self._watch()
            value = self._read_l2(key)
            self._restored()
            if value is not _MISSING:
                self._keep_l1(key, value)
                self._count("hit_l2", 1)
                return cast(T, self._decode(value))
            self._count("miss", 1)
            return self._fill_shared(key, fill)
        except (redis.RedisError, OSError) as exc:
            self._lost(exc)
            self._count("miss", 1)
            return self._fill_local(key, fill)

    def _fill_shared(self, key: str, fill: Callable[[], T]) -> T:
        lock_ms = max(1, int((self.fill_wait + 5.0) * 1000))
        token = f"{time.time_ns()}:{threading.get_ident()}"
        if self.client.set(self._fill_key(key), token, nx=True, px=lock_ms):
            try:
                value = self._fill_local(key, fill)
                self._store_l2(key, value)
                return value
            finally:  # only its own lock: one that expired may be another filler's now
                self._scripts["release_if_held"](keys=[self._fill_key(key)], args=[token])
        end = time.monotonic() + self.fill_wait  # another process fills: wait for it briefly
        while time.monotonic() < end:
            time.sleep(0.02)
            value = self._read_l2(key)
            if value is not _MISSING:
                self._keep_l1(key, value)
                self._count("hit_l2", 1)
                return cast(T, self._decode(value))
        return self._fill_local(key, fill)

    def _fill_local(self, key: str, fill: Callable[[], T]) -> T:
        started = time.perf_counter()
        value = fill()
        self._count("fill", 1)
        self._count("fill_seconds", time.perf_counter() - started)
        if value is not None or self.negative_ttl is not None:
            self._keep_l1(key, _NONE if value is None else value)
        return value

    def _store_l2(self, key: str, value: Any) -> None:
        if value is None and self.negative_ttl is None:
            return
        ttl = self.negative_ttl if value is None else self.ttl
        try:
            raw = json.dumps(_NONE if value is None else value, separators=(",", ":"))
        except (TypeError, ValueError):  # not JSON: kept in L1 only
            self._count("unstorable", 1)
            return
        if len(raw.encode()) > self.max_value_bytes:
            self._count("too_large", 1)
            return
        self.client.set(self._value_key(key), raw, px=max(1, int((ttl or self.ttl) * 1000)))

    def _keep_l1(self, key: str, value: Any) -> None:
        with self._lock:
            self._l1[key] = value

    @staticmethod
    def _decode(value: Any) -> Any:
        return None if value == _NONE else value

    def _read_l2(self, key: str) -> Any:
        """The value L2 holds for `key`, or `_MISSING` (also for one that does not decode:
        counted, and filled anew)."""
        raw = self.client.get(self._value_key(key))
        if raw is None:
            return _MISSING
        try:
            return json.loads(raw)
        except ValueError:
            self._count("corrupt", 1)
            return _MISSING

    # -- invalidation ------------------------------------------------------------------------

    def clear_local(self) -> None:
        """Empty this process's L1 (L2 and the other processes keep theirs)."""
        with self._lock:
            self._l1.clear()

    def invalidate(self, key: str) -> None:
        """Drop `key` here, in Redis, and (published) in every process's L1."""
        with self._lock:
            self._l1.pop(key, None)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self._value_key(key))
        pipe.publish(self.channel, key)
        pipe.execute()

    def _watch(self) -> None:
        if not self._watching:
            feed_for(self.client).watch(self.channel, self._on_message)
            self._watching = True

    def _on_message(self, payload: bytes | None) -> None:
        with self._lock:
            if payload is None:  # the feed lost its connection: anything may have changed
                self._l1.clear()
            else:
                self._l1.pop(payload.decode(errors="replace"), None)

    # -- outage --------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            self._emitter.emit(events.StoreUnavailable(
                policy="cache", name=self.name, error=f"{type(exc).__name__}: {exc}",
                mode="L1 only: misses fill from the dependency"))  # fmt: skip

    def _restored(self) -> None:
        if self._outage:
            self._outage = False
            with self._lock:
                self._l1.clear()  # invalidations may have been missed meanwhile
            self._emitter.emit(events.StoreRestored(policy="cache", name=self.name))

    @property
    def degraded(self) -> bool:
        """True while Redis cannot be reached (L1 only)."""
        return self._outage
