"""The policies' Redis goes away mid-run: real workers go on locally, then resync."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from policies.breaker import list_breakers
from policies.deadletter import DeadLetterStore
from tasks.dependencies import dependency
from tests.kit import Worker, poll
from tests.workers.telemetry.test_metrics_worker import sample, scrape
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.settings import Settings
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration


@pytest.fixture
def policy_redis(spare_redis: EmbeddedRedis) -> EmbeddedRedis:
    return spare_redis


@pytest.fixture
def split(
    redis_url: str, policy_redis: EmbeddedRedis, tmp_path: Path
) -> Iterator[tuple[Worker, Celery]]:
    """A worker (payments, inventory) whose policies live on `policy_redis`, and a client;
    the broker and the results stay on the session server."""
    apart = {"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url}
    fast = {
        "BULWARK_RETRY_BASE_DELAY": "0.05",
        "BULWARK_RETRY_MAX_DELAY": "0.2",
        "BULWARK_BREAKER_TIMEOUT": "60",
        "BULWARK_DEFER_MAX_DELAY": "0.5",
    }
    worker = Worker(
        policy_redis.url,
        ["payments", "inventory"],
        name="split",
        env={**apart, **fast},
        log=tmp_path / "worker.log",
    ).start()
    app = client(Settings.from_env({"REDIS_URL": policy_redis.url, **apart}))
    yield worker, app
    worker.stop()


class TestPolicyRedisOutage:
    """Tasks keep running on local policy state while Redis is down; shared state returns."""

    def test_tasks_go_on_and_state_resyncs(
        self, r: redis.Redis, policy_redis: EmbeddedRedis, split: tuple[Worker, Celery]
    ) -> None:
        worker, app = split

        def reserve(sku: str) -> dict[str, str]:
            return app.send_task("inventory.reserve", args=[sku, 1]).get(timeout=30)  # type: ignore[no-any-return]

        assert reserve("before")["sku"] == "before"
        shared = redis.Redis.from_url(policy_redis.url)
        assert [b.name for b in list_breakers(shared)] == ["inventory"]

        policy_redis.kill()
        during = [reserve(f"during-{i}") for i in range(5)]
        assert [d["sku"] for d in during] == [f"during-{i}" for i in range(5)]

        policy_redis.restart()
        assert list_breakers(shared) == [], "a restarted Redis without persistence is empty"

        def resynced() -> bool:
            reserve("after")
            return any(b.name == "inventory" and b.window_calls for b in list_breakers(shared))

        poll(resynced, deadline=30, every=0.2, what="breaker state back in Redis")
        log = worker.log.read_text()
        assert "Redis unreachable" in log
        assert "Redis reachable again" in log

    def test_the_local_breaker_protects_the_dependency(
        self, r: redis.Redis, policy_redis: EmbeddedRedis, split: tuple[Worker, Celery]
    ) -> None:
        worker, app = split
        assert app.send_task("inventory.reserve", args=["warm", 1]).get(timeout=30)
        url = wait_address(redis.Redis.from_url(policy_redis.url), worker.hostname)["url"]
        policy_redis.kill()
        gateway = dependency("inventory")  # on the broker's Redis, which stays up
        gateway.set_outage(120)
        before = gateway.calls()
        for i in range(12):
            app.send_task("inventory.reserve", args=[f"s{i}", 1])

        def refusing() -> float:
            return sample(scrape(url), "bulwark_breaker_rejections_total", breaker="inventory")

        poll(lambda: refusing() >= 4, deadline=30, what="the local breakers refusing calls")
        # Each prefork child trips its own local breaker after 5 consecutive failures:
        # at most 2 x 5 calls, where 12 tasks x 3 attempts would make 36 without it.
        assert gateway.calls() - before <= 10
        assert "local fail-open" in worker.log.read_text()
        # Its tasks retry against a dependency that stays down: a warm shutdown would wait
        # for them, and nothing is left to check.
        worker.kill()

    def test_a_dead_letter_waits_for_its_store(
        self, r: redis.Redis, policy_redis: EmbeddedRedis, split: tuple[Worker, Celery]
    ) -> None:
        worker, app = split
        policy_redis.kill()
        bad = app.send_task("inventory.reserve", args=["o-bad"])  # TypeError: dead-letter it
        poll(
            lambda: "dead-letter store unreachable" in worker.log.read_text(),
            deadline=30,
            what="the dead-lettering deferred",
        )
        # Not FAILURE: the task is re-sent and waits for its store.
        poll(lambda: bad.state == "RETRY", what="the task to be re-sent")
        policy_redis.restart()
        store = DeadLetterStore(redis.Redis.from_url(policy_redis.url))
        (letter,) = poll(store.latest, deadline=30, what="the dead letter, once the store is back")
        assert (letter.task_id, letter.args) == (bad.id, ["o-bad"])
        assert "permanent" in letter.reason

    def test_a_once_task_waits_for_its_store(
        self, r: redis.Redis, policy_redis: EmbeddedRedis, split: tuple[Worker, Celery]
    ) -> None:
        _worker, app = split
        policy_redis.kill()
        charge = app.send_task("payments.charge", args=["o-1", 100])
        poll(lambda: charge.state == "RETRY", deadline=30, what="the charge deferred")
        assert dependency("payments").calls() == 0, "not run without its execute-once record"
        policy_redis.restart()
        assert charge.get(timeout=30)["order_id"] == "o-1"
        assert dependency("payments").calls() == 1
