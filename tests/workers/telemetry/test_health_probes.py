"""A real worker's /healthz and /readyz: readiness follows the broker, liveness does not."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import redis

from tests.kit import poll
from workers.ops.embedded import EmbeddedRedis
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration


def get(url: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def broker(spare_redis: EmbeddedRedis) -> EmbeddedRedis:
    return spare_redis


class TestProbes:
    """/readyz is 503 while the broker is gone and 200 again after; /healthz stays 200."""

    def test_readiness_follows_the_broker_and_liveness_does_not(
        self, r: redis.Redis, broker: EmbeddedRedis, start_worker
    ) -> None:
        worker = start_worker(["default"], name="probed", env={"CELERY_BROKER_URL": broker.url})
        url = wait_address(r, worker.hostname)["url"]
        assert url.startswith("http://127.0.0.1:")
        status, body = poll(
            lambda: (res := get(url + "/readyz"))[0] == 200 and res, what="worker ready"
        )
        assert body["queues"] == ["default"]
        assert get(url + "/healthz")[0] == 200
        assert get(url + "/nope")[0] == 404

        broker.kill()
        status, body = poll(
            lambda: (res := get(url + "/readyz"))[0] == 503 and res, what="not ready"
        )
        assert any("broker" in p for p in body["problems"])
        status, body = get(url + "/healthz")
        assert status == 200, body

        broker.restart()
        poll(lambda: get(url + "/readyz")[0] == 200, deadline=60, what="ready again after restart")
        assert get(url + "/healthz")[0] == 200
