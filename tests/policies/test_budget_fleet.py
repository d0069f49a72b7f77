"""The retry budget against the real redis-server: the cap holds across processes and threads."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from policies.budget import BudgetConfig, RedisBudgetStore, RetryBudget
from tests.topologies import Sentinels
from workers.stores import connect

pytestmark = pytest.mark.integration

CONFIG = BudgetConfig(ratio=0.2, window=60.0, min_retries=5, buckets=10)
GRANTED = "test:budget:granted"


def spender_process(url: str, threads: int, tries: int, start: object) -> None:
    """One worker process: `threads` threads each trying to spend `tries` retries."""
    client = connect(url, master=Sentinels.NAME, socket_connect_timeout=0.5, socket_timeout=2.0)
    budget = RetryBudget("fleet", CONFIG, store=RedisBudgetStore(client))
    barrier = threading.Barrier(threads)
    counts = [0] * threads

    def spend(i: int) -> None:
        barrier.wait()
        for _ in range(tries):
            counts[i] += budget.try_spend()

    workers = [threading.Thread(target=spend, args=(i,)) for i in range(threads)]
    start.wait()  # type: ignore[attr-defined]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    client.incrby(GRANTED, sum(counts))


class TestBudgetFleet:
    """Two processes of eight threads each never spend more than the shared allowance."""

    def test_cap_holds_with_concurrent_spenders(self, store_url: str) -> None:
        redis_url, r = store_url, connect(store_url, master=Sentinels.NAME)
        budget = RetryBudget("fleet", CONFIG, store=RedisBudgetStore(r))
        budget.record_call(100)  # allowance: 5 + 0.2 * 100 = 25
        ctx = multiprocessing.get_context("spawn")
        start = ctx.Event()
        procs = [
            ctx.Process(target=spender_process, args=(redis_url, 8, 10, start)) for _ in range(2)
        ]
        for proc in procs:
            proc.start()
        start.set()
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        assert int(r.get(GRANTED) or 0) == 25  # 160 tries, exactly the allowance granted
        state = budget.snapshot()
        assert (state.calls, state.retries, state.granted) == (100, 25, False)
