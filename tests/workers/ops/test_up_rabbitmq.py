"""`bulwark up` with the queues on RabbitMQ: the policies on the embedded Redis (its ACL
users as everywhere), the demo's traffic through RabbitMQ's quorum queues, Flower on
it, and a clean stop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from policies import keys
from tests.kit import ROOT, child_env, free_port, http_get, need, poll
from tests.topologies import RabbitVhost
from workers.amqp import AmqpBroker

pytestmark = pytest.mark.integration

#: One queue of each worker of the Procfile's: each has its consumer on RabbitMQ.
QUEUES = ("payments", "inventory", "notifications", "alerts")


def test_the_fleet_runs_on_rabbitmq(tmp_path: Path) -> None:
    need(RabbitVhost.available(), "a RabbitMQ on 127.0.0.1:5672 and rabbitmqctl")
    vhost = RabbitVhost().start()  # its own: the fleet declares its queues there
    try:
        port = free_port()
        extra = {"CELERY_BROKER_URL": vhost.url, "BULWARK_FLOWER_PORT": str(port),
                 "TMPDIR": str(tmp_path), "BULWARK_KEYS_DIR": str(tmp_path / "keys"),
                 "BULWARK_DEMO_HEALTHY": "3600"}  # fmt: skip
        env = child_env("", extra, keys=False)
        env.pop("REDIS_URL")  # the policies on the embedded Redis
        log = tmp_path / "up.log"
        up = subprocess.Popen(
            [sys.executable, "-m", "workers.ops.cli", "up"], env=env, cwd=ROOT,
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            banner = poll(lambda: re.search(r"user (\S+)\s+password (\S+)", log.read_text()),
                          deadline=30, what="the banner")  # fmt: skip
            auth = (banner.group(1), banner.group(2))
            text = log.read_text()
            redis_port = int(re.search(r"redis://\S*127\.0\.0\.1:(\d+)", text).group(1))
            operator_file = Path(re.search(r"BULWARK_REDIS_PASSWORD_FILE=(\S+)", text).group(1))

            def succeeded_in_flower() -> set[str]:
                status, body = http_get(
                    f"http://127.0.0.1:{port}/api/tasks?state=SUCCESS&limit=100", auth=auth
                )
                return {t["name"] for t in json.loads(body).values()} if status == 200 else set()

            wanted = {"payments.charge", "inventory.reserve", "notifications.send"}
            poll(lambda: wanted <= succeeded_in_flower(), deadline=90, every=0.5,
                 what="demo tasks of every bulkhead queue succeeding, seen in Flower")  # fmt: skip
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
