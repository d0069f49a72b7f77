"""Zero-trust messages on a real worker: whatever is forged, tampered, moved, replayed,
expired, signed with an unknown or revoked key, or sent by a producer without the
grant never runs (a canary token proves it), is dead-lettered with its reason and
audited; what is signed and allowed runs once, audited as accepted and executed."""

from __future__ import annotations

import base64
import copy
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from policies import keys
from policies.audit import Action, read_stream
from policies.deadletter import DeadLetterStore
from policies.signing import SIG_HEADER
from tests import kit
from tests.conftest import StartWorker
from tests.kit import Worker, poll
from tests.signing import sign_envelope
from workers.client import EnqueueRefused, client
from workers.security.context import Security, TrustCache
from workers.security.keys import add_identity, load_private_key, read_trust, write_trust
from workers.security.results import ResultRefused
from workers.settings import get_settings

pytestmark = pytest.mark.integration

QUEUE = "default"
TOKENS = keys.key("diagnostics", "ping", "tokens")
Envelope = dict[str, Any]


@pytest.fixture
def trust_file(tmp_path: Path) -> Path:
    """A copy of the session's trust store that this test may change (add, revoke)."""
    copied = tmp_path / "trust.toml"
    shutil.copy(kit.SECURITY_ENV["BULWARK_TRUST_FILE"], copied)
    return copied


def identity(trust_file: Path, name: str, **grant: Any) -> Security:
    """A new identity in `trust_file`, as a context that can sign."""
    _kid, key_file = add_identity(trust_file, trust_file.parent / "keys", name, **grant)
    return Security(get_settings().security, None, name, load_private_key(key_file))


@pytest.fixture
def cast(trust_file: Path) -> dict[str, Security]:
    """Identities in the trust store before the worker starts, and one that is not."""
    return {
        "stranger": identity(trust_file, "stranger", tasks=("bulwark.ping",)),
        "narrow": identity(trust_file, "narrow", tasks=("inventory.*",)),
        "temp": identity(trust_file, "temp", tasks=("bulwark.ping",)),
        # Known by name, but its key is in another trust store only.
        "unknown": identity(trust_file.parent / "other" / "trust.toml", "stranger"),
    }


@pytest.fixture
def worker(
    r: redis.Redis, start_worker: StartWorker, trust_file: Path, cast: dict[str, Security]
) -> Iterator[Worker]:
    yield start_worker([QUEUE], name="guarded", env={"BULWARK_TRUST_FILE": str(trust_file)})


@pytest.fixture
def template(r: redis.Redis) -> Envelope:
    """A real message as `client()` signs it, taken from a queue no worker here reads."""
    client().send_task("bulwark.ping", args=["template"], queue="payments")
    raw = r.rpop("payments")
    assert raw is not None
    return json.loads(raw)  # type: ignore[no-any-return]


def fresh(template: Envelope, token: str) -> Envelope:
    """The template with a new task id and `token` as its argument (not signed yet)."""
    message = copy.deepcopy(template)
    message["headers"].pop(SIG_HEADER)
    task_id = str(uuid.uuid4())
    message["headers"].update(id=task_id, root_id=task_id, argsrepr=repr([token]))
    message["properties"].update(correlation_id=task_id, delivery_tag=str(uuid.uuid4()))
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    message["body"] = base64.b64encode(json.dumps([[token], {}, embed]).encode()).decode()
    return message


def push(r: redis.Redis, message: Envelope | bytes, queue: str = QUEUE) -> None:
    r.lpush(queue, message if isinstance(message, bytes) else json.dumps(message))


def ran(r: redis.Redis) -> list[str]:
    return [t.decode() for t in r.lrange(TOKENS, 0, -1)]


def reason_for(r: redis.Redis, token: str) -> str:
    """The dead letter's reason of the message whose argsrepr holds `token`."""

    def find() -> str | None:
        for letter in DeadLetterStore(r).latest(1000):
            if token in ((letter.raw_body and base64.b64decode(letter.raw_body).decode("utf-8",
                         "replace")) or "") or token in json.dumps(letter.args):  # fmt: skip
                return letter.reason
        return None

    return poll(find, deadline=30, what=f"the dead letter of {token}")


def tampered_arg(message: Envelope) -> Envelope:
    body = json.loads(base64.b64decode(message["body"]))
    body[0] = [body[0][0] + "-and-more"]
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return message


def tampered_header(message: Envelope) -> Envelope:
    message["headers"]["retries"] = 7
    return message


