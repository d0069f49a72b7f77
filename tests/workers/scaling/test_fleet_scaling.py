"""Beat's fleet scaler on real parts: a real beat, a real worker, a Procfile of two groups.

The leading beat decides every group's worker count from the backlog, the heartbeats
(with their run-time totals) and the policies; /scaling serves it in the shape KEDA's
metrics-api scaler reads, and /metrics exports it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from policies.breaker import BreakerConfig, CircuitBreaker, RedisBreakerStore
from tasks.dependencies import dependency
from tests.conftest import StartWorker
from tests.kit import poll, start_beat, stop_session
from tests.workers.scaling.test_autoscaler import enqueue
from workers.scaling.fleet import DECISIONS_KEY
from workers.telemetry.http import wait_address

PROCFILE = """\
worker_inventory: celery -A workers.app worker -Q inventory -n inventory@%h --autoscale=2,1
worker_payments: celery -A workers.app worker -Q payments -n payments@%h --concurrency=4
beat: celery -A workers.app beat
"""


@pytest.fixture
def beat(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    procfile = tmp_path / "Procfile"
    procfile.write_text(PROCFILE)
    process = start_beat(redis_url, tmp_path, env={
        "BULWARK_PROCFILE": str(procfile),
        "BULWARK_FLEET_SCALE_INTERVAL": "1",
        "BULWARK_FLEET_WORKERS": "1..4,worker_payments=0..3",
        "BULWARK_AUTOSCALE_DRAIN_SECONDS": "5",
        "BULWARK_HEARTBEAT_TTL": "3",
        "BULWARK_METRICS_DIR": str(tmp_path / "beat-metrics"),
    })  # fmt: skip
    yield process
    stop_session(process)


def scaling(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/scaling", timeout=10) as response:
        groups: dict[str, Any] = json.loads(response.read())["groups"]
        return groups


def test_beat_decides_each_group_and_serves_it_for_keda(
    r: redis.Redis, start_worker: StartWorker, beat: subprocess.Popen[bytes]
) -> None:
    dependency("inventory").set_latency(0.3)
    worker = start_worker(["inventory"], name="inv", env={"BULWARK_HEARTBEAT_TTL": "3"})
    url = wait_address(r, f"beat@{socket.gethostname()}")["url"]
    first = poll(lambda: (g := scaling(url).get("worker_inventory")) and g["current"] and g,
                 deadline=30, what="a decision that counts the inventory worker")  # fmt: skip
    assert first["current"] == 1 and first["processes"] == 2 and first["queues"] == ["inventory"]
    assert (first["min"], first["max"]) == (1, 4)

    # 120 tasks of 300 ms wait: one worker of 2 processes would take 18 s; the scaler
    # measures the run time from the worker's heartbeats and asks for more workers.
    enqueue("inventory.reserve", 120, lambda i: [f"sku-{i}", 1])
    grown = poll(lambda: (g := scaling(url)["worker_inventory"])["desired"] > 1 and g,
                 deadline=30, what="more inventory workers wanted")  # fmt: skip
    assert grown["current"] == 1 and grown["desired"] <= 4, grown
    assert "waiting" in grown["reason"], grown

    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'bulwark_scaling_desired_workers{group="worker_inventory"}' in text
    assert 'bulwark_scaling_current_workers{group="worker_inventory"} 1.0' in text
    # The decision, and the scale-down window a new leader would carry on with, are in Redis.
    stored = json.loads(r.hget(DECISIONS_KEY, "worker_inventory") or "{}")
    assert stored["history"], stored
    worker.kill()


def test_an_open_breaker_keeps_a_group_at_its_minimum(
    r: redis.Redis, beat: subprocess.Popen[bytes]
) -> None:
    CircuitBreaker("payments", BreakerConfig(), RedisBreakerStore(r)).force_open()
    enqueue("payments.charge", 50, lambda i: [f"order-{i}", 100])
    url = wait_address(r, f"beat@{socket.gethostname()}")["url"]
    held = poll(lambda: scaling(url).get("worker_payments"), deadline=30,
                what="a decision for worker_payments")  # fmt: skip
    assert held["desired"] == 0 and held["current"] == 0, held
    assert "breaker open" in held["reason"], held
