"""Message signatures: who sent a task message, and that nothing that decides what runs
was changed on the way.

A producer signs, with its Ed25519 key, a canonical encoding of:
- its claims: identity (`iss`), key id (`kid`), issued-at, expiry and a unique
  id (`jti`, accepted once fleet-wide);
- every message header (task name, task id, ETA, expiry, retries, time limits,
  group, chain ids, Bulwark's own headers, ...) except the few that change in
  transit or only carry observability context (`UNSIGNED`);
- the queue it is sent to (so a message moved to another queue fails);
- the content type and the SHA-256 of the exact body bytes (args, kwargs and
  embedded callbacks/chains), so the worker verifies before decoding them.

The claims and the signature travel in one header, `bulwark_sig`. Headers are
passed in their JSON form (what both ends see after a JSON round trip), so
the producer's tuples and the worker's lists encode alike.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from policies.authz import authorize
from policies.trust import Identity, TrustStore

__all__ = [
    "SIG_HEADER",
    "UNSIGNED",
    "Claims",
    "Verified",
    "canonical",
    "check_message",
    "check_signed",
    "parse_claims",
    "queue_of",
    "sign",
    "signed_headers",
    "verify_by",
]

SIG_HEADER = "bulwark_sig"
#: Headers outside the signature: the signature itself, kombu's redelivery mark, the
#: sent time and trace context (observability, never what runs).
UNSIGNED = frozenset(
    {SIG_HEADER, "redelivered", "bulwark_sent_at", "traceparent", "tracestate", "baggage"}
)
_DOMAIN = b"bulwark-message-v1\n"
_JTI = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@:-]{1,128}$")


_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical(value: Any) -> bytes:
    """One encoding for one value: sorted keys, no spaces, UTF-8, no NaN."""
    return _CANONICAL.encode(value).encode("utf-8", "surrogatepass")


#: Headers RabbitMQ adds on its way: dead-lettering (`x-death`, `x-first-death-*`,
#: `x-last-death-*`, as a countdown passes the delay queues) and a quorum queue's
#: redelivery count. The broker's bookkeeping, never what runs.
BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


def signed_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in headers.items()
        if k not in UNSIGNED
        and k not in BROKER_HEADERS
        and not (k.startswith("x-") and k.startswith(BROKER_HEADER_PREFIXES))
    }


@dataclass(frozen=True, slots=True)
class Claims:
    iss: str
    kid: str
    iat: int
    exp: int
    jti: str

    def as_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, a fifth of a verification's Python time.
        return {"iss": self.iss, "kid": self.kid, "iat": self.iat, "exp": self.exp,
                "jti": self.jti}  # fmt: skip


def _input(
    claims: Claims, headers: Mapping[str, Any], queue: str, body: bytes, content_type: str
) -> bytes:
    return _DOMAIN + canonical(
        {
            "claims": claims.as_dict(),
            "headers": signed_headers(headers),
            "queue": queue,
            "content_type": content_type,
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    )


#: The prefix RabbitMQ's native delayed delivery (kombu) puts before a countdown's routing
#: key: 28 binary digits of the delay, dot-separated. Bounded: matched in linear time.
_DELAY_PREFIX = re.compile(r"(?:[01]\.){28}")


def queue_of(routing_key: str) -> str:
    """The queue a routing key names: without native delayed delivery's prefix, which
    says how long RabbitMQ holds the message (its `eta` header, signed, says when it runs)
    and is rewritten as it passes through the delay queues."""
    found = _DELAY_PREFIX.match(routing_key)
    return routing_key[found.end() :] if found else routing_key


def sign(
    key: Ed25519PrivateKey,
    claims: Claims,
    headers: Mapping[str, Any],
    queue: str,
    body: bytes,
    content_type: str,
) -> dict[str, Any]:
    """The `bulwark_sig` header value: the claims and their signature."""
    signature = key.sign(_input(claims, headers, queue_of(queue), body, content_type))
    return {**claims.as_dict(), "sig": base64.b64encode(signature).decode()}


def parse_claims(value: Any) -> tuple[Claims, bytes] | str:
    """(claims, signature) from a `bulwark_sig` header, or why it is not one."""
    if value is None:
        return "message is not signed (no bulwark_sig header)"
    if not isinstance(value, dict):
        return "bulwark_sig is not an object"
    try:
        iss, kid, jti, sig = (value[k] for k in ("iss", "kid", "jti", "sig"))
        iat, exp = value["iat"], value["exp"]
    except KeyError as exc:
        return f"bulwark_sig has no {exc.args[0]!r}"
    if not all(isinstance(x, str) for x in (iss, kid, jti, sig)):
        return "bulwark_sig fields iss, kid, jti and sig must be text"
    if not (_NAME.match(iss) and _NAME.match(kid)):
        return "bulwark_sig iss or kid is not a name"
    if not _JTI.match(jti):
        return "bulwark_sig jti is not 32 hex digits"
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (iat, exp)):
        return "bulwark_sig iat and exp must be whole seconds"
    if len(sig) > 200:
        return "bulwark_sig signature is too long"
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return "bulwark_sig signature is not base64"
    return Claims(iss, kid, iat, exp, jti), signature


def verify_by(
    trust: TrustStore,
    iss: str,
    kid: str,
    signature: bytes,
    data: bytes,
    *,
    now: float,
    who: str = "producer",
) -> Identity | str:
    """Whether `iss` signed `data` with its key `kid`: the identity and its key known, the
    key valid at `now`, the signature good. The identity, or the reason it is refused."""
    identity = trust.identity(iss)
    if identity is None:
        return f"unknown {who} {iss!r}"
    key = trust.key(iss, kid)
    if key is None:
        return f"unknown key {kid!r} for {who} {iss!r}"
    problem = key.problem(datetime.fromtimestamp(now, UTC))
    if problem is not None:
        return problem
    if not key.verifies(signature, data):
        return f"bad signature ({who} {iss!r}, key {kid})"
    return identity


def check_signed(
    trust: TrustStore,
    value: Any,
    signed: Callable[[Claims], bytes],
    *,
    now: float,
    skew: float,
    who: str = "producer",
    parsed: tuple[Claims, bytes] | str | None = None,
) -> tuple[Claims, Identity] | str:
    """Verify a `bulwark_sig` value over `signed(claims)`: the claims' shape, the identity
    and its key (known, valid at `now`), the signature, then issue time and expiry.
    (claims, identity), or the reason it is refused. `parsed` is `parse_claims(value)`
    when the caller has it already."""
    parsed = parse_claims(value) if parsed is None else parsed
    if isinstance(parsed, str):
        return parsed
    claims, signature = parsed
    try:
        identity = verify_by(trust, claims.iss, claims.kid, signature, signed(claims),
                             now=now, who=who)  # fmt: skip
    except (TypeError, ValueError, RecursionError) as exc:  # not JSON after kombu decoded it
        return f"cannot verify: {type(exc).__name__}: {exc}"
    if isinstance(identity, str):
        return identity
    if claims.iat > now + skew:
        return f"issued {claims.iat - now:.0f} s in the future (clock skew allowed: {skew:g} s)"
    if claims.exp < now:
        return f"expired {now - claims.exp:.0f} s ago"
    return claims, identity


@dataclass(frozen=True, slots=True)
class Verified:
    claims: Claims
    role: str


def check_message(
    trust: TrustStore,
    headers: Mapping[str, Any],
    queue: str,
    body: bytes,
    content_type: str,
    *,
    now: float,
    skew: float = 30.0,
    parsed: tuple[Claims, bytes] | str | None = None,
) -> Verified | str:
    """Verify a received message: signature, key, validity, expiry, authorization.

    Returns what was verified, or the reason it is refused. The replay check (the
    jti, once fleet-wide) needs Redis and is the caller's. `parsed` is
    `parse_claims(headers[SIG_HEADER])` when the caller has it already.
    """
    queue = queue_of(queue)
    checked = check_signed(
        trust,
        headers.get(SIG_HEADER),
        lambda claims: _input(claims, headers, queue, body, content_type),
        now=now,
        skew=skew,
        parsed=parsed,
    )
    if isinstance(checked, str):
        return checked
    claims, identity = checked
    task = headers.get("task")
    refused = authorize(identity.grant, str(task), queue, len(body))
    if refused is not None:
        return f"producer {claims.iss!r} {refused}"
    return Verified(claims, identity.role)
