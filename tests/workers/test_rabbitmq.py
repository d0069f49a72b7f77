"""RabbitMQ as the broker (a vhost of the session's own), the policies and results in
Redis, with real workers: quorum queues, countdowns that wait in RabbitMQ instead of in
a worker, queue depths from the broker's own counts, and no task lost when every
connection to the broker is cut mid-run."""

from __future__ import annotations

import contextlib
import io
import json
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from kombu import Connection

from policies.breaker import list_breakers
from policies.deadletter import DeadLetterStore
from tasks.dependencies import dependency
from tests.kit import Worker, poll
from tests.topologies import FAILOVER_ENV, RabbitCluster, RabbitVhost, Sentinels
from workers import resources
from workers.amqp import AmqpBroker, whole_seconds
from workers.client import client
from workers.delayed_delivery import nodes_in_order
from workers.ops.cli import main as bulwark
from workers.resources import policy_redis
from workers.settings import Settings, get_settings
from workers.stores import connect

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def on_rabbitmq(
    vhost: RabbitVhost | RabbitCluster,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    queues: tuple[str, ...] = ("inventory",),
    concurrency: int = 2,
    name: str = "rabbit",
    extra: dict[str, str] | None = None,
    expected: tuple[str, ...] = (),
    policy: str | None = None,
) -> Iterator[tuple[Worker, Celery]]:
    """A worker on the RabbitMQ vhost (policies, unless on `policy`, and results on the
    session's Redis), and a client app with the same settings (and `extra` ones)."""
    policy = policy or redis_url
    env = {"CELERY_BROKER_URL": vhost.url, "CELERY_RESULT_BACKEND": redis_url, **(extra or {})}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # `bulwark status` in this process reads them
    get_settings.cache_clear()  # read before (the demo's dependency): read them again
    resources.forget()
    worker = Worker(
        policy,
        list(queues),
        name=name,
        concurrency=concurrency,
        env={**env, **FAILOVER_ENV},
        log=tmp_path / f"{name}.log",
    ).start()
    try:
        yield worker, client(Settings.from_env({"REDIS_URL": policy, **env}))
    finally:
        problems = worker.stop_and_check(expected)
    assert not problems, "\n".join(problems)


def reserve(app: Celery, sku: str, **options: Any) -> Any:
    return app.send_task("inventory.reserve", args=[sku, 1], **options)


