"""Signed remote control on a real worker: a forged, tampered, replayed or under-privileged
`shutdown` is ignored (the worker goes on running tasks) and audited as rejected; an
operator's signed `ping`, `rate_limit` and `shutdown` are obeyed, also through Flower."""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange

from policies.audit import AuditRecord, read_stream
from policies.signing import SIG_HEADER, Claims
from policies.trust import key_id
from tests import kit
from tests.conftest import StartWorker
from tests.flower import start_flower
from tests.kit import Worker, poll
from workers.app import Bulwark
from workers.celeryconfig import build_config
from workers.client import client
from workers.security import context
from workers.security.control import ACCEPTED, REJECTED, sign_control
from workers.security.keys import add_identity, dev_keys, load_private_key
from workers.settings import get_settings

pytestmark = pytest.mark.integration

QUEUE = "default"
PIDBOX = "celery.pidbox"


@pytest.fixture
def trust_file(tmp_path: Path) -> Path:
    """A copy of the session's trust store, with a producer 'intruder' added."""
    copied = tmp_path / "trust.toml"
    shutil.copy(kit.SECURITY_ENV["BULWARK_TRUST_FILE"], copied)
    return copied


@pytest.fixture
def intruder(trust_file: Path) -> Path:
    """The key file of 'intruder': trusted, role producer (it may send bulwark.ping)."""
    _kid, key_file = add_identity(
        trust_file, trust_file.parent / "keys", "intruder", role="producer",
        tasks=("bulwark.ping",),
    )  # fmt: skip
    return key_file


@pytest.fixture
def operator_key() -> Path:
    """The session's operator key (`dev_keys` makes worker, operator and demo)."""
    return dev_keys(Path(kit.SECURITY_ENV["BULWARK_TRUST_FILE"]).parent).key_files["operator"]


@pytest.fixture
def worker(r: redis.Redis, start_worker: StartWorker, trust_file: Path, intruder: Path) -> Worker:
    return start_worker([QUEUE], name="ctl", env={"BULWARK_TRUST_FILE": str(trust_file)})


def sign_as(monkeypatch: pytest.MonkeyPatch, name: str, key_file: Path) -> None:
    """From now on this process signs as `name`."""
    monkeypatch.setenv("BULWARK_IDENTITY", name)
    monkeypatch.setenv("BULWARK_SIGNING_KEY_FILE", str(key_file))
    get_settings.cache_clear()
    context.forget()


@pytest.fixture
def control_app() -> Iterator[Bulwark]:
    """A Bulwark app of the test's own (its control signs as this process's identity)."""
    app = Bulwark("control-test", set_as_current=False)
    app.conf.update(build_config(get_settings()))
    yield app
    app.close()


def publish_raw(url: str, body: dict[str, Any], headers: dict[str, Any]) -> None:
    """Put a control message on the pidbox exchange as it is, as anyone with Redis could."""
    exchange = Exchange(PIDBOX, type="fanout", durable=False, delivery_mode="transient")
    with Connection(url) as conn:
        conn.Producer(serializer="json").publish(
            body, exchange=exchange, declare=[exchange], headers=headers, retry=True
        )


def operator_signed(key_file: Path, body: dict[str, Any]) -> dict[str, Any]:
    key = load_private_key(key_file)
    now = int(time.time())
    claims = Claims("operator", key_id(key.public_key()), now, now + 60, uuid.uuid4().hex)
    return sign_control(key, claims, PIDBOX, body)


def shutdown_for(hostname: str) -> dict[str, Any]:
    return {"method": "shutdown", "arguments": {}, "destination": [hostname],
            "pattern": None, "matcher": None}  # fmt: skip


def control_records(r: redis.Redis, action: str, hostname: str) -> list[AuditRecord]:
    return [
        e.record
        for e in read_stream(r)
        if e.record is not None
        and e.record.action == action
        and e.record.details.get("worker") == hostname
    ]


