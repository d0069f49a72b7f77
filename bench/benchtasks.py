"""Tasks for the benchmarks: the same body, plain and through breaker + bulkhead.

Run a worker with `celery -A bench.benchtasks worker`; the body only counts
itself, so what differs between the two is what the policies cost.
"""

from __future__ import annotations

import time

from policies import keys
from workers.app import app
from workers.registry import registry
from workers.resources import policy_redis
from workers.task import ResilientTask

DONE = keys.key("bench", "tasks", "done")

registry.breaker("bench")
registry.bulkhead("bench", limit=64)


@app.task(name="bench.plain", ignore_result=True)
def plain(i: int) -> None:
    policy_redis().incr(DONE)


@app.task(
    name="bench.guarded",
    base=ResilientTask,
    breaker="bench",
    bulkhead="bench",
    ignore_result=True,
)
def guarded(i: int) -> None:
    policy_redis().incr(DONE)


@app.task(name="bench.sleep", ignore_result=True)
def sleep(i: int) -> None:
    time.sleep(0.010)
    policy_redis().incr(DONE)


@app.task(
    name="bench.guarded_sleep",
    base=ResilientTask,
    breaker="bench",
    bulkhead="bench",
    ignore_result=True,
)
def guarded_sleep(i: int) -> None:
    time.sleep(0.010)
    policy_redis().incr(DONE)


__all__ = ["app", "guarded", "guarded_sleep", "plain", "sleep"]
