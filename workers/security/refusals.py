"""Fleet-wide counts of task messages refused by verification, by kind, for alerting.

A refusal is rare and costs one more round trip: one script
(`policies/lua/refusals_count.lua`) adds it to the current bucket of one hash in
the policy Redis, bucketed by Redis TIME.
A message that passes verification costs nothing here. The fleet snapshot
reads the hash whole (`queue_read`, on its first pipeline; `read` parses it).

The hash, `bulwark:{security:refusals}:counts`: field `<bucket>:<kind>` ->
refusals, buckets of `BUCKET` seconds, the last `KEPT` of them kept (older
fields are dropped when a new one is made, and the key expires once quiet).

Kinds (`classify`; the reasons are `workers.security.verifier.message_problem`'s):

- signature: bad signature, a malformed `bulwark_sig`, headers that cannot be verified
- replay: a jti that already ran
- unauthorized: an unknown producer, or one without the grant (task, queue, payload size)
- credentials: unknown, revoked, not yet valid or expired key; message expired or
  issued in the future
- unsigned: no `bulwark_sig` at all
- other: the replay record unreachable, no trust store, anything not recognised
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from policies import keys
from policies.scripts import Scripts
from workers.resources import policy_redis
from workers.telemetry.metrics import security_refused

__all__ = [
    "BUCKET",
    "KEPT",
    "KINDS",
    "REFUSALS_KEY",
    "RefusalCount",
    "classify",
    "count_refusal",
    "queue_read",
    "read",
    "record",
]

logger = logging.getLogger(__name__)

#: What every refusal reason of the verifier starts with.
PREFIX = "security: "
KINDS = ("signature", "replay", "unauthorized", "credentials", "unsigned", "other")
#: Bucket width (seconds) and how many buckets are kept: five minutes of history.
BUCKET = 10
KEPT = 30
REFUSALS_KEY = keys.key("security", "refusals", "counts")

# Reason (after PREFIX) starts with -> kind; the first match wins.
_STARTS: tuple[tuple[str, str], ...] = (
    ("message is not signed", "unsigned"),
    ("bad signature", "signature"),
    ("cannot verify", "signature"),
    ("bulwark_sig ", "signature"),
    ("headers cannot be verified", "signature"),
    ("replayed message", "replay"),
    ("unknown producer", "unauthorized"),
    ("producer ", "unauthorized"),
    ("unknown key", "credentials"),
    ("key ", "credentials"),
    ("expired ", "credentials"),
    ("issued ", "credentials"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RefusalCount:
    """Refusals of one kind within one bucket of `BUCKET` seconds."""

    kind: str
    #: The bucket's start (unix seconds, Redis clock); it ends `BUCKET` seconds later.
    start: float
    count: int

    @property
    def end(self) -> float:
        return self.start + BUCKET


def classify(reason: str) -> str:
    """The kind of a verifier's refusal reason (one of `KINDS`)."""
    text = reason.removeprefix(PREFIX)
    for start, kind in _STARTS:
        if text.startswith(start):
            return kind
    return "other"


def record(client: redis.Redis, kind: str, *, now: float | None = None) -> int:
    """Add one refusal of `kind` to its bucket (one round trip); `now` is for tests only.

    Returns the refusals of that kind in the bucket so far.
    """
    args: list[str | int] = ["" if now is None else repr(now), kind, BUCKET, KEPT]
    return int(Scripts(client)["refusals_count"](keys=[REFUSALS_KEY], args=args))


def count_refusal(reason: str) -> str:
    """Count a refused message in this worker's metrics and in the fleet's counts.

    Returns its kind. Never raises: a refusal goes on to the dead-letter store
    whatever happens here; a Redis that cannot be written is logged (the
    worker's `bulwark_security_refusals_total` still counts it).
    """
    kind = classify(reason)
    try:
        security_refused(kind)
    except Exception:  # a metric must never stop a refusal
        logger.exception("security refusal metric failed")
    try:
        record(policy_redis(), kind)
    except redis.RedisError as exc:
        logger.warning(
            "security refusal (%s) not counted fleet-wide: Redis unreachable (%s)", kind, exc
        )
    return kind


def queue_read(pipe: redis.client.Pipeline) -> None:
    """Queue the read of every kept bucket on `pipe` (one reply, for `read`)."""
    pipe.hgetall(REFUSALS_KEY)


def read(reply: Mapping[Any, Any], now: float) -> tuple[RefusalCount, ...]:
    """The kept buckets (not older than `KEPT` buckets before `now`), oldest first.

    Fields that do not parse are skipped.
    """
    current = int(now // BUCKET)
    found = []
    for field, value in reply.items():
        text = field.decode() if isinstance(field, bytes) else str(field)
        bucket, _, kind = text.partition(":")
        try:
            number, count = int(bucket), int(value)
        except ValueError:
            continue
        if current - KEPT < number <= current + 1 and kind:
            found.append(RefusalCount(kind=kind, start=float(number * BUCKET), count=count))
    return tuple(sorted(found, key=lambda c: (c.start, c.kind)))