class TestRefused:
    """Each forged or misused message is refused with its reason, audited, never run."""

    def test_each_is_refused_with_its_reason(
        self, r: redis.Redis, worker: Worker, template: Envelope, cast: dict[str, Security]
    ) -> None:
        now = int(time.time())
        stranger, narrow, unknown = cast["stranger"], cast["narrow"], cast["unknown"]
        cases: dict[str, tuple[Envelope | bytes, str]] = {}

        def case(name: str, message: Envelope | bytes, expected: str) -> None:
            cases[name] = (message, expected)

        signed = lambda token, **kw: sign_envelope(fresh(template, token), QUEUE, **kw)  # noqa: E731
        case("unsigned", fresh(template, "c-unsigned"), "not signed")
        case("tampered arg", tampered_arg(signed("c-arg")), "bad signature")
        case("tampered header", tampered_header(signed("c-header")), "bad signature")
        moved = sign_envelope(fresh(template, "c-moved"), "payments")
        case("moved to another queue", moved, "bad signature")
        case("expired", signed("c-expired", iat=now - 600, exp=now - 300), "expired")
        case("from the future", signed("c-future", iat=now + 3600), "in the future")
        case("unknown key", signed("c-unknown", context=unknown), "unknown key")
        case("not allowed", signed("c-narrow", context=narrow), "not allowed to send")
        forged = signed("c-forged", context=stranger)
        forged["headers"][SIG_HEADER]["sig"] = base64.b64encode(b"\0" * 64).decode()
        case("forged signature", forged, "bad signature")
        yaml = signed("c-yaml")
        yaml["content-type"] = "application/x-yaml"
        case("another content type", yaml, "only json is accepted")

        push(r, signed("c-before"))
        for message, _ in cases.values():
            push(r, message)
        push(r, signed("c-after"))
        poll(lambda: {"c-before", "c-after"} <= set(ran(r)), deadline=30, what="good ones")
        for name, (message, expected) in cases.items():
            token = json.loads(base64.b64decode(message["body"]))[0][0]  # type: ignore[index]
            assert expected in reason_for(r, token), name
        assert set(ran(r)) == {"c-before", "c-after"}, "nothing refused ran"

        # Audited: every refusal with its reason, the two good ones accepted and executed.
        def audited() -> dict[str, list[Any]] | None:
            found: dict[str, list[Any]] = {}
            for entry in read_stream(r):
                if entry.record is not None:
                    found.setdefault(entry.record.action, []).append(entry.record)
            done = len(found.get(Action.MESSAGE_REJECTED, [])) >= len(cases)
            return found if done and len(found.get(Action.MESSAGE_EXECUTED, [])) >= 2 else None

        found = poll(audited, deadline=30, what="audit records")
        rejected = found[Action.MESSAGE_REJECTED]
        assert len(rejected) == len(cases)
        assert all(rec.details.get("reason") and rec.args_digest for rec in rejected)
        assert len(found[Action.MESSAGE_ACCEPTED]) == 2 == len(found[Action.MESSAGE_EXECUTED])
        assert {rec.actor for rec in found[Action.MESSAGE_ACCEPTED]} == {"producer:worker"}
        stored = json.dumps([rec.to_json() for recs in found.values() for rec in recs])
        assert "c-before" not in stored and "c-tampered" not in stored, "no argument audited"

    def test_a_replayed_message_runs_once(
        self, r: redis.Redis, worker: Worker, template: Envelope
    ) -> None:
        message = sign_envelope(fresh(template, "once"), QUEUE)
        push(r, message)
        poll(lambda: "once" in ran(r), what="the first delivery")
        # Acknowledged: until then a copy is indistinguishable from a redelivery (a
        # worker that died with it), which runs again; after, it is a replay.
        poll(lambda: r.hlen("unacked") == 0, what="the first delivery acknowledged")
        push(r, message)  # the same bytes, jti and all
        assert "replayed message" in reason_for(r, "once")
        assert ran(r).count("once") == 1

    def test_a_key_revoked_while_the_worker_runs(
        self, r: redis.Redis, worker: Worker, template: Envelope, trust_file: Path,
        cast: dict[str, Security],
    ) -> None:  # fmt: skip
        temp = cast["temp"]
        push(r, sign_envelope(fresh(template, "before-revoke"), QUEUE, context=temp))
        poll(lambda: "before-revoke" in ran(r), what="a message of the valid key")
        assert temp.kid is not None
        write_trust(trust_file, read_trust(trust_file).revoke(temp.kid))
        revoked_at = time.monotonic()
        # Within 10 s, every worker refuses it: send one a second until one is refused.
        sent = []

        def refused() -> str | None:
            token = f"after-revoke-{len(sent)}"
            sent.append(token)
            push(r, sign_envelope(fresh(template, token), QUEUE, context=temp))
            letters = DeadLetterStore(r).latest(100)
            return next((x.reason for x in letters if "revoked" in x.reason), None)

        assert "revoked" in poll(refused, deadline=10, every=1.0, what="revocation")
        assert time.monotonic() - revoked_at < 10


