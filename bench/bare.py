"""A bare Celery app, the reference of `bench/stack_overhead.py`: it imports nothing of Bulwark.

    celery -A bench.bare worker -Q default

Celery's defaults (JSON, no result backend, no task events, early acks, prefetch 4 per
process) on the same Redis as the Bulwark worker it is compared with, and the same bodies:
a no-op that counts itself (one INCR) and a 10 ms sleep (an I/O-bound job) that does too.
"""

from __future__ import annotations

import os
import time

import redis
from celery import Celery
from kombu import Queue

from bench import gaps  # noqa: F401 - the bench's own measure, with BENCH_GAPS_DIR

DONE = os.environ.get("BENCH_DONE_KEY", "bench:tasks:done")

app = Celery("bare", broker=os.environ["REDIS_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue="default",
    task_queues=[Queue("default")],
    worker_hijack_root_logger=False,
)
_counter = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.task(name="bench.plain")
def plain(i: int) -> None:
    _counter.incr(DONE)


@app.task(name="bench.sleep")
def sleep(i: int) -> None:
    time.sleep(0.010)
    _counter.incr(DONE)
