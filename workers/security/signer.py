"""Signing at publish: every task message this process sends carries `bulwark_sig`.

Connected to Celery's `before_task_publish`, so it signs what the client
sends, what a worker re-sends (a retry or a deferral is a new message, signed
by the worker's own identity with a fresh jti) and what beat schedules. The
body is serialized here exactly as kombu will publish it, so the signature
covers the bytes the worker receives, and the worker verifies them before it
decodes them.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from celery import signals
from kombu.serialization import dumps
from kombu.utils import json as kombu_json

from policies.signing import SIG_HEADER, UNSIGNED, Claims, sign
from workers.security.context import Security, security
from workers.security.sealed import JTI_HEADER

__all__ = ["body_bytes", "connect", "plain_headers", "sign_message"]

logger = logging.getLogger(__name__)


#: Types JSON gives back as they are (`bool` is an `int`, but listed: types match exactly).
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})
#: Values a header walk looks at before it takes the round trip instead.
_WALK_LIMIT = 2000


def _json_plain(value: Any) -> bool:
    """Whether `value` is what JSON decodes to (text-keyed dicts, lists, scalars), so that
    kombu's JSON and back would give it unchanged. Iterative, and bounded."""
    pending, seen = [value], 0
    while pending:
        seen += 1
        if seen > _WALK_LIMIT:
            return False
        item = pending.pop()
        kind = type(item)
        if kind is dict:
            if any(type(k) is not str for k in item):
                return False
            pending.extend(item.values())
        elif kind is list:
            pending.extend(item)
        elif kind not in _JSON_SCALARS:
            return False
    return True


def plain_headers(headers: Mapping[str, Any], *, from_json: bool = False) -> dict[str, Any]:
    """The signed headers as both ends see them: through kombu's JSON and back, plain.

    Headers that came out of JSON (`from_json`: the Redis transport's, decoded from the
    message's JSON envelope) or are plain already are used as they are: the round trip (a
    fifth of a verification's Python time) is for what is not plain, such as the tuples
    and dates a producer's headers hold, or an AMQP table's typed values.
    """
    kept = {k: v for k, v in headers.items() if k not in UNSIGNED}
    if from_json or _json_plain(kept):
        return kept
    return json.loads(kombu_json.dumps(kept))  # type: ignore[no-any-return]


def body_bytes(body: Any) -> tuple[str, bytes]:
    """(content type, bytes) of a task body as kombu publishes it with the JSON serializer."""
    content_type, _encoding, payload = dumps(body, serializer="json")
    return content_type, payload.encode("utf-8") if isinstance(payload, str) else payload


def _due(headers: Mapping[str, Any]) -> float:
    eta = headers.get("eta")
    if isinstance(eta, str):
        try:
            return datetime.fromisoformat(eta).timestamp()
        except ValueError:
            pass
    return time.time()


def sign_message(
    context: Security, headers: dict[str, Any], queue: str, body: Any
) -> dict[str, Any]:
    """Sign a message about to be published; the `bulwark_sig` value (also set in headers)."""
    assert context.key is not None and context.identity is not None and context.kid is not None
    now = int(time.time())
    exp = int(max(now, _due(headers)) + context.settings.message_ttl)
    jti = headers.pop(JTI_HEADER, None)  # chosen when its arguments were sealed
    jti = jti if isinstance(jti, str) else uuid.uuid4().hex
    claims = Claims(context.identity, context.kid, now, exp, jti)
    content_type, data = body_bytes(body)
    value = sign(context.key, claims, plain_headers(headers), queue, data, content_type)
    headers[SIG_HEADER] = value
    return value


def _on_before_publish(
    body: Any = None,
    routing_key: str | None = None,
    headers: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    context = security()
    if not context.enabled or headers is None or "task" not in headers:
        return
    headers.pop(SIG_HEADER, None)  # a retry copies the request's headers: sign anew
    if context.signing_problem() is not None:
        logger.error("task %s sent unsigned: %s", headers.get("task"), context.signing_problem())
        return
    sign_message(context, headers, routing_key or "", body)


def connect() -> None:
    """Sign every task message this process publishes (connect it last: it signs the
    headers as they are when it runs)."""
    signals.before_task_publish.connect(
        _on_before_publish, weak=False, dispatch_uid="bulwark.security.sign"
    )
