"""Tasks for the benchmarks: the same bodies (a no-op, a 10 ms sleep), plain and through
breaker + bulkhead.

Run a worker with `celery -A bench.benchtasks worker`; the body only counts
itself, so what differs between the two is what the policies cost.
"""

from __future__ import annotations

import functools
import os
import time

import redis
from celery import current_task

from bench import gaps  # noqa: F401 - the bench's own measure, with BENCH_GAPS_DIR
from policies import keys
from workers.app import app
from workers.registry import registry
from workers.resources import policy_redis
from workers.task import ResilientTask

DONE = keys.key("bench", "tasks", "done")

registry.breaker("bench")
registry.bulkhead("bench", limit=64)


#: The options of the guarded tasks: one breaker and one bulkhead, shared by the fleet.
GUARDED = {"base": ResilientTask, "breaker": "bench", "bulkhead": "bench", "ignore_result": True}


#: bench/backends.py --failover: each task's finish time goes to this Redis (one that
#: stays up) instead of the count on the policy store (whose master it kills).
RECORD_URL = os.environ.get("BENCH_RECORD_URL")
FINISHED = keys.key("bench", "tasks", "finished")


@functools.cache
def _record() -> redis.Redis:
    assert RECORD_URL is not None
    return redis.Redis.from_url(RECORD_URL)


def _done() -> None:
    if RECORD_URL:
        _record().zadd(FINISHED, {str(current_task.request.id): time.time()})
        return
    policy_redis().incr(DONE)


@app.task(name="bench.plain", ignore_result=True)
def plain(i: int) -> None:
    _done()


@app.task(name="bench.guarded", **GUARDED)
def guarded(i: int) -> None:
    _done()


@app.task(name="bench.sleep", ignore_result=True)
def sleep(i: int) -> None:
    time.sleep(0.010)
    _done()


@app.task(name="bench.guarded_sleep", **GUARDED)
def guarded_sleep(i: int) -> None:
    time.sleep(0.010)
    _done()


__all__ = ["app", "guarded", "guarded_sleep", "plain", "sleep"]
