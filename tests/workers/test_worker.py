"""Real worker processes on a private redis-server: tasks run; refused messages are kept."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis

from policies import keys
from policies.deadletter import DeadLetterStore
from tests.kit import ROOT, child_env, poll

pytestmark = pytest.mark.integration

TOKENS = keys.key("diagnostics", "ping", "tokens")


def produce(redis_url: str, code: str) -> str:
    """Run producer code in a separate process, as another service would."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(redis_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def tokens(r: redis.Redis) -> list[str]:
    return [t.decode() for t in r.lrange(TOKENS, 0, -1)]


class TestSendTask:
    """A task enqueued by name from another process runs on a real worker."""

    def test_send_task_by_name_runs_and_returns(
        self, r: redis.Redis, redis_url: str, start_worker
    ) -> None:
        start_worker(["default"], name="general")
        token = uuid.uuid4().hex
        task_id = produce(
            redis_url,
            "from workers.client import client\n"
            f"print(client().send_task('bulwark.ping', args=['{token}']).id)",
        )
        poll(lambda: token in tokens(r), what="the ping task to run")
        from workers.client import client

        result = client().AsyncResult(task_id).get(timeout=15)
        assert result["token"] == token
        assert result["worker"] == "general@test"

    def test_bulkhead_queue_is_served_only_by_its_worker(
        self, r: redis.Redis, redis_url: str, start_worker
    ) -> None:
        start_worker(["payments"], name="payments")
        start_worker(["default", "inventory"], name="general")
        ids = produce(
            redis_url,
            "from workers.client import client\n"
            "c = client()\n"
            "ids = [c.send_task('payments.charge', args=[f'o{i}', 100]).id for i in range(3)]\n"
            "print(','.join(ids))",
        ).split(",")
        from workers.client import client

        app = client()
        for i, task_id in enumerate(ids):
            value = app.AsyncResult(task_id).get(timeout=15)
            assert value["order_id"] == f"o{i}" and len(value["receipt"]) == 12
        metas = [app.backend.get_task_meta(task_id) for task_id in ids]
        assert {m["queue"] for m in metas} == {"payments"}
        assert {m["worker"] for m in metas} == {"payments@test"}


class TestRefusedMessages:
    """Pickle is never accepted; a refused message is dead-lettered with its reason."""

    def test_pickle_message_is_refused_and_dead_lettered(
        self, r: redis.Redis, redis_url: str, start_worker
    ) -> None:
        start_worker(["default"], name="general")
        evil, good = uuid.uuid4().hex, uuid.uuid4().hex
        produce(
            redis_url,
            "from celery import Celery\n"
            "import os\n"
            "app = Celery('evil', broker=os.environ['REDIS_URL'])\n"
            "app.conf.update(task_serializer='pickle', accept_content=['pickle', 'json'])\n"
            "from workers.security import signer\n"
            "signer.connect()  # the README's signing hook for a plain Celery producer\n"
            "to = dict(queue='default', routing_key='default', exchange='bulwark')\n"
            f"app.send_task('bulwark.ping', args=['{evil}'], **to)\n"
            f"app.send_task('bulwark.ping', args=['{good}'], serializer='json', **to)\n",
        )
        store = DeadLetterStore(r)
        letters = poll(store.latest, what="the pickle message in the dead-letter store")
        poll(lambda: good in tokens(r), what="the JSON ping queued after it to run")
        assert evil not in tokens(r)
        (letter,) = letters
        assert letter.task_name == "bulwark.ping"
        assert "pickle" in letter.reason
        assert letter.content_type == "application/x-python-serialize"
        assert not letter.replayable

    def test_unknown_task_name_is_dead_lettered(
        self, r: redis.Redis, redis_url: str, start_worker
    ) -> None:
        start_worker(["default"], name="general")
        produce(
            redis_url,
            "from workers.client import client\n"
            "client().send_task('nobody.knows', args=[1], queue='default')",
        )
        store = DeadLetterStore(r)
        (letter,) = poll(store.latest, what="the unknown task in the dead-letter store")
        assert letter.task_name == "nobody.knows"
        assert letter.reason == "unknown task name"