class TestRabbitMQBroker:
    def test_tasks_run_on_quorum_queues_and_status_reads_the_broker(
        self, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with on_rabbitmq(rabbitmq, redis_url, tmp_path, monkeypatch) as (_worker, app):
            assert app.conf.broker_transport_options["confirm_publish"] is True
            done = [reserve(app, f"s{i}").get(timeout=30)["sku"] for i in range(10)]
            assert done == [f"s{i}" for i in range(10)]
            # The policies stayed in Redis: the breaker saw the calls.
            assert any(
                b.name == "inventory" and b.window_calls for b in list_breakers(policy_redis())
            )
            queues = rabbitmq.queues()
            assert queues["inventory"][0] == "quorum"
            assert queues["bulwark.dead"][0] == "quorum"  # the dead-letter queue, declared

            # Work for a queue nobody consumes waits in RabbitMQ; status reads its count.
            for i in range(3):
                app.send_task("payments.charge", args=[f"o{i}", 100])
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert bulwark(["status", "--json"]) == 0
            status = json.loads(out.getvalue())
            ready = {q["name"]: q["ready"] for q in status["queues"]}
            assert ready["payments"] == 3  # a passive declare: RabbitMQ's count, at once
            assert status["stores"]["broker"]["engine"] == "rabbitmq"
            assert status["stores"]["broker"]["ok"] and "***" in status["stores"]["broker"]["url"]

    @pytest.mark.parametrize("fixture", ["redis_cluster", "redis_sentinels"])
    def test_policies_on_another_engine_queues_on_rabbitmq(
        self, fixture: str, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
    ) -> None:  # fmt: skip
        """Mixes of the engines: the fleet's policies on a Redis Cluster or behind sentinels,
        its queues on RabbitMQ, its results on one Redis."""
        topology = request.getfixturevalue(fixture)
        master = {"BULWARK_SENTINEL_MASTER": Sentinels.NAME}
        with on_rabbitmq(rabbitmq, redis_url, tmp_path, monkeypatch, name=f"mix-{fixture[6:]}",
                         policy=topology.url, extra=master) as (_worker, app):  # fmt: skip
            done = [reserve(app, f"x{i}").get(timeout=30)["sku"] for i in range(10)]
            assert done == [f"x{i}" for i in range(10)]
            shared = connect(topology.url, master=Sentinels.NAME)
            assert any(b.name == "inventory" and b.window_calls for b in list_breakers(shared))

    def test_a_countdown_waits_in_rabbitmq_not_in_the_worker(
        self, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with on_rabbitmq(
            rabbitmq, redis_url, tmp_path, monkeypatch, concurrency=1, name="delay"
        ) as (_worker, app):
            later = reserve(app, "later", countdown=6)
            # A worker holding the countdown task would use its one prefetch slot with
            # it: these run at once because the message waits in RabbitMQ's delay queues.
            now = [reserve(app, f"now{i}") for i in range(3)]
            assert [r.get(timeout=20)["sku"] for r in now] == ["now0", "now1", "now2"]
            assert later.state == "PENDING"

            # Celery's delay levels, one queue per bit of the countdown: it is in one of them.
            levels = AmqpBroker(rabbitmq.url).depths(f"celery_delayed_{i}" for i in range(28))
            assert later.state == "PENDING"
            assert sum(ready for ready, _consumers in levels.values()) == 1
            assert later.get(timeout=30)["sku"] == "later"

    def test_sub_second_retries_and_countdowns_wait_a_second(
        self, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Celery raised `countdown must be a positive number` for a delay under a second
        on RabbitMQ's delay exchanges: a retry 50 ms later failed the task."""
        with on_rabbitmq(rabbitmq, redis_url, tmp_path, monkeypatch, name="subsecond") as (
            worker,
            app,
        ):
            gateway = dependency("inventory")
            gateway.set_outage(0.5)  # the first call fails: retried after 50-200 ms
            retried = reserve(app, "retried")
            soon = reserve(app, "soon", countdown=0.3)
            assert retried.get(timeout=30)["sku"] == "retried"
            assert soon.get(timeout=30)["sku"] == "soon"
            assert gateway.calls() >= 3, "the retried task's call failed, then went through"
            assert "countdown must be" not in worker.log.read_text()

    def test_no_task_is_lost_when_the_broker_drops_every_connection(
        self, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with on_rabbitmq(rabbitmq, redis_url, tmp_path, monkeypatch, name="cut") as (_w, app):
            sent = [reserve(app, f"a{i}") for i in range(30)]
            poll(lambda: sum(r.ready() for r in sent) >= 5, deadline=30, what="5 done")
            rabbitmq.close_connections()
            done = [r.get(timeout=60)["sku"] for r in sent]
            assert done == [f"a{i}" for i in range(30)], "every task ran, none lost"


#: Raw messages anyone with access to the vhost could publish: (body, content type,
#: headers, what the dead letter's reason must say).
HOSTILE = [
    (b"not json", "application/json", {}, "body is not valid JSON"),
    (b"\x80\x04K\x01.", "application/x-python-serialize",
     {"task": "inventory.reserve", "id": "pickled"}, "only json is accepted"),
    (b'[["x", 1], {}, {}]', "application/json",
     {"task": "inventory.reserve", "id": "unsigned", "lang": "py"}, "message is not signed"),
    (b'[["x", 1], {}, {}]', "application/json",
     {"task": "inventory.reserve", "id": "bad-limit", "timelimit": "abc"}, "'timelimit'"),
]  # fmt: skip


class TestHostileOnRabbitMQ:
    def test_malformed_messages_are_kept_and_the_worker_goes_on(
        self, rabbitmq: RabbitVhost, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        with on_rabbitmq(rabbitmq, redis_url, tmp_path, monkeypatch, name="hostile") as (_w, app):
            # Confirmed: without it the last publish could be dropped with the connection
            # closed at once after it (seen under a full run: three of four kept).
            confirmed = {"confirm_publish": True}
            with Connection(rabbitmq.url, transport_options=confirmed) as connection:
                producer = connection.Producer()
                for body, content_type, headers, _why in HOSTILE:
                    producer.publish(body, exchange="bulwark", routing_key="inventory",
                                     content_type=content_type, content_encoding="utf-8",
                                     headers=headers)  # fmt: skip
            assert reserve(app, "after").get(timeout=30)["sku"] == "after"
            store = DeadLetterStore(policy_redis())
            poll(lambda: store.total() >= len(HOSTILE), deadline=30, what="all kept")
            reasons = [letter.reason for letter in store.latest()]
            for _body, _type, _headers, why in HOSTILE:
                assert any(why in reason for reason in reasons), (why, reasons)
            assert AmqpBroker(rabbitmq.url).depths(["inventory"])["inventory"] == (0, 1)


@pytest.fixture
def own_vhost(rabbitmq: RabbitVhost) -> Iterator[RabbitVhost]:
    """A vhost of the test's own: its queues take other arguments than the session's
    (RabbitMQ refuses to declare a queue again with different ones)."""
    vhost = RabbitVhost().start()
    yield vhost
    vhost.stop()


class TestRabbitMQQueues:
    def test_a_message_that_keeps_killing_its_worker_is_dead_lettered(
        self,
        own_vhost: RabbitVhost,
        redis_url: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        limit = {"BULWARK_AMQP_DELIVERY_LIMIT": "1"}
        gateway = dependency("inventory")
        gateway.set_latency(60)  # the task is still running when its worker is killed
        try:
            for round_ in range(2):
                with on_rabbitmq(own_vhost, redis_url, tmp_path, monkeypatch,
                                 name=f"dies{round_}", extra=limit) as (worker, app):  # fmt: skip
                    if round_ == 0:
                        reserve(app, "poison")
                    poll(lambda r=round_: gateway.calls() > r, deadline=30, what="running")
                    worker.kill()  # SIGKILL: RabbitMQ gets the message back
            broker = AmqpBroker(own_vhost.url)
            # Returned twice with a delivery limit of 1: RabbitMQ dead-lettered it.
            assert poll(broker.dead, deadline=10, what="the message in bulwark.dead") == 1
            assert broker.depths(["inventory"])["inventory"][0] == 0
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert bulwark(["status"]) == 0
            assert "RABBITMQ DEAD-LETTERED  1 in bulwark.dead" in out.getvalue()
        finally:
            gateway.set_latency(None)

    def test_classic_queues_run_the_highest_priority_first(
        self,
        own_vhost: RabbitVhost,
        redis_url: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        classic = {"BULWARK_AMQP_QUEUE_TYPE": "classic"}
        env = {"REDIS_URL": redis_url, "CELERY_BROKER_URL": own_vhost.url, **classic}
        app = client(Settings.from_env(env))
        with app.connection_for_write() as connection:  # the queue, before any worker
            app.amqp.queues["inventory"].bind(connection.default_channel).declare()
        low = [reserve(app, f"low{i}", priority=0) for i in range(5)]
        high = reserve(app, "high", priority=9)
        with on_rabbitmq(own_vhost, redis_url, tmp_path, monkeypatch, concurrency=1,
                         name="prio", extra=classic) as (_worker, _app):  # fmt: skip
            for result in [high, *low]:
                result.get(timeout=30)
            order = sorted([high, *low], key=lambda r: r.date_done)
        assert order[0].id == high.id, "the priority 9 task ran before the five at 0"


class TestRabbitMQCrash:
    def test_the_quorum_queue_leader_killed_mid_run(
        self, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Three nodes, the broker URL naming them all: the node that leads the queue (and
        holds the worker's and the client's connections) is SIGKILLed mid-run; a follower
        takes over the queue, both move to another node, and no task is lost."""
        cluster = RabbitCluster().start()
        try:
            with on_rabbitmq(cluster, redis_url, tmp_path, monkeypatch, name="quorum",
                             expected=("Couldn't ack",)) as (worker, app):  # fmt: skip
                assert reserve(app, "first").get(timeout=30)["sku"] == "first"
                leader = cluster.leader_of("inventory")
                assert leader is not None
                sent = [reserve(app, f"q{i}") for i in range(30)]  # each publish confirmed
                poll(lambda: sum(r.ready() for r in sent) >= 5, deadline=30, what="5 done")
                leader.kill()
                done = [r.get(timeout=90)["sku"] for r in sent]
                assert done == [f"q{i}" for i in range(30)], "every task ran, none lost"
                now = cluster.leader_of("inventory")
                assert now is not None and now is not leader, "a follower leads the queue"
                # The delay exchanges are the cluster's: a countdown still goes through them.
                assert reserve(app, "after", countdown=1).get(timeout=30)["sku"] == "after"
                log = worker.log.read_text()
                assert "delayed delivery could not be set up" not in log
                assert "Retrying delayed delivery setup" not in log, "no node waited for"
        finally:
            cluster.stop()


def test_delayed_delivery_is_set_up_through_the_connected_node_first() -> None:
    urls = {"amqp://u:p@r1:5672//", "amqp://u:p@r2:5672//", "amqp://u:p@r3:5672//"}
    listed = "amqp://u:p@r1:5672//;amqp://u:p@r2:5672//;amqp://u:p@r3:5672//"
    on_r2 = types.SimpleNamespace(hostname="r2", port=5672)
    assert nodes_in_order(urls, listed, on_r2) == [
        "amqp://u:p@r2:5672//",
        "amqp://u:p@r1:5672//",
        "amqp://u:p@r3:5672//",
    ]
    assert nodes_in_order(urls, listed, None)[0] == "amqp://u:p@r1:5672//"


@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False) | st.none())
def test_a_delay_on_the_delay_exchanges_is_never_under_a_second(countdown: float | None) -> None:
    got, eta = whole_seconds(countdown, None)
    assert eta is None
    if countdown is not None and 0 < countdown < 1:
        assert got == 1.0
    else:
        assert got == countdown


def test_an_eta_within_a_second_becomes_a_one_second_countdown() -> None:
    soon = datetime.now(UTC) + timedelta(milliseconds=400)
    assert whole_seconds(None, soon) == (1.0, None)
    assert whole_seconds(None, soon.isoformat()) == (1.0, None)
    later = soon + timedelta(seconds=10)
    assert whole_seconds(None, later) == (None, later)
