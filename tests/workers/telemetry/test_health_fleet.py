"""Beat runs `bulwark.health.check` on a real worker; results land in Redis and beat's /metrics."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.kit import poll, start_beat, stop_session
from workers.fleet import HEALTH_RESULTS_KEY as RESULTS_KEY
from workers.fleet import read_fleet
from workers.ops.cli import main as bulwark
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration

FAST = {"BULWARK_HEALTH_CHECK_INTERVAL": "0.5", "BULWARK_METRICS_INTERVAL": "0.2"}


@pytest.fixture
def beat(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    process = start_beat(redis_url, tmp_path, env={
        **FAST, "BULWARK_METRICS_DIR": str(tmp_path / "metrics")
    })  # fmt: skip
    yield process
    stop_session(process)


def bulwark_health(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bulwark(["health", *args])
    return code, out.getvalue()


def samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class TestFleetHealth:
    """Beat -> worker -> results hash -> beat's fleet gauges and `bulwark health`."""

    def test_beat_checks_store_results_and_export_them(
        self, r: redis.Redis, start_worker, beat: subprocess.Popen[bytes]
    ) -> None:
        start_worker(["default"], name="checker", env=FAST)
        poll(lambda: r.hlen(RESULTS_KEY) == 6, deadline=45, what="health results stored")
        snap = read_fleet(r, r, ["default"])
        assert snap.health_last_run is not None
        by_check = snap.health
        results = list(by_check.values())
        assert by_check["redis"].status == "healthy"
        assert by_check["broker"].status == "healthy"
        # One worker serves only `default`: the other queues have no consumer.
        assert by_check["workers"].status == "degraded"
        assert "payments" in by_check["workers"].message
        assert all(res.latency_seconds >= 0 for res in results)

        url = wait_address(r, f"beat@{socket.gethostname()}")["url"]

        def exported() -> dict | None:  # type: ignore[type-arg]
            s = samples(url)
            return s if ("bulwark_health_status", frozenset({("check", "workers")})) in s else None

        s = poll(exported, deadline=30, what="health status exported by beat")
        assert s[("bulwark_fleet_up", frozenset())] == 1
        for role in ("policy", "broker", "backend"):  # which store, and that it answers
            assert s[("bulwark_store_up", frozenset({("role", role), ("engine", "redis")}))] == 1
        assert s[("bulwark_health_status", frozenset({("check", "redis")}))] == 0
        assert s[("bulwark_health_status", frozenset({("check", "workers")}))] == 1
        assert s[("bulwark_queue_depth", frozenset({("queue", "payments")}))] == 0
        assert s[("bulwark_workers", frozenset())] >= 1
        sent = frozenset(
            {("task", "bulwark.health.check"), ("queue", "default"), ("state", "sent")}
        )
        assert s[("bulwark_tasks_total", sent)] >= 1, "beat counts what it sends"

        code, text = bulwark_health()
        assert code == 0, text
        assert "workers" in text and "degraded" in text

    def test_health_exits_non_zero_when_a_check_is_unhealthy(self, r: redis.Redis) -> None:
        code, text = bulwark_health()
        assert code == 2 and "no health results" in text
        # No worker has a heartbeat: the workers check is unhealthy.
        code, text = bulwark_health("--run")
        assert code == 1, text
        assert "FLEET UNHEALTHY" in text
        assert r.hlen(RESULTS_KEY) == 6
