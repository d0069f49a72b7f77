"""`bulwark up` acting on beat's fleet decisions: a load step starts extra workers of the
group, which retire (warm shutdown) once the load is gone; every task runs exactly once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tasks.dependencies import dependency
from tests.kit import ROOT, child_env, poll
from workers.client import client
from workers.fleet import WORKERS_INDEX, heartbeat_key

pytestmark = pytest.mark.integration

PROCFILE = """\
worker_inventory: env BULWARK_HTTP_PORT=0 celery -A workers.app --quiet worker --loglevel=info -Q inventory -n inventory@%h --autoscale=2,1 --without-mingle --without-gossip
beat: env BULWARK_HTTP_PORT=0 celery -A workers.app --quiet beat --loglevel=info --schedule=${BULWARK_STATE_DIR}/beat-schedule
"""  # noqa: E501 (Procfile lines)

FAST = {
    "BULWARK_FLEET_SCALE_INTERVAL": "1",
    "BULWARK_FLEET_WORKERS": "1..3",
    "BULWARK_AUTOSCALE_DRAIN_SECONDS": "5",
    "BULWARK_AUTOSCALE_SCALE_DOWN_WINDOW": "3",
    "BULWARK_HEARTBEAT_TTL": "3",
}


def live_workers(r: redis.Redis) -> set[str]:
    names = {n.decode() for n in r.smembers(WORKERS_INDEX)}
    return {n for n in names if r.exists(heartbeat_key(n))}


def test_a_load_step_starts_extra_workers_that_retire_after_it(
    r: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    procfile = tmp_path / "Procfile"
    procfile.write_text(PROCFILE)
    log = (tmp_path / "up.log").open("w+")
    env = child_env(redis_url, {**FAST, "TMPDIR": str(tmp_path)})
    up = subprocess.Popen(
        [sys.executable, "-m", "workers.ops.cli", "up", "--procfile", str(procfile)],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip

    def output() -> str:
        return (tmp_path / "up.log").read_text()

    try:
        poll(lambda: any(n.startswith("inventory@") for n in live_workers(r)), deadline=40,
             what="the group's first worker")  # fmt: skip
        dependency("inventory").set_latency(0.3)
        app = client()
        results = [app.send_task("inventory.reserve", args=[f"sku-{i}", 1]) for i in range(100)]

        # One worker of 2 processes would take 15 s; beat wants 3 workers, `up` starts 2.
        poll(lambda: len([n for n in live_workers(r) if n.startswith("inventory")]) == 3,
             deadline=40, what="two extra inventory workers")  # fmt: skip
        assert re.search(r"scaling: starting worker_inventory\.2 \(beat wants \d", output())
        assert "worker_inventory.3 started" in output()

        poll(lambda: all(x.ready() for x in results), deadline=90, what="every task done")
        assert {x.state for x in results} == {"SUCCESS"}
        # Each ran once: the gateway counted one call per task, no more.
        assert int(r.get("bulwark:{demo:inventory}:calls") or 0) == 100

        # The load is gone: after the window the extras retire with a warm shutdown.
        poll(lambda: "worker_inventory.3 retired" in output()
             and "worker_inventory.2 retired" in output(), deadline=60,
             what="both extras retired")  # fmt: skip
        assert not re.search(r"worker_inventory\.\d exited \(rc=", output()), "no crash"
        poll(lambda: {n.split("@")[0] for n in live_workers(r)} == {"inventory"}, deadline=20,
             what="only the first worker left")  # fmt: skip
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)  # Ctrl-C
        code = up.wait(60)
    assert code == 130, output()  # honcho's code for a stop on SIGINT
    assert "WorkerLostError" not in output(), "a pool process got SIGTERM itself"
