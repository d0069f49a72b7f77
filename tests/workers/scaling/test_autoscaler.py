"""A real worker run with --autoscale: grows on a backlog, shrinks after the window, holds
while its dependency's breaker is open, stays within the bulkhead; counted from /proc."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore
from tasks.dependencies import dependency
from tests.conftest import StartWorker
from tests.kit import Worker, poll
from workers.client import client
from workers.fleet import heartbeat_key

FAST = {
    "BULWARK_AUTOSCALE_INTERVAL": "0.5",
    "BULWARK_AUTOSCALE_SCALE_DOWN_WINDOW": "3",
    "BULWARK_HEARTBEAT_TTL": "3",  # the heartbeat (and the decision it carries) every second
    "BULWARK_AUTOSCALE_MAX_CPU": "100",  # the test machine's load must not hold growth back
    "BULWARK_AUTOSCALE_DRAIN_SECONDS": "2",  # so that a few dozen tasks of 0.2 s need 4
}


def pool(r: redis.Redis, worker: Worker) -> dict[str, Any]:
    """The pool part of the worker's heartbeat (its autoscaler's last decision)."""
    raw = r.get(heartbeat_key(worker.hostname))
    return json.loads(raw).get("pool") or {} if raw else {}


def until(r: redis.Redis, worker: Worker, check: Callable[[], bool], what: str,
          deadline: float = 30.0) -> None:  # fmt: skip
    """Poll `check`; on a timeout, say what the autoscaler last decided."""
    try:
        poll(check, deadline=deadline, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last decision: {pool(r, worker)}") from None


def enqueue(name: str, count: int, make_args: Callable[[int], list[Any]]) -> None:
    app = client()
    for i in range(count):
        app.send_task(name, args=make_args(i))


def test_grows_on_a_backlog_then_shrinks_after_the_window(
    r: redis.Redis, start_worker: StartWorker
) -> None:
    dependency("inventory").set_latency(0.2)
    worker = start_worker(["inventory"], name="auto", env=FAST, args=["--autoscale=4,1"])
    poll(lambda: worker.pool_size() == 1, deadline=20, what="the pool at its minimum")
    enqueue("inventory.reserve", 50, lambda i: [f"sku-{i}", 1])
    until(r, worker, lambda: worker.pool_size() == 4, "the pool grown to 4")
    decision = poll(lambda: pool(r, worker), deadline=10, what="the decision on the heartbeat")
    assert decision["max"] == 4 and decision["desired"] >= 2, decision
    poll(lambda: int(r.get("bulwark:{demo:inventory}:calls") or 0) >= 50, deadline=60,
         what="the backlog drained")  # fmt: skip
    # The pool's own count (billiard's) and the processes really running agree: a shrink
    # decided while a process stopped earlier had not exited yet used to count that
    # process twice and leave a surplus process running (and the warm shutdown waiting).
    poll(lambda: pool(r, worker)["processes"] == 1, deadline=30, what="the pool back to 1")
    until(r, worker, lambda: worker.pool_size() == 1, "one process left in /proc")


def test_an_open_breaker_stops_growth(r: redis.Redis, start_worker: StartWorker) -> None:
    breaker = CircuitBreaker("inventory", BreakerConfig(), RedisBreakerStore(r))
    breaker.force_open()
    worker = start_worker(["inventory"], name="held", env=FAST, args=["--autoscale=4,1"])
    enqueue("inventory.reserve", 40, lambda i: [f"sku-{i}", 1])
    poll(lambda: "breaker open" in pool(r, worker).get("reason", ""), deadline=30,
         what="a decision that names the open breaker")  # fmt: skip
    assert worker.pool_size() == 1 and pool(r, worker)["desired"] == 1
    # Closed again: new work (the deferred tasks wait for their countdown) makes it grow.
    breaker.reset()
    dependency("inventory").set_latency(0.2)
    enqueue("inventory.reserve", 30, lambda i: [f"sku-more-{i}", 1])
    until(r, worker, lambda: worker.pool_size() > 1, "growth once the breaker closed")
    poll(lambda: int(r.get("bulwark:{demo:inventory}:calls") or 0) >= 30, deadline=60,
         what="the new tasks done")  # fmt: skip


def test_the_bulkhead_caps_the_pool(r: redis.Redis, start_worker: StartWorker) -> None:
    dependency("payments").set_latency(0.2)  # payments: a bulkhead of 4 permits
    # All queued before the worker starts: its first decision sees the whole backlog (a
    # backlog of 4 seen while enqueuing asks for 4 without the bulkhead's cap being needed).
    enqueue("payments.charge", 40, lambda i: [f"order-{i}", 100])
    worker = start_worker(["payments"], name="capped", env=FAST, args=["--autoscale=8,1"])
    sizes: list[int] = []

    def drained() -> bool:
        sizes.append(worker.pool_size())
        return int(r.get("bulwark:{demo:payments}:calls") or 0) >= 40

    poll(drained, deadline=60, what="the backlog drained")
    assert 2 <= max(sizes) <= 4, sizes
    assert any("bulkhead has room for" in line for line in worker.log.read_text().splitlines())
