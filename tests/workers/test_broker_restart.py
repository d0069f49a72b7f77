"""The broker's Redis goes away while a worker holds unacknowledged deliveries: they run as
soon as it is back, not after the visibility timeout."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tasks.dependencies import dependency
from tests.kit import Worker, poll
from tests.topologies import FAILOVER_ENV
from workers import resources
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.settings import Settings, get_settings

pytestmark = pytest.mark.integration


def test_held_deliveries_run_once_the_broker_is_back(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every write on disk at once: the restarted broker has what the killed one had.
    broker = EmbeddedRedis(appendonly=True, config=("appendfsync always",)).start()
    try:
        apart = {"CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": redis_url}
        for name, value in apart.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        resources.forget()
        gateway = dependency("notifications")  # its state is on the broker's Redis
        gateway.set_latency(2.0)
        # One process that reserves four: while the first runs, three wait in `unacked`.
        env = {**apart, **FAILOVER_ENV, "BULWARK_PREFETCH_MULTIPLIER": "4"}
        worker = Worker(redis_url, ["notifications"], name="held", concurrency=1, env=env,
                        log=tmp_path / "held.log").start()  # fmt: skip
        try:
            app = client(Settings.from_env({"REDIS_URL": redis_url, **apart}))
            sent = [app.send_task("notifications.send", args=[f"u{i}", "hi"]) for i in range(4)]
            poll(lambda: broker_unacked(broker) == 4, deadline=30, what="four held")
            poll(lambda: gateway.calls() >= 1, deadline=30, what="the first one running")
            broker.kill()  # the worker's restore of the three it holds fails: kept
            poll(lambda: "deferred until it is back" in worker.log.read_text(), deadline=30,
                 what="the restore deferred")  # fmt: skip
            broker.restart()
            # Back within seconds (the visibility timeout is an hour).
            assert [r.get(timeout=45) is not None for r in sent] == [True] * 4
            assert "settled now the broker is back: restore" in worker.log.read_text()
        finally:
            problems = worker.stop_and_check(expected=("Couldn't ack",))
        assert not problems, "\n".join(problems)
    finally:
        broker.stop()


def broker_unacked(broker: EmbeddedRedis) -> int:
    with redis.Redis.from_url(broker.url) as held:
        return int(held.hlen("unacked"))
