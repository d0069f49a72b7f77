"""The tiered cache on a real redis-server: levels, invalidation across two processes,
one fill for a stampede, a Redis that is not there, and hostile values and keys."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import redis

from policies import events, keys
from policies.cache import TieredCache
from policies.errors import PolicyConfigError
from tests.conftest import NOWHERE
from tests.kit import ROOT


def test_a_fill_then_l1_then_l2_hits(r: redis.Redis) -> None:
    counts: Counter[str] = Counter()
    cache = TieredCache("stock", r, ttl=30, on_count=lambda k, v: counts.update({k: 1}))
    fills: list[str] = []
    assert cache.get_or_fill("sku-1", lambda: fills.append("x") or {"level": 5}) == {"level": 5}
    assert cache.get_or_fill("sku-1", lambda: fills.append("x") or {"level": 0}) == {"level": 5}
    other = TieredCache("stock", redis.Redis(connection_pool=r.connection_pool),
                        on_count=lambda k, v: counts.update({k: 1}))  # fmt: skip
    assert other.get_or_fill("sku-1", lambda: {"level": -1}) == {"level": 5}  # from L2
    assert fills == ["x"] and counts["hit_l1"] == 1 and counts["hit_l2"] == 1
    assert counts["miss"] == 1 and counts["fill"] == 1
    assert 0 < r.pttl(keys.key("cache", "stock", "v:sku-1")) <= 30_000


CHILD = """
import sys, time, redis
from policies.cache import TieredCache
from policies.watch import feed_for
client = redis.Redis.from_url(sys.argv[1])
cache = TieredCache("stock", client, ttl=30)
fills = []
first = cache.get_or_fill("sku-1", lambda: fills.append(1) or "child-filled")
assert feed_for(client).wait_healthy(5)  # subscribed: an invalidation cannot be missed
print("first", first, flush=True)
end = time.monotonic() + 10
while time.monotonic() < end:   # L1 answers until the invalidation reaches this process
    value = cache.get_or_fill("sku-1", lambda: fills.append(1) or "refilled")
    if fills:
        print("after", value, flush=True)
        break
    time.sleep(0.02)
"""


def test_an_invalidation_reaches_another_process(r: redis.Redis, redis_url: str) -> None:
    cache = TieredCache("stock", r, ttl=30)
    cache.get_or_fill("sku-1", lambda: "filled-here")
    child = subprocess.Popen([sys.executable, "-c", CHILD, redis_url], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert child.stdout is not None
    assert child.stdout.readline().split() == ["first", "filled-here"]  # its L2 hit
    cache.invalidate("sku-1")  # the child's L1 holds the value, and it is subscribed
    assert child.stdout.readline().split() == ["after", "refilled"]
    assert child.wait(10) == 0


def test_a_stampede_of_32_misses_makes_one_fill(r: redis.Redis) -> None:
    fills, start = [], threading.Barrier(32)
    results: list[object] = []

    def fill() -> str:
        fills.append(1)
        time.sleep(0.3)  # a slow dependency
        return "v"

    def lookup() -> None:
        # fill_wait well above the fill's 0.3 s, even on a loaded CI box
        cache = TieredCache("slow", redis.Redis(connection_pool=r.connection_pool), ttl=30,
                            fill_wait=10)  # fmt: skip
        start.wait()
        results.append(cache.get_or_fill("hot", fill))

    threads = [threading.Thread(target=lookup) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == ["v"] * 32 and len(fills) == 1


def test_without_redis_it_runs_on_l1_and_says_so() -> None:
    recorder = events.Recorder()
    cache = TieredCache("stock", redis.Redis.from_url(NOWHERE, socket_connect_timeout=0.5),
                        emitter=events.Emitter(recorder))  # fmt: skip
    fills: list[int] = []
    assert cache.get_or_fill("sku-1", lambda: fills.append(1) or 7) == 7
    assert cache.get_or_fill("sku-1", lambda: fills.append(1) or 8) == 7  # L1
    assert fills == [1] and cache.degraded
    (lost,) = recorder.of(events.StoreUnavailable)
    assert lost.name == "stock" and "L1 only" in lost.mode  # type: ignore[attr-defined]


def test_none_is_kept_only_with_a_negative_ttl(r: redis.Redis) -> None:
    plain, negative = TieredCache("a", r), TieredCache("b", r, negative_ttl=5)
    calls: Counter[str] = Counter()
    for _ in range(2):
        plain.get_or_fill("k", lambda: calls.update({"a": 1}))
        negative.get_or_fill("k", lambda: calls.update({"b": 1}))
    assert calls == {"a": 2, "b": 1}
    assert 0 < r.pttl(keys.key("cache", "b", "v:k")) <= 5000


def test_hostile_values_and_keys(r: redis.Redis) -> None:
    counts: Counter[str] = Counter()
    cache = TieredCache("h", r, max_value_bytes=100, on_count=lambda k, v: counts.update({k: 1}))
    assert cache.get_or_fill("big", lambda: "x" * 500) == "x" * 500  # kept in L1 only
    assert not r.exists(keys.key("cache", "h", "v:big"))
    assert cache.get_or_fill("odd", lambda: {1, 2}) == {1, 2}  # not JSON: L1 only
    r.set(keys.key("cache", "h", "v:bad"), b"\xff{not json")
    assert cache.get_or_fill("bad", lambda: "fresh") == "fresh"  # a corrupt L2 value: a fill
    assert counts["too_large"] == 1 and counts["unstorable"] == 1 and counts["corrupt"] == 1
    for key in ("", "a b", "x" * 600, "{tag}"):
        with pytest.raises(PolicyConfigError, match="safe characters"):
            cache.get_or_fill(key, lambda: 1)
    with pytest.raises(PolicyConfigError, match="ttl > 0"):
        TieredCache("h", r, ttl=0)


def test_a_fill_that_outlived_its_lock_leaves_the_next_fillers_lock(r: redis.Redis) -> None:
    cache = TieredCache("slow", r)
    lock = keys.key("cache", "slow", "fill:k")

    def fill() -> str:
        r.set(lock, "another-filler")  # ours expired meanwhile; another process took it
        return "v"

    assert cache.get_or_fill("k", fill) == "v"
    assert r.get(lock) == b"another-filler"
