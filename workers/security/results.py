"""Signed results: a result is stored with the signature of the process that wrote it,
and refused on read unless a trusted identity signed it.

Without this, whoever can write to Redis can forge a task's result, and a forged
FAILURE names the exception class a reader will import and build (Celery turns
`exc_module`/`exc_type` into an exception object). `SignedRedisBackend` wraps
every value it writes (task results, group results) as

    {"bulwark_result": 1, "payload": <Celery's JSON>, "iss": ..., "kid": ..., "sig": ...}

signed with Ed25519 over a domain tag and the payload, whose meta holds the task
id; a read verifies the signature against the trust store before Celery decodes
anything, and checks that a task's meta names that task. With security off it
is Celery's Redis backend, unchanged.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from celery.backends.redis import RedisBackend
from kombu.utils.encoding import bytes_to_str

from policies.signing import verify_by
from workers.security import sealed
from workers.security.context import security

__all__ = ["ResultRefused", "SignedRedisBackend", "install"]

_DOMAIN = b"bulwark-result-v1\n"
MARK = "bulwark_result"


class ResultRefused(Exception):
    """A stored result is not signed by a trusted identity: it is not decoded."""


def install(app: Any) -> None:
    """Make `redis://` and `rediss://` result backends of `app` `SignedRedisBackend`.

    Through the loader's backend aliases, not the URL: `celery worker` sets
    `result_backend` from CELERY_RESULT_BACKEND itself, past Bulwark's config.
    """
    name = f"{__name__}:SignedRedisBackend"
    app.loader.override_backends = {**app.loader.override_backends, "redis": name, "rediss": name}


def _seal_meta(data: Any) -> Any:
    """The meta of an encrypted task with its result sealed and no extended arguments."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return data
    name, task_id = data["name"], str(data.get("task_id"))
    if not sealed.encrypted(name) or sealed.is_sealed(data.get("result")):
        return data
    hidden = {**data, "args": None, "kwargs": None, "traceback": None}
    kept = {"result": data.get("result"), "traceback": data.get("traceback")}
    hidden["result"] = sealed.seal_value(kept, name, task_id, "result")
    return hidden


def _open_meta(meta: Any) -> Any:
    if not isinstance(meta, dict) or not sealed.is_sealed(meta.get("result")):
        return meta
    kept = sealed.open_value(meta["result"], str(meta.get("name")), str(meta.get("task_id")),
                             "result")  # fmt: skip
    return {**meta, **kept}


class SignedRedisBackend(RedisBackend):  # type: ignore[misc]
    def encode(self, data: Any) -> Any:
        payload = super().encode(_seal_meta(data))
        context = security()
        if not context.enabled or context.key is None:
            return payload
        text = bytes_to_str(payload)
        signature = context.key.sign(_DOMAIN + text.encode("utf-8"))
        return json.dumps(
            {
                MARK: 1,
                "payload": text,
                "iss": context.identity,
                "kid": context.kid,
                "sig": base64.b64encode(signature).decode(),
            }
        )

    def decode(self, payload: Any) -> Any:
        if payload is None or not security().enabled:
            return _open_meta(super().decode(payload))
        return _open_meta(super().decode(verified(payload)))

    def _get_task_meta_for(self, task_id: Any) -> Any:
        meta = super()._get_task_meta_for(task_id)
        stored = meta.get("task_id")
        if stored is not None and bytes_to_str(stored) != bytes_to_str(task_id):
            raise ResultRefused(f"result of {task_id} names another task ({stored})")
        return meta


def verified(payload: Any) -> str:
    """The inner payload of a signed result, or `ResultRefused` saying why not."""
    context = security()
    trust = context.trust.get() if context.trust is not None else None
    if trust is None:
        raise ResultRefused("no trust store to verify results (BULWARK_TRUST_FILE)")
    try:
        wrapper = json.loads(bytes_to_str(payload))
    except (ValueError, UnicodeDecodeError):
        raise ResultRefused("stored result is not signed (not JSON)") from None
    if not isinstance(wrapper, dict) or wrapper.get(MARK) != 1:
        raise ResultRefused("stored result is not signed")
    inner, iss, kid, sig = (wrapper.get(k) for k in ("payload", "iss", "kid", "sig"))
    if not all(isinstance(x, str) for x in (inner, iss, kid, sig)):
        raise ResultRefused("stored result's signature is malformed")
    try:
        signature = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise ResultRefused("stored result's signature is not base64") from None
    found = verify_by(trust, iss, kid, signature, _DOMAIN + inner.encode("utf-8"),
                      now=time.time(), who="writer")  # fmt: skip
    if isinstance(found, str):
        raise ResultRefused(f"stored result: {found}")
    return inner  # type: ignore[return-value]
