"""The policy store on a real Redis Cluster (3 masters, a replica each), with real workers:
tasks run end to end, `bulwark status` lists the cluster's policies, and a master SIGKILLed
mid-run loses no task while its replica takes over."""

from __future__ import annotations

import contextlib
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from policies import keys
from policies.breaker import list_breakers
from policies.deadletter import DeadLetterStore
from tests.kit import Worker, poll
from tests.topologies import FAILOVER_ENV, Cluster
from workers.client import client
from workers.ops.cli import main as bulwark
from workers.settings import Settings
from workers.stores import connect

pytestmark = pytest.mark.integration

FAST = FAILOVER_ENV


@contextlib.contextmanager
def on_cluster(
    cluster_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Worker, Celery]]:
    """A worker whose policies live on the cluster (broker and results on the session's
    redis-server), and a client app with the same settings."""
    apart = {"CELERY_BROKER_URL": redis_url, "CELERY_RESULT_BACKEND": redis_url}
    for name, value in {"REDIS_URL": cluster_url, **apart}.items():
        monkeypatch.setenv(name, value)  # `bulwark status` in this process reads them
    worker = Worker(
        cluster_url,
        ["payments", "inventory"],
        name="cluster",
        env={**apart, **FAST},
        log=tmp_path / "worker.log",
    ).start()
    try:
        yield worker, client(Settings.from_env({"REDIS_URL": cluster_url, **apart}))
    finally:
        problems = worker.stop_and_check()
    assert not problems, "\n".join(problems)


@pytest.fixture
def fleet(
    redis_cluster: Cluster, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Worker, Celery]]:
    connect(redis_cluster.url).flushall()
    with on_cluster(redis_cluster.url, redis_url, tmp_path, monkeypatch) as running:
        yield running


def reserve(app: Celery, sku: str) -> str:
    return str(app.send_task("inventory.reserve", args=[sku, 1]).get(timeout=30)["sku"])


class TestPolicyStoreOnCluster:
    def test_tasks_run_and_state_lands_on_the_cluster(
        self, redis_cluster: Cluster, fleet: tuple[Worker, Celery]
    ) -> None:
        worker, app = fleet
        assert [reserve(app, f"s{i}") for i in range(10)] == [f"s{i}" for i in range(10)]
        shared = connect(redis_cluster.url)
        (breaker,) = [b for b in list_breakers(shared) if b.name == "inventory"]
        assert breaker.state == "closed" and breaker.window_calls >= 1
        # The breaker's keys are on the master that serves their slot, not anywhere else.
        state_key = keys.key("breaker", "inventory", "state")
        owner = redis_cluster.master_of(state_key)
        with redis.Redis(port=owner.port) as node:
            assert node.exists(state_key)

        bad = app.send_task("inventory.reserve", args=["o-bad"])  # TypeError: dead-letter it
        with pytest.raises(TypeError):
            bad.get(timeout=30)
        (letter,) = poll(DeadLetterStore(shared).latest, deadline=30, what="the dead letter")
        assert letter.task_id == bad.id

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert bulwark(["status", "--json"]) == 0
        status = json.loads(out.getvalue())
        assert "inventory" in [b["name"] for b in status["breakers"]]
        assert status["deadletters"]["kept"] == 1
        assert status["stores"]["policy"]["engine"].startswith("redis cluster")
        assert status["stores"]["policy"]["ok"] and status["stores"]["broker"]["ok"]
        assert worker.hostname in [w["hostname"] for w in status["workers"]]

    def test_a_slot_migrating_mid_run_loses_nothing(
        self, redis_cluster: Cluster, fleet: tuple[Worker, Celery]
    ) -> None:
        _worker, app = fleet
        state_key = keys.key("breaker", "inventory", "state")
        assert reserve(app, "first") == "first"
        before = redis_cluster.master_of(state_key)
        sent = [app.send_task("inventory.reserve", args=[f"m{i}", 1]) for i in range(30)]
        poll(lambda: sum(s.ready() for s in sent) >= 5, deadline=30, what="5 done")
        after = redis_cluster.migrate(state_key)  # the breaker's keys move, tasks running
        done = [result.get(timeout=60)["sku"] for result in sent]
        assert done == [f"m{i}" for i in range(30)], "every task ran, none lost"
        assert redis_cluster.master_of(state_key).port == after.port != before.port
        with redis.Redis(port=after.port) as node:
            assert node.exists(state_key)  # the state moved with its slot...
        shared = connect(redis_cluster.url)
        calls = next(b.window_calls for b in list_breakers(shared) if b.name == "inventory")
        assert reserve(app, "last") == "last"
        # ... and the policies go on writing it there.
        poll(  # booked with the worker's next round trip, or within workers.held's 10 ms
            lambda: (
                next(b.window_calls for b in list_breakers(shared) if b.name == "inventory") > calls
            ),
            deadline=10,
            what="the last call booked on the breaker's new node",
        )


class TestClusterFailover:
    def test_a_master_killed_mid_run_loses_no_task(
        self, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        cluster = Cluster(masters=3, replicas=1).start()  # its own: this test kills a master
        try:
            with on_cluster(cluster.url, redis_url, tmp_path, monkeypatch) as (_worker, app):
                victim = cluster.master_of(keys.key("breaker", "inventory", "state"))
                sent = [app.send_task("inventory.reserve", args=[f"a{i}", 1]) for i in range(20)]

                def kill_after_five() -> None:
                    poll(lambda: sum(s.ready() for s in sent) >= 5, deadline=60, what="5 done")
                    victim.kill()

                killer = threading.Thread(target=kill_after_five)
                killer.start()
                done = [result.get(timeout=60)["sku"] for result in sent]
                killer.join()
                assert victim.process is None, "the master was killed mid-run"
                assert done == [f"a{i}" for i in range(20)], "every task ran, none lost"
                poll(cluster.healthy, deadline=30, what="the replica promoted, cluster ok")
                shared = connect(cluster.url)

                def resynced() -> bool:
                    reserve(app, "after")
                    return any(
                        b.name == "inventory" and b.window_calls for b in list_breakers(shared)
                    )

                poll(resynced, deadline=30, every=0.2, what="breaker state on the new master")
        finally:
            cluster.stop()
