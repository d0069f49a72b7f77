"""The policies' Redis goes away mid-run: real workers go on locally, then resync."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from policies.breaker import list_breakers
from tests.kit import Worker, poll
from workers.ops.embedded import EmbeddedRedis

pytestmark = pytest.mark.integration


@pytest.fixture
def policy_redis() -> Iterator[EmbeddedRedis]:
    """A second redis-server for policy state only; the broker stays on the session one."""
    server = EmbeddedRedis().start()
    yield server
    server.stop()


class TestPolicyRedisOutage:
    """Tasks keep running on local policy state while Redis is down; shared state returns."""

    def test_tasks_go_on_and_state_resyncs(
        self, r: redis.Redis, redis_url: str, policy_redis: EmbeddedRedis, tmp_path: Path
    ) -> None:
        worker = Worker(
            policy_redis.url,
            ["payments"],
            name="payments",
            env={"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url},
            log=tmp_path / "worker.log",
        ).start()
        try:
            from workers.client import client
            from workers.settings import Settings

            app = client(
                Settings.from_env({"REDIS_URL": policy_redis.url, "CELERY_BROKER_URL": redis_url,
                                   "CELERY_RESULT_BACKEND": redis_url})
            )  # fmt: skip

            def charge(order: str) -> dict[str, str]:
                return app.send_task("payments.charge", args=[order, 100]).get(timeout=30)

            assert charge("before")["order_id"] == "before"
            shared = redis.Redis.from_url(policy_redis.url)
            assert [b.name for b in list_breakers(shared)] == ["payments"]

            policy_redis.kill()
            during = [charge(f"during-{i}") for i in range(5)]
            assert [d["order_id"] for d in during] == [f"during-{i}" for i in range(5)]

            policy_redis.restart()
            assert list_breakers(shared) == [], "a restarted Redis without persistence is empty"

            def resynced() -> bool:
                charge("after")
                return any(b.name == "payments" and b.window_calls for b in list_breakers(shared))

            poll(resynced, deadline=30, every=0.2, what="breaker state back in Redis")
            log = (tmp_path / "worker.log").read_text()
            assert "Redis unreachable" in log
            assert "Redis reachable again" in log
        finally:
            worker.stop()
