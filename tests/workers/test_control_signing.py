"""Signed remote control without a broker: what a command's signature covers, which role
may send which command, and what the worker's pidbox node does with each verdict."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from celery.worker.control import Panel
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.authz import Grant
from policies.signing import SIG_HEADER, Claims, sign
from policies.trust import Identity, KeyEntry, TrustStore, key_id
from workers.app import Bulwark
from workers.security import control
from workers.security.context import SecurityOff, forget
from workers.security.control import (
    ANY_TRUSTED,
    FLEET,
    ControlVerified,
    SignedControl,
    SignedMailbox,
    VerifyingNode,
    check_control,
    roles_for,
    sign_control,
)
from workers.security.keys import add_identity

MAILBOX, REPLIES = "celery.pidbox", "reply.celery.pidbox"
#: State-changing commands: operators only (the brief's list, and the rest of Celery's).
STATE_CHANGING = (
    "shutdown", "pool_restart", "pool_grow", "pool_shrink", "autoscale", "rate_limit",
    "time_limit", "revoke", "revoke_by_stamped_headers", "terminate", "add_consumer",
    "cancel_consumer", "enable_events", "disable_events", "objgraph", "memdump",
)  # fmt: skip


class Cast:
    """A trust store with one identity per role, and their keys."""

    def __init__(self) -> None:
        self.keys: dict[str, Ed25519PrivateKey] = {}
        identities = {}
        for name, role in (("ops", "operator"), ("w1", "worker"), ("billing", "producer")):
            key = Ed25519PrivateKey.generate()
            self.keys[name] = key
            entry = KeyEntry(key_id(key.public_key()), key.public_key())
            identities[name] = Identity(name, role, Grant(("*",)), (entry,))
        self.trust = TrustStore(identities)

    def sign(self, name: str, message: dict[str, Any], *, iat: int | None = None,
             ttl: int = 60, mailbox: str = MAILBOX) -> dict[str, Any]:  # fmt: skip
        key = self.keys[name]
        now = int(time.time()) if iat is None else iat
        claims = Claims(name, key_id(key.public_key()), now, now + ttl, uuid.uuid4().hex)
        return sign_control(key, claims, mailbox, message)


def command(method: str, **arguments: Any) -> dict[str, Any]:
    return {"method": method, "arguments": arguments, "destination": ["w@test"],
            "pattern": None, "matcher": None}  # fmt: skip


def check(cast: Cast, message: dict[str, Any], sig: Any, **kw: Any) -> ControlVerified | str:
    return check_control(cast.trust, MAILBOX, REPLIES, message, sig, now=time.time(), **kw)


class TestSignature:
    """The signature covers the claims, the mailbox and the whole message."""

    def test_a_signed_command_verifies(self) -> None:
        cast = Cast()
        message = command("rate_limit", task_name="bulwark.ping", rate_limit="10/m")
        verdict = check(cast, message, cast.sign("ops", message))
        assert isinstance(verdict, ControlVerified)
        assert (verdict.role, verdict.refused, verdict.actor) == ("operator", None, "operator:ops")

    @pytest.mark.parametrize(
        "change",
        [
            {"method": "shutdown"},
            {"arguments": {"task_name": "bulwark.ping", "rate_limit": "1000/s"}},
            {"destination": ["other@test"]},
            {"destination": None},
            {"pattern": "*", "matcher": "glob"},
            {"ticket": "t2"},
            {"reply_to": {"exchange": REPLIES, "routing_key": "someone-else"}},
            {"extra": 1},
        ],
    )
    def test_any_change_breaks_it(self, change: dict[str, Any]) -> None:
        cast = Cast()
        message = command("rate_limit", task_name="bulwark.ping", rate_limit="10/m")
        message.update(ticket="t1", reply_to={"exchange": REPLIES, "routing_key": "me"})
        sig = cast.sign("ops", message)
        verdict = check(cast, {**message, **change}, sig)
        assert isinstance(verdict, str) and verdict.startswith("bad signature"), verdict

    def test_a_tuple_signs_as_the_list_the_worker_reads(self) -> None:
        cast = Cast()
        sent = command("revoke", task_id=("a", "b"))
        assert isinstance(check(cast, command("revoke", task_id=["a", "b"]),
                                cast.sign("ops", sent)), ControlVerified)  # fmt: skip

    def test_another_mailbox_or_a_task_signature_does_not_verify(self) -> None:
        cast = Cast()
        message = command("shutdown")
        moved = cast.sign("ops", message, mailbox="other.pidbox")
        assert check(cast, message, moved).startswith("bad signature")
        key = cast.keys["ops"]
        claims = Claims("ops", key_id(key.public_key()), int(time.time()),
                        int(time.time()) + 60, uuid.uuid4().hex)  # fmt: skip
        task_sig = sign(key, claims, message, MAILBOX, b"{}", "application/json")
        assert check(cast, message, task_sig).startswith("bad signature")

    def test_refusals(self) -> None:
        cast = Cast()
        message = command("ping")
        now = int(time.time())
        sig = cast.sign("ops", message)
        assert check(cast, message, None) == "command is not signed (no bulwark_sig header)"
        assert check(cast, message, "x") == "bulwark_sig is not an object"
        assert check(cast, message, {**sig, "iss": "nobody"}) == "unknown identity 'nobody'"
        assert "unknown key" in check(cast, message, {**sig, "kid": "k0000000000000000"})
        assert "expired" in check(cast, message, cast.sign("ops", message, iat=now - 120))
        assert "in the future" in check(cast, message, cast.sign("ops", message, iat=now + 600))
        stranger = Cast()  # same names, other keys
        assert check(stranger, message, sig).startswith("unknown key")

    def test_a_revoked_or_expired_key(self) -> None:
        cast = Cast()
        message = command("ping")
        sig = cast.sign("ops", message)
        trust = cast.trust.revoke(sig["kid"])
        verdict = check_control(trust, MAILBOX, REPLIES, message, sig, now=time.time())
        assert verdict == f"key {sig['kid']} is revoked"
        ops = cast.trust.identity("ops")
        assert ops is not None
        lapsed = KeyEntry(
            ops.keys[0].id, ops.keys[0].public, not_after=datetime.now(UTC) - timedelta(days=1)
        )
        trust = cast.trust.with_identity(Identity("ops", "operator", ops.grant, (lapsed,)))
        verdict = check_control(trust, MAILBOX, REPLIES, message, sig, now=time.time())
        assert isinstance(verdict, str) and "expired at" in verdict

    def test_replies_go_to_the_reply_exchange_only(self) -> None:
        cast = Cast()
        message = command("ping")
        message.update(ticket="t", reply_to={"exchange": "bulwark", "routing_key": "payments"})
        verdict = check(cast, message, cast.sign("ops", message))
        assert verdict == f"reply_to is not this mailbox's reply exchange ({REPLIES})"


class TestRoles:
    """Reads of the fleet's shape: anyone trusted; tasks and fleet traffic: workers and
    operators; anything that changes a worker, or is unknown: operators."""

    @pytest.mark.parametrize("method", STATE_CHANGING)
    def test_state_changing_needs_an_operator(self, method: str) -> None:
        assert roles_for(method) == ("operator",)
        cast = Cast()
        message = command(method)
        for name, role in (("w1", "worker"), ("billing", "producer")):
            verdict = check(cast, message, cast.sign(name, message))
            assert isinstance(verdict, ControlVerified)
            assert verdict.refused == (f"{role} {name!r} may not send {method!r} (needs operator)")
        verdict = check(cast, message, cast.sign("ops", message))
        assert isinstance(verdict, ControlVerified) and verdict.refused is None

    def test_every_celery_command_is_classified(self) -> None:
        for method in Panel.data:
            expected = (
                ("producer", "worker", "operator") if method in ANY_TRUSTED
                else ("worker", "operator") if method in FLEET
                else ("operator",)
            )  # fmt: skip
            assert roles_for(method) == expected
        assert set(ANY_TRUSTED | FLEET) <= set(Panel.data)
        assert set(STATE_CHANGING) == set(Panel.data) - ANY_TRUSTED - FLEET
        assert roles_for("no_such_command") == ("operator",)

    def test_reads(self) -> None:
        cast = Cast()
        for method, producer_may in (("ping", True), ("stats", True), ("active", False),
                                     ("conf", False), ("hello", False)):  # fmt: skip
            message = command(method)
            verdict = check(cast, message, cast.sign("billing", message))
            assert isinstance(verdict, ControlVerified)
            assert (verdict.refused is None) == producer_may, method
            verdict = check(cast, message, cast.sign("w1", message))
            assert isinstance(verdict, ControlVerified) and verdict.refused is None


# -- the pidbox node, in-process ----------------------------------------------------------------


class Message:
    def __init__(self, headers: dict[str, Any]) -> None:
        self.headers = headers


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """What the node audits (the audit log itself is tested in tests/policies/audit)."""
    found: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(control, "record", lambda action, **kw: found.append((action, kw)))
    return found


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch, fake_redis: fakeredis.FakeRedis) -> None:
    monkeypatch.setattr(control, "broker_redis", lambda: fake_redis)


@pytest.fixture
def ops_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """This process signs as operator 'ops' of a trust store of its own, and verifies with it."""
    trust = tmp_path / "trust.toml"
    _kid, key_file = add_identity(trust, tmp_path / "keys", "ops", role="operator")
    monkeypatch.setenv("BULWARK_TRUST_FILE", str(trust))
    monkeypatch.setenv("BULWARK_IDENTITY", "ops")
    monkeypatch.setenv("BULWARK_SIGNING_KEY_FILE", str(key_file))
    forget()
    yield trust
    forget()


def node(calls: list[str]) -> VerifyingNode:
    handlers = {
        "ping": lambda state, **kw: calls.append("ping") or {"ok": "pong"},
        "shutdown": lambda state, **kw: calls.append("shutdown") or {"ok": "bye"},
    }
    found = SignedMailbox("celery", type="fanout").Node("w@test", handlers=handlers)
    assert isinstance(found, VerifyingNode)
    return found


def published(monkeypatch: pytest.MonkeyPatch, method: str, **kw: Any) -> tuple[dict, dict]:
    """(body, headers) as `SignedMailbox._publish` would send them."""
    sent: list[tuple[dict[str, Any], dict[str, Any]]] = []

    class Producer:
        def publish(self, body: dict[str, Any], headers: dict[str, Any], **_: Any) -> None:
            sent.append((body, headers))

    mailbox = SignedMailbox("celery", type="fanout")
    mailbox.connection = type("C", (), {"default_channel": object()})()
    mailbox._publish(method, kw, destination=["w@test"], producer=Producer())
    return sent[0]


class TestNode:
    """The node dispatches what it may obey; it audits what it refuses and what an
    operator changed; with security off it is Celery's node."""

    def test_the_app_plugs_it_in(self) -> None:
        app = Bulwark("t", set_as_current=False)
        assert isinstance(app.control, SignedControl)
        assert app.control.mailbox.node_cls is VerifyingNode

    def test_signed_by_an_operator_runs_and_is_audited(
        self, monkeypatch: pytest.MonkeyPatch, ops_env: Path, replays: None,
        recorded: list[tuple[str, dict[str, Any]]],
    ) -> None:  # fmt: skip
        calls: list[str] = []
        body, headers = published(monkeypatch, "shutdown", msg="maintenance")
        assert headers[SIG_HEADER]["iss"] == "ops"
        assert node(calls).handle_message(body, Message(headers)) == {"ok": "bye"}
        assert calls == ["shutdown"]
        assert [(a, kw["actor"], kw["method"]) for a, kw in recorded] == [
            ("control.accepted", "operator:ops", "shutdown")
        ]
        assert recorded[0][1]["arguments"] == '{"msg":"maintenance"}'
        # The same message again is a replay: refused, audited, not run.
        assert node(calls).handle_message(body, Message(headers)) is None
        assert calls == ["shutdown"]
        assert recorded[-1][0] == "control.rejected"
        assert recorded[-1][1]["reason"].startswith("replayed command")

    def test_reads_are_not_audited(
        self, monkeypatch: pytest.MonkeyPatch, ops_env: Path, replays: None,
        recorded: list[tuple[str, dict[str, Any]]],
    ) -> None:  # fmt: skip
        calls: list[str] = []
        body, headers = published(monkeypatch, "ping")
        assert node(calls).handle_message(body, Message(headers)) == {"ok": "pong"}
        assert recorded == []

    def test_enable_events_is_audited_when_it_changed_something(
        self, monkeypatch: pytest.MonkeyPatch, ops_env: Path, replays: None,
        recorded: list[tuple[str, dict[str, Any]]],
    ) -> None:  # fmt: skip
        """Flower sends it every 5 s: the no-ops are not recorded."""
        events = {"on": False}

        def enable_events(state: Any) -> dict[str, str]:
            was, events["on"] = events["on"], True
            return {"ok": "task events already enabled" if was else "task events enabled"}

        found = SignedMailbox("celery", type="fanout").Node(
            "w@test", handlers={"enable_events": enable_events}
        )
        for _ in range(3):
            body, headers = published(monkeypatch, "enable_events")
            assert found.handle_message(body, Message(headers))["ok"].startswith("task events")
        assert [(a, kw["method"]) for a, kw in recorded] == [("control.accepted", "enable_events")]

    def test_unsigned_is_refused_and_audited(
        self, ops_env: Path, replays: None, recorded: list[tuple[str, dict[str, Any]]],
        caplog: pytest.LogCaptureFixture,
    ) -> None:  # fmt: skip
        calls: list[str] = []
        assert node(calls).handle_message(command("shutdown"), Message({})) is None
        assert node(calls).handle_message(["not", "a", "dict"], None) is None
        assert calls == []
        assert [(a, kw["actor"], kw["reason"]) for a, kw in recorded] == [
            ("control.rejected", "unsigned", "command is not signed (no bulwark_sig header)"),
            ("control.rejected", "unsigned", "command is not an object"),
        ]
        assert "control command shutdown refused: command is not signed" in caplog.text

    def test_another_workers_command_is_not_judged(
        self, ops_env: Path, recorded: list[tuple[str, dict[str, Any]]]
    ) -> None:
        calls: list[str] = []
        message = {**command("shutdown"), "destination": ["other@test"]}
        assert node(calls).handle_message(message, Message({})) is None
        message = {**command("shutdown"), "destination": None, "pattern": "x", "matcher": "nope"}
        assert node(calls).handle_message(message, Message({})) is None
        assert calls == [] and recorded == []

    def test_security_off_is_plain_celery(
        self, monkeypatch: pytest.MonkeyPatch, recorded: list[tuple[str, dict[str, Any]]]
    ) -> None:
        monkeypatch.setenv("BULWARK_SECURITY", "off")
        forget()
        calls: list[str] = []
        with pytest.warns(SecurityOff):
            body, headers = published(monkeypatch, "shutdown")
        assert SIG_HEADER not in headers
        assert node(calls).handle_message(body, Message(headers)) == {"ok": "bye"}
        assert calls == ["shutdown"] and recorded == []
        forget()
