"""The tiered cache (`policies.cache`) for tasks: one per name and process, on the policy
Redis, counting into the process's metrics.

    stock = cached("catalog.stock", ttl=60)
    level = stock.get_or_fill(sku, lambda: gateway.call("stock", sku=sku))

A cache is built once per process (a pool child builds its own after the fork) and
counts into `bulwark_cache_events_total{cache, event}` and
`bulwark_cache_fill_seconds_total{cache}`; `bulwark status` shows each cache's hit ratio
from the fleet's counts, booked in Redis every `BOOK_EVERY` lookups or `BOOK_AFTER`
seconds (`hit_ratios`).
"""

from __future__ import annotations

import time
from typing import Any

from policies import keys
from policies.cache import TieredCache
from workers.resources import PerProcess, policy_redis
from workers.telemetry.metrics import metrics

__all__ = ["cached", "hit_ratios"]

_caches: PerProcess[TieredCache] = PerProcess()
#: Fleet-wide counts per cache (a hash: event -> count), for `bulwark status`.
STATS_KEY = keys.key("cache", "fleet", "stats")
_COUNTED = ("hit_l1", "hit_l2", "miss")


def cached(name: str, **options: Any) -> TieredCache:
    """This process's tiered cache `name` (options: see `TieredCache`; the first call's
    options are kept)."""
    return _caches.get(
        name, lambda: TieredCache(name, policy_redis(), on_count=_counter(name), **options)
    )


#: Lookups counted in the process before they are booked in Redis (or seconds, if sooner).
BOOK_EVERY = 20
BOOK_AFTER = 2.0


def _counter(name: str) -> Any:
    pending: dict[str, int] = {}
    booked = [time.monotonic()]

    def count(kind: str, value: float) -> None:
        if kind == "fill_seconds":
            metrics().cache_fill.labels(cache=name).inc(value)
            return
        metrics().cache.labels(cache=name, event=kind).inc(value)
        if kind in _COUNTED:  # fleet-wide, for the hit ratio: booked now and then
            pending[kind] = pending.get(kind, 0) + int(value)
            now = time.monotonic()
            if sum(pending.values()) >= BOOK_EVERY or now - booked[0] >= BOOK_AFTER:
                booked[0] = now
                _book(name, pending)

    return count


def _book(name: str, pending: dict[str, int]) -> None:
    counts = dict(pending)
    pending.clear()
    try:
        pipe = policy_redis().pipeline(transaction=False)
        for kind, n in counts.items():
            pipe.hincrby(STATS_KEY, f"{name}:{kind}", n)
        pipe.execute()
    except Exception:
        return


def hit_ratios(client: Any) -> dict[str, float]:
    """Per cache, the fleet's hit ratio so far (L1 and L2 hits over lookups)."""
    totals: dict[str, dict[str, int]] = {}
    for field, value in client.hgetall(STATS_KEY).items():
        name, _, kind = field.decode(errors="replace").rpartition(":")
        try:
            totals.setdefault(name, {})[kind] = int(value)
        except ValueError:
            continue
    ratios = {}
    for name, counts in totals.items():
        hits = counts.get("hit_l1", 0) + counts.get("hit_l2", 0)
        lookups = hits + counts.get("miss", 0)
        if lookups:
            ratios[name] = hits / lookups
    return ratios
