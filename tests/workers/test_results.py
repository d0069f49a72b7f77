"""A result written while the result backend's Redis restarts is retried, not lost: a task
that succeeded is never reported as FAILURE because Redis blinked."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tasks.dependencies import dependency
from tests.kit import Worker, poll
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(spare_redis: EmbeddedRedis) -> EmbeddedRedis:
    return spare_redis


class TestResultAcrossRestart:
    """The backend goes away while the task runs and comes back: the result is SUCCESS."""

    def test_success_survives_a_backend_restart(
        self, r: redis.Redis, redis_url: str, backend: EmbeddedRedis, tmp_path: Path
    ) -> None:
        env = {"CELERY_RESULT_BACKEND": backend.url}
        worker = Worker(redis_url, ["inventory"], name="results", env=env,
                        log=tmp_path / "worker.log").start()  # fmt: skip
        try:
            gateway = dependency("inventory")
            gateway.set_latency(2.0)
            app = client(Settings.from_env({"REDIS_URL": redis_url, **env}))
            result = app.send_task("inventory.reserve", args=["sku-r", 2])
            poll(lambda: gateway.calls() == 1, what="the body to start")
            backend.kill()  # the result write at the end of the body meets no Redis
            gateway.set_latency(None)
            poll(
                lambda: "Failed operation" in worker.log.read_text(),
                deadline=20,
                what="the result write failing, and being retried",
            )
            backend.restart()
            assert result.get(timeout=60) == {"sku": "sku-r", "reserved": 2}
            assert result.state == "SUCCESS"
        finally:
            worker.stop()
