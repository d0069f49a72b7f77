"""A worker SIGKILLed mid-task: its task comes back within the visibility timeout plus a
few seconds; a task declared `once` is not run a second time."""

from __future__ import annotations

import time

import pytest
import redis

from policies.deadletter import DeadLetterStore
from tasks.dependencies import dependency
from tests.conftest import StartWorker
from tests.kit import poll
from workers.client import client

pytestmark = pytest.mark.integration

VISIBILITY = 6.0
SHORT = {
    "BULWARK_VISIBILITY_TIMEOUT": str(VISIBILITY),
    "BULWARK_TASK_TIME_LIMIT": "4",
    "BULWARK_BREAKER_TIMEOUT": "1",
    "BULWARK_RETRY_MAX_DELAY": "0.5",
    "BULWARK_DEFER_MAX_DELAY": "1",
}


def kill_mid_task(
    start_worker: StartWorker, queue: str, name: str, args: list[object]
) -> tuple[str, float]:
    """Start a worker, send one slow task, SIGKILL the worker while the body runs."""
    gateway = dependency(queue)
    gateway.set_latency(30)
    first = start_worker([queue], name="doomed", env=SHORT)
    result = client().send_task(name, args=args)
    poll(lambda: gateway.calls() == 1, what="the body to start")
    first.kill()
    killed_at = time.monotonic()
    gateway.set_latency(None)
    start_worker([queue], name="heir", env=SHORT)
    return result.id, killed_at


class TestRedelivery:
    """The heir runs the killed worker's task again, in time."""

    def test_an_idempotent_task_runs_again(self, r: redis.Redis, start_worker: StartWorker) -> None:
        task_id, killed_at = kill_mid_task(
            start_worker, "inventory", "inventory.reserve", ["sku", 1]
        )
        value = client().AsyncResult(task_id).get(timeout=VISIBILITY + 20)
        came_back = time.monotonic() - killed_at
        assert value == {"sku": "sku", "reserved": 1}
        assert came_back < VISIBILITY + 10, f"redelivered after {came_back:.1f} s"
        assert dependency("inventory").calls() == 2

    def test_a_once_task_is_not_run_twice(self, r: redis.Redis, start_worker: StartWorker) -> None:
        task_id, _ = kill_mid_task(start_worker, "payments", "payments.charge", ["o-1", 100])
        store = DeadLetterStore(r)
        (letter,) = poll(store.latest, deadline=VISIBILITY + 20, what="the interrupted charge")
        assert letter.task_id == task_id
        assert letter.reason.startswith("interrupted: a delivery began on")
        assert dependency("payments").calls() == 1, "the charge ran once"