class TestClientEdge:
    """The client refuses what a worker would refuse, and nothing is enqueued."""

    def test_refusals_at_send_task(
        self, r: redis.Redis, trust_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        narrow = identity(trust_file, "edge", tasks=("inventory.*",), max_payload=200, rate=1.0)
        assert narrow.key is not None
        key_file = next((trust_file.parent / "keys").glob("edge.*.pem"))
        monkeypatch.setenv("BULWARK_TRUST_FILE", str(trust_file))
        monkeypatch.setenv("BULWARK_IDENTITY", "edge")
        monkeypatch.setenv("BULWARK_SIGNING_KEY_FILE", str(key_file))
        get_settings.cache_clear()
        from workers.security import context  # lazy: after the environment is set

        context.forget()
        app = client()
        with pytest.raises(EnqueueRefused, match=r"not allowed to send 'payments\.charge'"):
            app.send_task("payments.charge", args=["o", 1])
        with pytest.raises(EnqueueRefused, match="over its limit of 200"):
            app.send_task("inventory.reserve", args=["x" * 500, 1])
        app.send_task("inventory.reserve", args=["sku", 1])
        with pytest.raises(EnqueueRefused, match="over its rate of 1 messages a second"):
            app.send_task("inventory.reserve", args=["sku", 1])
        assert r.llen("payments") == 0 and r.llen("inventory") == 1

    def test_no_identity_no_send(self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("BULWARK_IDENTITY")
        get_settings.cache_clear()
        from workers.security import context  # lazy: after the environment is set

        context.forget()
        with pytest.raises(EnqueueRefused, match="no identity"):
            client().send_task("bulwark.ping", args=["x"])
        assert r.llen(QUEUE) == 0


def test_trust_cache_reloads_a_changed_file(tmp_path: Path) -> None:
    trust = tmp_path / "trust.toml"
    cache = TrustCache(trust, recheck=0.0)
    assert cache.get().identities == {}
    identity(trust, "late", tasks=("a.*",))
    assert cache.get().identity("late") is not None
    trust.write_text("not = [toml")
    assert cache.get().identity("late") is not None, "a broken file keeps the last good store"


class TestResults:
    """Results are signed by the worker that wrote them; a forged one is never decoded."""

    def test_forged_results_are_refused(
        self, r: redis.Redis, worker: Worker, tmp_path: Path
    ) -> None:
        app = client()
        real = app.send_task("bulwark.ping", args=["signed-result"])
        assert real.get(timeout=30)["token"] == "signed-result", "a signed result reads"
        canary = tmp_path / "pwned"
        forged = {
            "status": "FAILURE",
            "result": {
                "exc_type": "system",
                "exc_module": "os",
                "exc_message": [f"touch {canary}"],
            },
            "traceback": None,
            "task_id": "forged-1",
        }
        r.set("celery-task-meta-forged-1", json.dumps(forged))
        with pytest.raises(ResultRefused, match="not signed"):
            app.AsyncResult("forged-1").get(timeout=5)
        # A real, signed result copied under another task's id names its own task.
        r.set("celery-task-meta-copied-1", r.get(f"celery-task-meta-{real.id}") or b"")
        with pytest.raises(ResultRefused, match="names another task"):
            app.AsyncResult("copied-1").get(timeout=5)
        # A result whose signed payload was edited.
        wrapper = json.loads(r.get(f"celery-task-meta-{real.id}") or b"{}")
        wrapper["payload"] = wrapper["payload"].replace("signed-result", "edited-result")
        r.set("celery-task-meta-edited-1", json.dumps(wrapper))
        with pytest.raises(ResultRefused, match="bad signature"):
            app.AsyncResult("edited-1").get(timeout=5)
        assert not canary.exists(), "nothing named in a forged result was imported or run"


class TestAuditCompleteness:
    """Every accepted message yields exactly one accept and one execute record."""

    def test_one_accept_and_one_execute_per_message(self, r: redis.Redis, worker: Worker) -> None:
        app = client()
        sent = [app.send_task("bulwark.ping", args=[f"audited-{i}"]) for i in range(30)]
        failing = [app.send_task("bulwark.ping", args=[]) for _ in range(5)]  # TypeError
        for result in sent:
            result.get(timeout=30)
        ids = {x.id for x in sent + failing}

        def counted() -> dict[str, dict[str, int]] | None:
            seen: dict[str, dict[str, int]] = {i: {} for i in ids}
            for entry in read_stream(r):
                rec = entry.record
                if rec is not None and rec.task_id in seen:
                    seen[rec.task_id][rec.action] = seen[rec.task_id].get(rec.action, 0) + 1
            # The accept is written by the consumer, the execute by a pool child: two
            # writers, each flushing its own batch. Wait until both reached the stream.
            done = all(
                Action.MESSAGE_ACCEPTED in s and Action.MESSAGE_EXECUTED in s for s in seen.values()
            )
            return seen if done else None

        seen = poll(counted, deadline=30, what="an accept and an execute record for every message")
        expected = {Action.MESSAGE_ACCEPTED: 1, Action.MESSAGE_EXECUTED: 1}
        assert all(counts == expected for counts in seen.values()), seen
