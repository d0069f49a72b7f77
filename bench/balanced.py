"""A balanced task for `bench/balancing.py`: spread over four shard queues by the strategy
named in BENCH_STRATEGY (least_backlog by default); each run sleeps BENCH_SLEEP s (0.05)
and counts itself per shard.

    celery -A bench.balanced worker -Q shard.0
"""

from __future__ import annotations

import os
import time
from typing import Any

from policies import keys
from policies.routing import Balance
from workers.app import app
from workers.resources import policy_redis

SHARDS = tuple(f"shard.{i}" for i in range(4))
STRATEGY = os.environ.get("BENCH_STRATEGY", "least_backlog")
SLEEP = float(os.environ.get("BENCH_SLEEP", "0.05"))


@app.task(name="bench.shard", bind=True, ignore_result=True,
          balance=Balance(strategy=STRATEGY, targets=SHARDS))  # fmt: skip
def shard(self: Any, i: int) -> None:
    time.sleep(SLEEP)
    queue = (self.request.delivery_info or {}).get("routing_key", "?")
    policy_redis().hincrby(keys.key("bench", "shards", "done"), str(queue), 1)


__all__ = ["SHARDS", "app", "shard"]
