"""The broker's Redis goes away while a worker holds unacknowledged deliveries: they run as
soon as it is back, not after the visibility timeout."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tasks.dependencies import dependency
from tests.kit import Worker, poll
from tests.topologies import FAILOVER_ENV
from workers import resources, transport
from workers.client import client
from workers.ops.embedded import EmbeddedRedis
from workers.settings import Settings, get_settings
from workers.transport import GuardedQoS, GuardedTransport, unsettled

pytestmark = pytest.mark.integration


@dataclass
class Apart:
    """A broker of its own (restartable, every write on disk at once, so the restarted
    broker has what the killed one had), results and policies on the session's Redis."""

    broker: EmbeddedRedis
    env: dict[str, str]


@pytest.fixture
def apart(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Apart]:
    broker = EmbeddedRedis(appendonly=True, config=("appendfsync always",)).start()
    try:
        env = {"CELERY_BROKER_URL": broker.url, "CELERY_RESULT_BACKEND": redis_url}
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        resources.forget()
        yield Apart(broker, env)
    finally:
        broker.stop()
        get_settings.cache_clear()
        resources.forget()


def test_held_deliveries_run_once_the_broker_is_back(
    apart: Apart, redis_url: str, tmp_path: Path
) -> None:
    gateway = dependency("notifications")  # its state is on the broker's Redis
    gateway.set_latency(2.0)
    # One process that reserves four: while the first runs, three wait in `unacked`.
    env = {**apart.env, **FAILOVER_ENV, "BULWARK_PREFETCH_MULTIPLIER": "4"}
    worker = Worker(redis_url, ["notifications"], name="held", concurrency=1, env=env,
                    log=tmp_path / "held.log").start()  # fmt: skip
    try:
        app = client(Settings.from_env({"REDIS_URL": redis_url, **apart.env}))
        sent = [app.send_task("notifications.send", args=[f"u{i}", "hi"]) for i in range(4)]
        poll(lambda: broker_unacked(apart.broker) == 4, deadline=30, what="four held")
        poll(lambda: gateway.calls() >= 1, deadline=30, what="the first one running")
        apart.broker.kill()  # the worker's restore of the three it holds fails: kept
        poll(lambda: "deferred until it is back" in worker.log.read_text(), deadline=30,
             what="the restore deferred")  # fmt: skip
        apart.broker.restart()
        # Back within seconds (the visibility timeout is an hour).
        assert [r.get(timeout=45) is not None for r in sent] == [True] * 4
        assert "settled now the broker is back: restore" in worker.log.read_text()
    finally:
        problems = worker.stop_and_check(expected=("Couldn't ack",))
    assert not problems, "\n".join(problems)


def test_a_retry_that_cannot_be_sent_goes_back_on_its_queue(
    apart: Apart, redis_url: str, tmp_path: Path
) -> None:
    """A task fails while the broker is away and its retry cannot be published: its message
    goes back on its queue as it is (runs again once the broker is back), and FAILURE is
    never stored for it (it was, and the deferred ack then dropped the message)."""
    gateway = dependency("inventory")  # its state is on the broker's Redis
    gateway.set_latency(2.0)
    env = {**apart.env, **FAILOVER_ENV}
    worker = Worker(redis_url, ["inventory"], name="unsent", concurrency=1, env=env,
                    log=tmp_path / "unsent.log").start()  # fmt: skip
    try:
        app = client(Settings.from_env({"REDIS_URL": redis_url, **apart.env}))
        sent = app.send_task("inventory.reserve", args=["a", 1])
        poll(lambda: gateway.calls() >= 1, deadline=30, what="the task running")
        states = StateWatch(redis_url, sent.id).start()
        # The call ends with the broker gone (the dependency's state is there): it fails,
        # transient, and the publish of its retry fails too.
        apart.broker.kill()
        poll(lambda: "could not re-send" in worker.log.read_text(), deadline=60,
             what="the retry's publish given up")  # fmt: skip
        apart.broker.restart()
        assert sent.get(timeout=45)["sku"] == "a"
        assert "FAILURE" not in states.stop(), states.seen
    finally:
        problems = worker.stop_and_check()
    assert not problems, "\n".join(problems)


class StateWatch:
    """Every state the result backend holds for one task, read every 20 ms on a thread."""

    def __init__(self, url: str, task_id: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.key = f"celery-task-meta-{task_id}"
        self.seen: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> StateWatch:
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.02):
            raw = self.client.get(self.key)
            state = json.loads(json.loads(raw)["payload"])["status"] if raw else "PENDING"
            if not self.seen or self.seen[-1] != state:
                self.seen.append(state)

    def stop(self) -> list[str]:
        self.done.set()
        self.thread.join(5)
        self.client.close()
        return self.seen


def broker_unacked(broker: EmbeddedRedis) -> int:
    with redis.Redis.from_url(broker.url) as held:
        return int(held.hlen("unacked"))


class _ClosedChannel:
    """A channel closed under its QoS: kombu can no longer make a client for it."""

    unacked_key, unacked_index_key, unacked_mutex_key = "unacked", "unacked_index", "mutex"
    do_restore = False  # nothing for kombu to restore when the QoS is collected

    @contextlib.contextmanager
    def conn_or_acquire(self, client: object = None) -> Iterator[object]:
        raise AttributeError("'NoneType' object has no attribute 'hostname'")
        yield  # pragma: no cover


def test_a_channel_closed_under_its_deliveries_defers_them() -> None:
    """Seen in a Sentinel failover: kombu's restore at close raised, and the worker died
    ("Unrecoverable error"). Now the deliveries wait to be settled."""
    qos = GuardedQoS(_ClosedChannel(), prefetch_count=4)
    qos._delivered.update({"tag-1": object(), "tag-2": object()})
    qos.restore_unacked()  # does not raise
    assert {k: v for k, v in unsettled().items() if k.startswith("tag-")} == {
        "tag-1": "restore",
        "tag-2": "restore",
    }
    assert not qos._delivered
    transport._unsettled.clear()


def test_a_message_popped_as_the_broker_went_away_goes_back(r: redis.Redis, redis_url: str) -> None:
    """The broker died between the BRPOP that popped a message and the write that records
    it as unacked: kombu dropped it. Now it goes back on its queue once the broker is back."""
    with Connection(redis_url, transport=GuardedTransport) as connection:
        channel = connection.channel()
        Queue("default", Exchange("bulwark", "direct"), routing_key="default")(channel).declare()
        payload = {"body": "e30=", "headers": {"id": "popped"}, "content-type": "application/json",
                   "properties": {"delivery_tag": "t1", "priority": 0, "body_encoding": "base64",
                                  "delivery_info": {"exchange": "bulwark",
                                                    "routing_key": "default"}}}  # fmt: skip
        message = channel.Message(payload, channel=channel)

        @contextlib.contextmanager
        def gone() -> Iterator[object]:
            raise redis.ConnectionError("Connection refused")
            yield  # pragma: no cover

        channel.qos.pipe_or_acquire = gone  # the instance's, over the class's method
        with pytest.raises(redis.ConnectionError):
            channel.qos.append(message, "t1")
        assert r.llen("default") == 0  # popped, recorded nowhere
        del channel.qos.pipe_or_acquire  # the broker is back
        channel.qos.restore_visible()  # the periodic sweep, the broker back
        (back,) = r.lrange("default", 0, -1)
        assert json.loads(back)["headers"]["id"] == "popped"
        assert not transport._popped