def serves_tasks(worker: Worker) -> None:
    """The worker is alive and runs a task sent now."""
    assert worker.process is not None and worker.process.poll() is None, "worker exited"
    token = f"alive-{uuid.uuid4().hex[:8]}"
    result = client().send_task("bulwark.ping", args=[token], queue=QUEUE)
    assert result.get(timeout=30)["token"] == token


class TestRefused:
    """Whatever an operator did not sign is ignored, audited, and the worker goes on."""

    def test_forged_shutdowns_are_ignored(
        self, r: redis.Redis, redis_url: str, worker: Worker, intruder: Path, operator_key: Path,
        control_app: Bulwark, monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        host = worker.hostname
        session_worker_key = Path(kit.SECURITY_ENV["BULWARK_SIGNING_KEY_FILE"])

        # 1. Plain Celery, no signature: what anyone who can write to Redis can send.
        attacker = Celery("attacker", broker=redis_url, set_as_current=False)
        attacker.control.broadcast("shutdown", destination=[host])
        attacker.close()
        # 2. A trusted producer signs it: a good signature, the wrong role. It hears why.
        sign_as(monkeypatch, "intruder", intruder)
        replies = control_app.control.broadcast(
            "shutdown", destination=[host], reply=True, timeout=5
        )
        assert replies == [
            {host: {"error": "refused: producer 'intruder' may not send 'shutdown' "
                             "(needs operator)"}}
        ]  # fmt: skip
        # 3. The fleet's own worker identity may not stop a worker either.
        sign_as(monkeypatch, "worker", session_worker_key)
        control_app.control.shutdown(destination=[host])
        # 4. An operator's shutdown of another worker, moved to this one: tampered.
        body = shutdown_for("elsewhere@test")
        sig = operator_signed(operator_key, body)
        publish_raw(redis_url, {**body, "destination": [host]}, {"clock": 1, SIG_HEADER: sig})
        # 5. A signature pasted from an operator's ping.
        ping = {**shutdown_for(host), "method": "ping"}
        publish_raw(redis_url, shutdown_for(host), {SIG_HEADER: operator_signed(operator_key,
                                                                                ping)})  # fmt: skip
        # 6. Junk in the signature header.
        publish_raw(redis_url, shutdown_for(host), {SIG_HEADER: {"iss": "operator", "sig": "x"}})

        expected = [
            ("unsigned", "command is not signed (no bulwark_sig header)"),
            ("producer:intruder", "producer 'intruder' may not send 'shutdown' (needs operator)"),
            ("worker:worker", "worker 'worker' may not send 'shutdown' (needs operator)"),
            ("unverified:operator", "bad signature (identity 'operator', key "),
            ("unverified:operator", "bad signature (identity 'operator', key "),
            ("unverified:operator", "bulwark_sig has no 'kid'"),
        ]

        def rejected() -> list[tuple[str, str]] | None:
            found = [(x.actor, x.details["reason"]) for x in
                     control_records(r, REJECTED, host)]  # fmt: skip
            return found if len(found) >= len(expected) else None

        found = poll(rejected, deadline=30, what="six rejections audited")
        assert len(found) == len(expected), found
        for (actor, reason), (want_actor, want_reason) in zip(found, expected, strict=True):
            assert actor == want_actor and reason.startswith(want_reason), (actor, reason)
        assert all(x.details["method"] == "shutdown" for x in control_records(r, REJECTED, host))
        assert control_records(r, ACCEPTED, host) == []

        sign_as(monkeypatch, "worker", session_worker_key)
        serves_tasks(worker)
        log = worker.log.read_text()
        assert "control command shutdown refused: command is not signed" in log
        assert "Got shutdown from remote" not in log

    def test_a_replayed_operator_command_runs_once(
        self, r: redis.Redis, redis_url: str, worker: Worker, operator_key: Path
    ) -> None:
        host = worker.hostname
        body = {"method": "rate_limit", "destination": [host], "pattern": None, "matcher": None,
                "arguments": {"task_name": "bulwark.ping", "rate_limit": "600/m"}}  # fmt: skip
        headers = {SIG_HEADER: operator_signed(operator_key, body)}
        publish_raw(redis_url, body, headers)
        poll(lambda: control_records(r, ACCEPTED, host), deadline=30, what="accepted")
        publish_raw(redis_url, body, headers)  # captured and sent again
        rejected = poll(lambda: control_records(r, REJECTED, host), deadline=30, what="replay")
        assert rejected[0].details["reason"].startswith("replayed command (jti ")
        assert len(control_records(r, ACCEPTED, host)) == 1
        serves_tasks(worker)


class TestOperator:
    """An operator's signed commands are obeyed; the state-changing ones are audited."""

    def test_ping_rate_limit_then_shutdown(
        self, r: redis.Redis, worker: Worker, operator_key: Path, control_app: Bulwark,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        host = worker.hostname
        sign_as(monkeypatch, "operator", operator_key)
        assert control_app.control.ping(destination=[host], timeout=5) == [{host: {"ok": "pong"}}]
        stats = control_app.control.inspect(destination=[host], timeout=5).stats()
        assert stats is not None and host in stats
        assert control_app.control.rate_limit(
            "bulwark.ping", "600/m", destination=[host], reply=True, timeout=5
        ) == [{host: {"ok": "new rate limit set successfully"}}]
        accepted = poll(lambda: control_records(r, ACCEPTED, host), deadline=30, what="audit")
        assert [(x.actor, x.details["method"]) for x in accepted] == [
            ("operator:operator", "rate_limit")
        ]
        assert json.loads(accepted[0].details["arguments"]) == {
            "task_name": "bulwark.ping", "rate_limit": "600/m"
        }  # fmt: skip
        assert control_records(r, REJECTED, host) == []

        control_app.control.shutdown(destination=[host])
        assert worker.process is not None
        # The fixture's stop_and_check then finds it gone: exit code 0, no crash in its log.
        assert worker.process.wait(timeout=30) == 0
        methods = [x.details["method"] for x in control_records(r, ACCEPTED, host)]
        assert methods == ["rate_limit", "shutdown"]


# -- Flower, as `bulwark up` runs it: the operator identity ------------------------------------


def http(url: str, auth: tuple[str, str], data: dict[str, str] | None = None) -> tuple[int, str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body)
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


@pytest.fixture
def flower(
    redis_url: str, trust_file: Path, operator_key: Path, tmp_path: Path
) -> Iterator[tuple[str, tuple[str, str]]]:
    """`python -m workers.ops.flower` signing as the operator: (base URL, credentials)."""
    env = {**dev_keys(operator_key.parent).env("operator"), "BULWARK_TRUST_FILE": str(trust_file)}
    running = start_flower(redis_url, env, tmp_path)
    try:
        poll(lambda: running.get("/api/workers")[0] == 200, deadline=30,
             what=f"Flower up ({running.log})")  # fmt: skip
        yield running.url, running.auth
    finally:
        running.stop()


def test_flower_signs_as_the_operator(
    r: redis.Redis, worker: Worker, flower: tuple[str, tuple[str, str]]
) -> None:
    """Flower's inspect and rate limit go through the app's signed control."""
    url, auth = flower
    host = worker.hostname

    def listed() -> dict[str, Any] | None:
        status, text = http(f"{url}/api/workers?refresh=1&workername={host}", auth)
        found = json.loads(text) if status == 200 else {}
        return found if found.get(host, {}).get("stats") else None

    info = poll(listed, deadline=30, every=0.5, what="Flower inspecting the worker")
    assert QUEUE in {q["name"] for q in info[host]["active_queues"]}
    status, text = http(f"{url}/api/task/rate-limit/bulwark.ping", auth,
                        {"workername": host, "ratelimit": "600/m"})  # fmt: skip
    assert (status, json.loads(text)) == (200, {"message": "new rate limit set successfully"})
    accepted = poll(
        lambda: [x for x in control_records(r, ACCEPTED, host)
                 if x.details["method"] == "rate_limit"],
        deadline=30, what="Flower's rate limit audited",
    )  # fmt: skip
    assert accepted[0].actor == "operator:operator"
    # Flower's reads (stats, active_queues, registered, ...) were signed too: none refused.
    assert control_records(r, REJECTED, host) == []
