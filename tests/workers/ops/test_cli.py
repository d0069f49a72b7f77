"""The `bulwark` command on a real fleet: what it shows, and that what it changes, the
workers obey."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from policies.deadletter import DeadLetter, DeadLetterStore
from policies.routing import choose
from tasks.dependencies import dependency
from tests.conftest import StartWorker
from tests.kit import ROOT, child_env, poll
from workers import balancing
from workers.client import EnqueueRefused, client
from workers.fleet import WORKERS_INDEX, heartbeat_key, read_fleet
from workers.ops.cli import main as bulwark
from workers.ops.embedded import EmbeddedRedis
from workers.ops.supervisor import ProcfileError, proc
from workers.settings import Settings

pytestmark = pytest.mark.integration

FAST = {
    "BULWARK_RETRY_BASE_DELAY": "0.05",
    "BULWARK_RETRY_MAX_DELAY": "0.2",
    "BULWARK_DEFER_MAX_DELAY": "0.5",
}


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bulwark(list(args))
    return code, out.getvalue()


class TestStatus:
    """`bulwark status` shows the fleet a real worker makes, as text and JSON."""

    def test_status_of_a_running_fleet(self, r: redis.Redis, start_worker: StartWorker) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        assert client().send_task("payments.charge", args=["o1", 100]).get(timeout=30)
        # A balanced task (the worker published it), waiting on the order's shard.
        client().send_task("shipping.label", args=["order-7", 1])
        shard = choose(balancing.published(r)[0]["shipping.label"], turn=0, key="order-7")
        code, text = cli("status")
        assert code == 0
        lines = text.splitlines()
        assert "QUEUES" in lines and "BREAKERS" in lines and "WORKERS" in lines
        worker_row = next(line for line in lines if "payments@test" in line)
        assert worker_row.split()[1] == "payments"
        breaker_row = next(line for line in lines if line.split()[:2] == ["payments", "closed"])
        assert breaker_row
        assert lines[-1] == "DEAD LETTERS  0 kept (0 ever)"
        stores = {line.split()[0]: line.split()[1:] for line in lines[2:5]}  # under STORES
        assert lines[0] == "STORES" and stores["policy"][0] == "redis"
        assert [stores[role][-1] for role in ("policy", "broker", "backend")] == ["ok"] * 3
        backlog = {"shipping.0": 0, "shipping.1": 0, shard: 1}
        balanced = next(line for line in lines if line.startswith("  shipping.label"))
        assert balanced.split()[1:] == ["consistent_hash", *(f"{q}={n}" for q, n in
                                                             backlog.items())]  # fmt: skip
        code, raw = cli("status", "--json")
        data = json.loads(raw)
        assert data["balancing"]["shipping.label"]["backlog"] == backlog
        assert [b["name"] for b in data["breakers"]] == ["payments"]
        assert [b["limit"] for b in data["bulkheads"]] == [4]
        assert [w["hostname"] for w in data["workers"]] == ["payments@test"]


class TestBreakerCommands:
    """Each breaker command changes the fleet-wide state, and the workers act on it."""

    def test_open_metrics_only_disable_and_close(
        self, r: redis.Redis, start_worker: StartWorker
    ) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        app = client()
        gateway = dependency("payments")

        def state() -> str:
            (b,) = [b for b in read_fleet(r, r, []).breakers if b.name == "payments"]
            return b.state

        assert cli("breaker", "open", "payments") == (0, "breaker payments: forced_open\n")
        assert state() == "forced_open"
        refused = app.send_task("payments.charge", args=["o-refused", 100])
        poll(lambda: refused.state == "RETRY", what="the task deferred by the open breaker")
        assert gateway.calls() == 0

        assert cli("breaker", "metrics-only", "payments")[1] == "breaker payments: metrics_only\n"
        assert refused.get(timeout=30)["order_id"] == "o-refused", "admitted again"
        gateway.set_outage(60)
        for i in range(5):  # 15 failed calls are recorded; the breaker never refuses
            with pytest.raises(ConnectionError):
                app.send_task("payments.charge", args=[f"o-f{i}", 100]).get(timeout=30)
        assert state() == "metrics_only"
        gateway.set_outage(0)

        assert cli("breaker", "disable", "payments")[1] == "breaker payments: disabled\n"
        assert app.send_task("payments.charge", args=["o-d", 100]).get(timeout=30)
        assert state() == "disabled"

        assert cli("breaker", "close", "payments")[1] == "breaker payments: closed\n"
        assert state() == "closed"
        assert cli("breaker", "reset", "payments")[1] == "breaker payments: closed\n"


class TestDeadLetterList:
    """`bulwark deadletter list` shows what was kept, newest first, with its reason."""

    def test_list_text_and_json(self, r: redis.Redis, start_worker: StartWorker) -> None:
        start_worker(["payments"], name="payments", env=FAST)
        app = client()
        for order in ("o-1", "o-2"):
            with pytest.raises(ValueError):
                app.send_task("payments.charge", args=[order, 0]).get(timeout=30)
        code, text = cli("deadletter", "list")
        lines = text.splitlines()
        assert code == 0 and lines[0] == "2 dead-lettered (2 ever)"
        assert all("payments.charge" in line and "permanent" in line for line in lines[1:])
        code, raw = cli("deadletter", "list", "--json", "--limit", "1")
        (newest,) = json.loads(raw)
        assert newest["args"] == ["o-2", 0]
        assert DeadLetterStore(r).count() == 2


class TestHeartbeat:
    """A worker that stops says goodbye: its heartbeat and its index entry go."""

    def test_removed_at_shutdown(self, r: redis.Redis, start_worker: StartWorker) -> None:
        worker = start_worker(["default"], name="leaving")
        assert r.exists(heartbeat_key(worker.hostname))
        assert r.sismember(WORKERS_INDEX, worker.hostname)
        assert worker.stop() == 0
        assert not r.exists(heartbeat_key(worker.hostname))
        assert not r.sismember(WORKERS_INDEX, worker.hostname)


class TestProcFlower:
    """Flower never runs without basic auth: `bulwark proc flower` refuses, naming the fix."""

    def test_refused_without_a_password(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("FLOWER_BASIC_AUTH", raising=False)

        def never(*args: object) -> None:
            raise AssertionError(f"Flower was started: {args}")

        monkeypatch.setattr(os, "execvpe", never)
        with pytest.raises(ProcfileError) as refused:
            proc(Settings.from_env({}), ROOT / "Procfile", "flower")
        assert "set BULWARK_FLOWER_PASSWORD (or FLOWER_BASIC_AUTH)" in str(refused.value)


COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["health"],
    ["breaker", "open", "payments"],
    ["degrade", "payments", "offline"],
    ["deadletter", "list"],
    ["alerts", "list"],
]


class TestHonestFailures:
    """Redis unreachable or the password wrong: one line naming it, non-zero, nothing done."""

    @pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
    def test_unreachable_redis(
        self, args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setenv("REDIS_URL", "redis://:s3cret@127.0.0.1:1/0")
        assert bulwark(args) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err.count("\n") == 1, err
        assert err.startswith("bulwark: cannot reach Redis at redis://:***@127.0.0.1:1/0")
        assert "s3cret" not in err

    def test_wrong_password(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        with EmbeddedRedis(password="right") as server:
            monkeypatch.setenv("REDIS_URL", server.url.replace(":right@", ":wrong@"))
            assert bulwark(["degrade", "payments", "offline"]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "refused the credentials" in err, err
            assert "wrong" not in err
            level = redis.Redis.from_url(server.url).keys("bulwark:*")
            assert level == [], "nothing was written"

    def test_missing_procfile_and_unknown_process(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert bulwark(["up", "--procfile", str(tmp_path / "Procfile")]) == 2
        assert "no Procfile at" in capsys.readouterr().err
        assert bulwark(["proc", "nosuch", "--procfile", str(ROOT / "Procfile")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bulwark: unknown process nosuch; the Procfile has worker_payments")

    def test_a_closed_pipe_is_quiet(self, redis_url: str) -> None:
        done = subprocess.run(
            f"{sys.executable} -m workers.ops.cli settings | head -1",
            shell=True, capture_output=True, text=True, cwd=ROOT,
            env=child_env(redis_url),
        )  # fmt: skip
        assert done.returncode == 0
        assert done.stdout.count("\n") == 1
        assert done.stderr == "", done.stderr


class TestReplayExact:
    """A replay sends the dead letter's arguments exactly as they were given."""

    def test_empty_lists_nested_empties_and_unicode(self, r: redis.Redis) -> None:
        args = [[], {}, [[]], {"a": []}, "ünïcødé ✓", None, 1.5]
        kwargs = {"empty": [], "nested": {"x": [{}]}}
        store = DeadLetterStore(r)
        letter = store.add(
            DeadLetter(task_name="inventory.reserve", reason="r", queue="inventory",
                       args=args, kwargs=kwargs)
        )  # fmt: skip
        assert cli("deadletter", "replay", letter.id)[0] == 0
        (raw,) = r.lrange("inventory", 0, -1)
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        assert body[0] == args and body[1] == kwargs
        assert message["headers"]["bulwark_replayed_from"] == letter.id
        assert store.get(letter.id) is None


class TestEnqueueHorizon:
    """The client refuses a countdown a worker could not hold without a second delivery."""

    def test_refused_before_sending(self, r: redis.Redis) -> None:
        app = client()
        with pytest.raises(EnqueueRefused, match="beyond what a worker may hold"):
            app.send_task("inventory.reserve", args=["s", 1], countdown=3600)
        with pytest.raises(EnqueueRefused):
            app.send_task(
                "inventory.reserve", args=["s", 1], eta=datetime.now(UTC) + timedelta(days=1)
            )
        assert r.llen("inventory") == 0, "nothing was sent"
        app.send_task("inventory.reserve", args=["s", 1], countdown=60)
        assert r.llen("inventory") == 1
