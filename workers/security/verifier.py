"""Verification in the consumer: before a task is looked up, its arguments decoded or a
result written, the message's signature, key, expiry, replay id and the producer's
authorization are checked (`policies.signing.check_message`).

The queue checked is the one the message was taken from (`GuardedChannel` notes
it on the message), so a signed message moved to another queue is refused.
The replay state comes from the transport too (`GuardedQoS` notes the jti in
the same round trip that records the delivery); a transport that does not note
it costs one round trip here. The Redis transport also runs the checks themselves
(`verify_early`) between sending that record and reading Redis's reply: the ~60 µs of
signature work overlap a round trip the event loop waited for anyway.

Every refusal is counted (`workers.security.refusals`: this worker's metric and
the fleet's per-kind counts, one more round trip on a refusal, none otherwise).
"""

from __future__ import annotations

import time
from typing import Any

import redis

from policies.replay import Replays, Seen
from policies.signing import Verified, check_message, parse_claims
from workers.resources import broker_redis
from workers.security import sealed
from workers.security.context import Security, security
from workers.security.refusals import count_refusal
from workers.security.signer import plain_headers

__all__ = [
    "CLAIMS", "CONSUMED_FROM", "FROM_JSON", "JTI_SEEN", "VERDICT", "jti_of", "message_problem",
    "verify_early",
]  # fmt: skip

#: Set on a kombu message by the transport: the queue it was taken from.
CONSUMED_FROM = "bulwark_consumed_from"
#: Set on a kombu message by the transport: what the replay record said of its jti.
JTI_SEEN = "bulwark_jti_seen"
#: Set on a kombu message by the transport: `parse_claims` of its `bulwark_sig` header.
CLAIMS = "bulwark_claims"
#: Set on a kombu message by the Redis transport: its verdict (`verify_early`).
VERDICT = "bulwark_verdict"
#: Set on a kombu message by the Redis transport: its headers came out of JSON.
FROM_JSON = "bulwark_from_json"


def _queue(message: Any) -> str:
    found = getattr(message, CONSUMED_FROM, None)
    if isinstance(found, str):
        return found
    delivery = getattr(message, "delivery_info", None) or {}
    key = delivery.get("routing_key")
    return key if isinstance(key, str) else ""


def _seen(message: Any, verified: Verified) -> Seen:
    found = getattr(message, JTI_SEEN, None)
    if found is not None:
        return found  # type: ignore[no-any-return]
    return Replays(broker_redis()).seen(verified.claims.jti, verified.claims.exp)


def message_problem(message: Any) -> str | None:
    """Why a task message may not run (security), or None. Never decodes the body.

    A refusal is counted by kind (`count_refusal`); an accepted message costs nothing more.
    """
    problem = _problem(message)
    if problem is not None:
        count_refusal(problem)
    return problem


def verify_early(message: Any) -> None:
    """Check `message`'s signature, key, expiry and authorization now, keeping the verdict
    on it (`VERDICT`) for `message_problem`. The Redis transport calls it while the record
    of the delivery is on its way to Redis, so the check overlaps that round trip instead of
    adding to the loop's time. Never raises."""
    try:
        context = security()
        if not context.enabled or context.verifying_problem() is not None:
            return
        verdict = _verdict(message, context)
    except Exception as exc:  # refused by message_problem, with the reason
        verdict = f"security: cannot verify: {type(exc).__name__}"
    setattr(message, VERDICT, verdict)


def _problem(message: Any) -> str | None:
    context = security()
    if not context.enabled:
        return None
    problem = context.verifying_problem()
    if problem is not None:
        return problem
    verdict = getattr(message, VERDICT, None)
    if verdict is None:
        verdict = _verdict(message, context)
    if isinstance(verdict, str):
        return verdict
    try:
        seen = _seen(message, verdict)
    except redis.RedisError as exc:
        return f"security: replay record unreachable ({exc}); not run"
    if seen == "replayed":
        return f"security: replayed message (jti {verdict.claims.jti} already ran)"
    return _opened(message, verdict)


def _verdict(message: Any, context: Security) -> Verified | str:
    """What `check_message` says of `message`: what was verified, or why it is refused."""
    assert context.trust is not None
    headers = message.headers
    body = message.body
    data = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    try:
        plain = plain_headers(headers, from_json=getattr(message, FROM_JSON, False))
    except (TypeError, ValueError, RecursionError) as exc:
        return f"security: headers cannot be verified: {type(exc).__name__}"
    plain["bulwark_sig"] = headers.get("bulwark_sig")
    verdict = check_message(
        context.trust.get(),
        plain,
        _queue(message),
        data,
        str(message.content_type or ""),
        now=time.time(),
        skew=context.settings.clock_skew,
        parsed=getattr(message, CLAIMS, None),
    )
    if isinstance(verdict, str):
        return f"security: {verdict}"
    return verdict


def _opened(message: Any, verdict: Verified) -> str | None:
    """Open a sealed message's arguments in place (the body Celery will decode)."""
    claims = verdict.claims
    try:
        body = sealed.open_message(message.body, message.headers, claims.iss, claims.jti)
    except sealed.SealError as exc:
        return f"security: sealed arguments do not open: {exc}"
    except (ValueError, TypeError) as exc:
        return f"security: sealed arguments are not JSON: {type(exc).__name__}"
    if body is not None:
        message.body = body
        message._decoded_cache = None
    return None


def jti_of(message: Any) -> tuple[str, int] | None:
    """(jti, exp) of a message's signature header, if it has a well-formed one. The parsed
    header is kept on the message (`CLAIMS`) for its verification."""
    headers = message.headers
    if not isinstance(headers, dict):
        return None
    parsed = parse_claims(headers.get("bulwark_sig"))
    setattr(message, CLAIMS, parsed)
    if isinstance(parsed, str):
        return None
    return parsed[0].jti, parsed[0].exp
