"""`bulwark up` with the queues on RabbitMQ: the policies on the embedded Redis (its ACL
users as everywhere), the demo's traffic through RabbitMQ's quorum queues, a retry
through its delay exchanges, and a clean stop. (Flower, beat and the rest of the
Procfile run on the broker as they do on Redis: `test_up.py` runs them all.)"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from policies import keys
from tests.kit import ROOT, child_env, embedded_redis, need, poll
from tests.topologies import RabbitVhost
from workers.amqp import AmqpBroker

pytestmark = pytest.mark.integration

#: The demo and the two workers that serve its queues.
PROCESSES = ("demo", "worker_general", "worker_payments")
QUEUES = ("payments", "inventory", "notifications")


def test_the_fleet_runs_on_rabbitmq(tmp_path: Path) -> None:
    need(RabbitVhost.available(), "a RabbitMQ on 127.0.0.1:5672 and rabbitmqctl")
    vhost = RabbitVhost().start()  # its own: the fleet declares its queues there
    try:
        extra = {"CELERY_BROKER_URL": vhost.url, "TMPDIR": str(tmp_path),
                 "BULWARK_KEYS_DIR": str(tmp_path / "keys"),
                 "BULWARK_DEMO_HEALTHY": "3600"}  # fmt: skip
        env = child_env("", extra, keys=False)
        env.pop("REDIS_URL")  # the policies on the embedded Redis
        log = tmp_path / "up.log"
        only = [arg for name in PROCESSES for arg in ("--only", name)]
        up = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "up", *only], env=env, cwd=ROOT,
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            poll(lambda: "BULWARK_REDIS_PASSWORD_FILE=" in log.read_text(), deadline=30,
                 what="the banner")  # fmt: skip
            redis_port, operator_file = embedded_redis(log.read_text())

            def succeeded() -> set[str]:
                return set(re.findall(r"Task ([\w.]+)\[\S+\] succeeded", log.read_text()))

            wanted = {"payments.charge", "inventory.reserve", "notifications.send"}
            poll(lambda: wanted <= succeeded(), deadline=90, every=0.5,
                 what="demo tasks of every bulkhead queue succeeding")  # fmt: skip
            broker = AmqpBroker(vhost.url)
            try:
                depths = broker.depths(QUEUES)
            finally:
                broker.close()
            assert all(consumers >= 1 for _ready, consumers in depths.values()), depths
            operator = redis.Redis(port=redis_port, username="operator",
                                   password=operator_file.read_text().strip())  # fmt: skip
            try:
                # The replay ids and the demo's gateway state live in the policy store here:
                # every process's ACL user reaches them.
                assert operator.acl_log() == [], "no process was refused a command or key"
                # The gateway fails for a second: its calls are retried 100-400 ms later,
                # through RabbitMQ's delay exchanges (a second there, at least).
                operator.set(keys.key("demo", "inventory", "outage"), "1", px=1000)
                poll(lambda: re.search(r"inventory\.reserve\[\S+\] retry: retry 1 of",
                                       log.read_text()),
                     deadline=60, what="a retried reserve")  # fmt: skip
            finally:
                operator.close()
        finally:
            os.killpg(up.pid, signal.SIGINT)
            code = up.wait(timeout=30)
        out = log.read_text()
        assert code in (0, 130), out[-3000:]
        stops = re.findall(r"(\S+) stopped \(rc=(-?\d+)\)", out)
        assert stops and all(rc == "0" for _name, rc in stops), stops
        assert "countdown must be" not in out and "Traceback" not in out, out[-3000:]
    finally:
        vhost.stop()
