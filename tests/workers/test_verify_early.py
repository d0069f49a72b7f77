"""A signed message is verified while the record of its delivery is on its way to Redis
(`execute_meanwhile`): the check overlaps that round trip, and is made once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from policies.signing import Verified
from tests.kit import poll
from workers import transport
from workers.client import client
from workers.security import verifier
from workers.transport import GuardedTransport

pytestmark = pytest.mark.integration


@pytest.fixture
def channel(redis_url: str) -> Iterator[Any]:
    with Connection(redis_url, transport=GuardedTransport) as connection:
        channel = connection.channel()
        Queue("default", Exchange("bulwark", "direct"), routing_key="default")(channel).declare()
        yield channel


def _delivered(r: redis.Redis, channel: Any, sent_to: str = "default", **changes: Any) -> Any:
    """A message as `client()` signs it for `sent_to` (with `changes` to its headers),
    delivered from `default` through the channel as the worker's consumer gets it."""
    client().send_task("bulwark.ping", args=["early"], queue=sent_to)
    payload = json.loads(r.rpop(sent_to) or b"")
    payload["headers"].update(changes)
    got: list[Any] = []
    channel.basic_consume("default", False, got.append, "early")
    try:
        channel._deliver_item(json.dumps(payload).encode(), "default")
    finally:
        channel.basic_cancel("early")
    (message,) = got
    return message


def test_verified_once_the_record_is_sent_before_its_reply_is_read(
    r: redis.Redis, channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorded_first: list[bool] = []

    def spy(msg: Any) -> None:
        # The record is at Redis already (a second connection sees it): sent, not waited for.
        tag = msg.delivery_tag
        recorded_first.append(
            bool(poll(lambda: r.hexists(channel.unacked_key, tag), deadline=5, every=0.001))
        )
        verifier.verify_early(msg)

    monkeypatch.setattr(transport, "verify_early", spy)
    message = _delivered(r, channel)
    assert recorded_first == [True]
    assert isinstance(getattr(message, verifier.VERDICT), Verified)
    assert verifier.message_problem(message) is None


def test_the_check_is_made_once(
    r: redis.Redis, channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    checks: list[Any] = []
    check = verifier.check_message
    monkeypatch.setattr(
        verifier, "check_message", lambda *a, **k: checks.append(a) or check(*a, **k)
    )
    message = _delivered(r, channel)
    assert verifier.message_problem(message) is None
    assert len(checks) == 1


def test_a_tampered_message_keeps_its_reason(r: redis.Redis, channel: Any) -> None:
    message = _delivered(r, channel, retries=7)  # a signed header changed on the way
    assert "bad signature" in getattr(message, verifier.VERDICT)
    problem = verifier.message_problem(message)
    assert problem is not None and "bad signature" in problem


def test_the_queue_checked_is_the_one_it_came_from(r: redis.Redis, channel: Any) -> None:
    message = _delivered(r, channel, sent_to="payments")  # moved to `default` on the way
    assert "bad signature" in getattr(message, verifier.VERDICT)


def test_an_unsigned_message_is_not_verified_early(r: redis.Redis, channel: Any) -> None:
    message = _delivered(r, channel, bulwark_sig=None)
    assert getattr(message, verifier.VERDICT, None) is None
    problem = verifier.message_problem(message)
    assert problem is not None and "not signed" in problem


def test_verifying_early_never_raises_into_the_record(
    r: redis.Redis, channel: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It runs between sending the record and reading Redis's reply: an error there would
    leave the reply unread and lose the delivery. It becomes the message's reason."""

    def broken() -> Any:
        raise OSError("key file gone")

    monkeypatch.setattr(verifier, "security", broken)
    message = _delivered(r, channel)
    assert r.hexists(channel.unacked_key, message.delivery_tag)  # recorded
    assert getattr(message, verifier.VERDICT) == "security: cannot verify: OSError"
