"""Resource pools per dependency, sized from its bulkhead share in this process.

    conn_pool = pool_for("payments", connect, check=ping, close=disconnect)
    with conn_pool.checkout() as out:
        out.resource.send(...)

    http = http_pool("payments")  # urllib3's pool, bounded the same way
    http.request("GET", url)

A process never holds more of a dependency's bulkhead permits than it runs tasks at
once (`concurrency`: 1 in a prefork child, the thread count in a threads pool), nor more
than the bulkhead's limit: that is its share, and the pool's size. Pools are built once
per process (a pool child builds its own after the fork). The generic pool is
`policies.pool.ResourcePool`; HTTP uses urllib3's `PoolManager` (a well-kept pool) with
`maxsize` at the share and `block=True`, so a burst waits for a connection instead of
opening more. Counts go to `bulwark_pool_events_total{pool, event}` (created, closed,
failed, timed_out) and `bulwark_pool_wait_seconds_total{pool}`; the generic pool's
resources in use and idle to `bulwark_pool_in_use{pool}` and `bulwark_pool_idle{pool}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import urllib3

from policies.pool import ResourcePool
from workers.resources import PerProcess, policy
from workers.telemetry.metrics import metrics

__all__ = ["http_pool", "pool_for", "share"]

R = TypeVar("R")

_pools: PerProcess[ResourcePool[Any]] = PerProcess()
_http: PerProcess[urllib3.PoolManager] = PerProcess()


def share(dependency: str, concurrency: int = 1) -> int:
    """How many of `dependency`'s resources this process can use at once."""
    limit = policy("bulkhead", dependency).config.limit
    return max(1, min(int(limit), max(1, concurrency)))


def _counter(name: str) -> Callable[[str, float], None]:
    def count(kind: str, value: float) -> None:
        if kind == "waited_seconds":
            metrics().pool_wait.labels(pool=name).inc(value)
        else:
            metrics().pool.labels(pool=name, event=kind).inc(value)

    return count


def _level(name: str) -> Callable[[int, int], None]:
    def level(in_use: int, idle: int) -> None:
        metrics().pool_in_use.labels(pool=name).set(in_use)
        metrics().pool_idle.labels(pool=name).set(idle)

    return level


def pool_for(dependency: str, factory: Callable[[], R], *, concurrency: int = 1,
             **options: Any) -> ResourcePool[R]:  # fmt: skip
    """This process's pool of `factory`'s resources for `dependency` (options: see
    `ResourcePool`; the first call's are kept)."""
    return _pools.get(dependency, lambda: ResourcePool(
        dependency, factory, max_size=share(dependency, concurrency),
        on_count=_counter(dependency), on_level=_level(dependency), **options,
    ))  # fmt: skip


def http_pool(dependency: str, *, concurrency: int = 1, timeout: float = 10.0,
              retries: int = 0) -> urllib3.PoolManager:  # fmt: skip
    """This process's urllib3 pool for `dependency`'s HTTP endpoints (bounded at the share;
    retries off by default: the task's retry policy decides)."""
    return _http.get(dependency, lambda: urllib3.PoolManager(
        maxsize=share(dependency, concurrency), block=True,
        timeout=urllib3.Timeout(total=timeout), retries=retries,
    ))  # fmt: skip
