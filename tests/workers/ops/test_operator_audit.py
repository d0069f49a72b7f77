"""Operator actions leave audit records: `bulwark breaker`, `degrade`, `deadletter replay`
and `alerts silence|unsilence`, run in-process against the test Redis, each recorded with
the operator, what changed, and never a task's arguments."""

from __future__ import annotations

import contextlib
import getpass
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from policies.audit import AUDIT_STREAM, Action, AuditRecord, read_stream
from policies.deadletter import DeadLetter, DeadLetterStore
from tests import kit
from tests.kit import poll
from workers.ops.cli import main as bulwark
from workers.security import audit, context
from workers.security.keys import dev_keys
from workers.settings import get_settings

pytestmark = pytest.mark.integration


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bulwark(list(args))
    return code, out.getvalue()


@pytest.fixture(autouse=True)
def _write_the_log_while_redis_runs(r: redis.Redis) -> Iterator[None]:
    """Stop this process's audit log (its last records written) before the session's Redis
    may stop."""
    yield
    audit.forget()


@pytest.fixture
def as_operator(monkeypatch: pytest.MonkeyPatch) -> str:
    """This process is the operator's shell: it signs as the session's 'operator'."""
    keys = dev_keys(Path(kit.SECURITY_ENV["BULWARK_TRUST_FILE"]).parent)
    for name, value in keys.env("operator").items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    context.forget()
    return "operator:operator"


def audited(r: redis.Redis, *actions: str, count: int = 1) -> list[AuditRecord]:
    """The records of `actions`, oldest first, once there are `count` of them."""

    def found() -> list[AuditRecord] | None:
        records = [e.record for e in read_stream(r) if e.record is not None
                   and e.record.action in actions]  # fmt: skip
        return records if len(records) >= count else None

    return poll(found, deadline=15, what=f"{count} audit records of {actions}")


class TestBreaker:
    """Each breaker command is recorded as forced or reset, from which state to which."""

    def test_each_command(self, r: redis.Redis, as_operator: str) -> None:
        steps = [
            ("open", Action.BREAKER_FORCED, "closed", "forced_open"),
            ("metrics-only", Action.BREAKER_FORCED, "forced_open", "metrics_only"),
            ("disable", Action.BREAKER_FORCED, "metrics_only", "disabled"),
            ("close", Action.BREAKER_RESET, "disabled", "closed"),
            ("reset", Action.BREAKER_RESET, "closed", "closed"),
        ]
        for command, *_ in steps:
            assert cli("breaker", command, "payments")[0] == 0
        records = audited(r, Action.BREAKER_FORCED, Action.BREAKER_RESET, count=len(steps))
        assert [
            (x.action, x.details["command"], x.details["from_state"], x.details["to_state"])
            for x in records
        ] == [(action, command, before, after) for command, action, before, after in steps]
        assert {x.actor for x in records} == {as_operator}
        assert {x.details["breaker"] for x in records} == {"payments"}

    def test_without_an_identity_the_os_user(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("BULWARK_IDENTITY")
        get_settings.cache_clear()
        assert cli("breaker", "open", "payments")[0] == 0
        (record,) = audited(r, Action.BREAKER_FORCED)
        assert record.actor == f"operator:{getpass.getuser()}"


def test_degrade(r: redis.Redis, as_operator: str) -> None:
    """`bulwark degrade` is recorded with the levels before and after, and the reason."""
    assert cli("degrade", "payments", "minimal", "--reason", "gateway failover")[0] == 0
    (record,) = audited(r, Action.SERVICE_DEGRADED)
    assert record.actor == as_operator
    assert dict(record.details) == {
        "service": "payments",
        "from_level": "full",
        "to_level": "minimal",
        "reason": "gateway failover",
    }


def test_deadletter_replay(r: redis.Redis, as_operator: str) -> None:
    """A replay is recorded with the dead letter's id and the new task's id, never its
    arguments; a replay that did not happen is not recorded."""
    assert cli("deadletter", "replay", "no-such-letter")[0] == 1
    secret = "card-4111111111111111"
    letter = DeadLetterStore(r).add(
        DeadLetter(task_name="inventory.reserve", reason=f"failed on {secret}",
                   queue="inventory", task_id="t-original", args=[secret, 1],
                   kwargs={"note": secret})
    )  # fmt: skip
    code, out = cli("deadletter", "replay", letter.id)
    assert code == 0
    new_id = re.search(r"as task (\S+)", out).group(1)  # type: ignore[union-attr]
    (record,) = audited(r, Action.DEADLETTER_REPLAYED)
    assert record.actor == as_operator
    assert record.task_id == new_id
    assert dict(record.details) == {
        "deadletter_id": letter.id,
        "task": "inventory.reserve",
        "queue": "inventory",
        "original_task_id": "t-original",
    }
    raw = b"".join(v for _id, fields in r.xrange(AUDIT_STREAM) for v in fields.values())
    assert secret.encode() not in raw


def test_alert_silence_and_unsilence(r: redis.Redis, as_operator: str) -> None:
    """A silence is recorded with what it mutes and until when; removing it too."""
    matches = ["--match", "service=payments", "--match", "severity=warning"]
    code, out = cli(
        "alerts", "silence", *matches, "--for", "15m", "--comment", "planned maintenance"
    )
    assert code == 0
    silence_id, until = re.match(r"silence (\S+) until (\S+)", out).groups()  # type: ignore[union-attr]
    assert cli("alerts", "unsilence", silence_id)[0] == 0
    silenced, unsilenced = audited(r, Action.ALERT_SILENCED, "alert.unsilenced", count=2)
    assert silenced.action == Action.ALERT_SILENCED and silenced.actor == as_operator
    assert dict(silenced.details) == {
        "silence_id": silence_id,
        "matchers": "service=payments,severity=warning",
        "until": until,
        "by": getpass.getuser(),
        "comment": "planned maintenance",
    }
    assert (unsilenced.action, unsilenced.details["silence_id"]) == ("alert.unsilenced", silence_id)
