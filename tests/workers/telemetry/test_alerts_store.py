"""Concurrent evaluators on a real redis-server send each alert once (WATCH/MULTI)."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import redis

from workers.telemetry.alerts.model import Condition
from workers.telemetry.alerts.plan import AlertConfig
from workers.telemetry.alerts.store import AlertStore

pytestmark = pytest.mark.integration

CFG = AlertConfig(group_wait=0.0, repeat_interval=3600.0)
CONDITIONS = [
    Condition(name="BreakerOpen", service=f"s{i}", severity="warning", message="open")
    for i in range(5)
]


def evaluate_many(url: str, rounds: int) -> list[str]:
    """Reconcile `rounds` times; return the ids of every alert this caller would send."""
    store = AlertStore(redis.Redis.from_url(url))
    sent: list[str] = []
    for _ in range(rounds):
        result = store.reconcile(CONDITIONS, CFG)
        sent += [a.id for n in result.notifications for a in n.alerts]
    return sent


class TestConcurrentEvaluators:
    """Threads and processes evaluating at once: every alert is notified exactly once."""

    def test_threads(self, r: redis.Redis, redis_url: str) -> None:
        sent: list[str] = []
        lock, start = threading.Lock(), threading.Barrier(8)

        def work() -> None:
            start.wait()  # eight at once: the contention is the point, not the rounds
            got = evaluate_many(redis_url, 4)
            with lock:
                sent.extend(got)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(sent) == sorted(c.fingerprint for c in CONDITIONS)

    def test_processes(self, r: redis.Redis, redis_url: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            results = pool.starmap(evaluate_many, [(redis_url, 10)] * 4)
        sent = [fp for got in results for fp in got]
        assert sorted(sent) == sorted(c.fingerprint for c in CONDITIONS)
