"""Sign a crafted kombu envelope as a producer would (tests that write to queues by hand)."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from policies.signing import SIG_HEADER, Claims, sign
from workers.security.context import Security, security
from workers.security.signer import plain_headers


def sign_envelope(
    message: dict[str, Any],
    queue: str,
    *,
    context: Security | None = None,
    iat: int | None = None,
    exp: int | None = None,
    jti: str | None = None,
) -> dict[str, Any]:
    """`message` with a `bulwark_sig` header over its headers, queue and body bytes, as the
    identity of `context` (this process's by default); left as it is if it cannot be read."""
    context = context or security()
    assert context.key is not None and context.identity is not None and context.kid is not None
    try:
        headers = message["headers"]
        body = base64.b64decode(message["body"], validate=True)
        content_type = message["content-type"]
        plain = plain_headers(headers)
    except Exception:  # malformed on purpose: the worker refuses it before any signature
        return message
    now = int(time.time())
    claims = Claims(
        context.identity,
        context.kid,
        now if iat is None else iat,
        now + 3600 if exp is None else exp,
        jti or uuid.uuid4().hex,
    )
    headers[SIG_HEADER] = sign(context.key, claims, plain, queue, body, str(content_type))
    return message
