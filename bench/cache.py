"""The tiered cache on the demo's workload: hit ratio, and what an L1 and an L2 hit cost.

    .venv/bin/python bench/cache.py [--lookups 4000] [--processes 6]

On a private redis-server. The demo looks stock levels up 1.25 times a second (a
quarter of its 5 jobs/s), SKUs drawn as `tasks.demo.popular_sku` draws them, cached
`tasks.catalogue.STOCK_TTL` seconds (60). The bench replays that stream 100 times
faster with the TTL 100 times shorter (the same lookups per TTL, so the same ratio),
spread over `--processes` caches (one L1 each, the pool's processes; one L2). Then it
times an L1 hit, an L2 hit (a fresh L1) and, for reference, a bare Redis GET.
Figures, not asserts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from policies.cache import TieredCache  # noqa: E402
from tasks.catalogue import STOCK_TTL  # noqa: E402
from tasks.demo import popular_sku  # noqa: E402
from workers.ops.embedded import EmbeddedRedis  # noqa: E402

DEMO_RATE = 1.25  # stock lookups a second in the demo
SPEED = 100.0


def timed(call: object, n: int = 2000) -> float:
    """Median seconds of `call()` over `n` calls."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=4000)
    parser.add_argument("--processes", type=int, default=6)
    args = parser.parse_args()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        counts: Counter[str] = Counter()
        caches = [
            TieredCache(
                "stock",
                redis.Redis.from_url(server.url),
                ttl=STOCK_TTL / SPEED,
                on_count=lambda kind, value: counts.update({kind: 1}),
            )
            for _ in range(args.processes)
        ]
        every = 1.0 / (DEMO_RATE * SPEED)
        start = time.monotonic()
        for i in range(args.lookups):
            caches[i % len(caches)].get_or_fill(popular_sku(), lambda: {"level": 1})
            time.sleep(max(0.0, start + (i + 1) * every - time.monotonic()))
        hits = counts["hit_l1"] + counts["hit_l2"]
        lookups = hits + counts["miss"]
        print(f"demo workload ({args.lookups} lookups over {args.processes} processes, "
              f"TTL {STOCK_TTL:g} s at {DEMO_RATE:g}/s, replayed x{SPEED:g}):")  # fmt: skip
        print(f"  hit ratio {hits / lookups:.1%} (L1 {counts['hit_l1'] / lookups:.1%}, "
              f"L2 {counts['hit_l2'] / lookups:.1%}), fills {counts['fill']}")  # fmt: skip

        warm = TieredCache("latency", client, ttl=600)
        warm.get_or_fill("k", lambda: {"level": 1})
        l1 = timed(lambda: warm.get_or_fill("k", lambda: {"level": 1}))

        def l2_hit() -> None:
            warm.clear_local()
            warm.get_or_fill("k", lambda: {"level": 1})

        l2 = timed(l2_hit)
        get = timed(lambda: client.get("k"))
        print(f"  an L1 hit {l1 * 1e6:.1f} µs, an L2 hit {l2 * 1e6:.0f} µs, "
              f"a bare Redis GET {get * 1e6:.0f} µs (median)")  # fmt: skip


if __name__ == "__main__":
    main()
