"""Encrypted tasks: the arguments and results of tasks named by `BULWARK_ENCRYPT` travel
and rest sealed with AES-256-GCM (`policies.sealing`).

- Sending (the client, and a worker re-sending a retry): `seal_send` replaces the
  arguments with `kwargs={"bulwark_sealed": token}` and `argsrepr`/`kwargsrepr`
  with "'<sealed>'", so the broker list, the unacked hash, events, Flower and
  logs only ever hold the token. The associated data binds the key id, task
  name, task id, producer and the message's jti, so a token moved into another
  message does not open; a retry is sealed anew, under its own jti.
- Receiving: `open_message` runs in the consumer after the signature is verified
  and before Celery decodes the body: the worker's own memory is the only place
  the arguments are plain.
- At rest: the result of an encrypted task is sealed in the result backend (its
  extended `args`/`kwargs` are not stored), and its dead letter keeps the
  arguments sealed; `bulwark deadletter replay` opens them and sends them anew.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

from celery import signals

from policies.authz import glob_match
from policies.sealing import KeyRing, SealError, open_sealed, seal
from workers.security.context import security
from workers.settings import get_settings

__all__ = [
    "JTI_HEADER",
    "SEALED",
    "SealError",
    "connect",
    "encrypted",
    "open_message",
    "open_value",
    "seal_send",
    "seal_value",
]

SEALED = "bulwark_sealed"
#: The jti a sealed message is signed with, chosen when it is sealed (the signer takes it).
JTI_HEADER = "bulwark_jti"
HIDDEN = "'<sealed>'"


def encrypted(name: str) -> bool:
    """Whether task `name`'s arguments and results are encrypted."""
    return any(glob_match(g, name) for g in get_settings().security.encrypt)


@functools.cache
def _ring_file() -> str:
    path = get_settings().security.data_keys_file
    if not path:
        raise SealError("no_key", "BULWARK_ENCRYPT is set but BULWARK_DATA_KEYS_FILE is not")
    return path


_rings: dict[str, tuple[float, KeyRing]] = {}


def ring() -> KeyRing:
    """The data key ring, re-read at most every 2 s (a rotation reaches every process)."""
    path = _ring_file()
    cached = _rings.get(path)
    if cached is not None and time.monotonic() - cached[0] < 2.0:
        return cached[1]
    loaded = KeyRing.load(path)
    _rings[path] = (time.monotonic(), loaded)
    return loaded


def forget() -> None:
    _ring_file.cache_clear()
    _rings.clear()


def _open(token: str, aad: dict[str, str]) -> bytes:
    """Open `token`; a key this process has not seen yet (rotated within the last 2 s
    elsewhere) makes it read the ring again, once."""
    try:
        return open_sealed(ring(), token, aad, time.time())
    except SealError as exc:
        if exc.reason != "unknown_key":
            raise
        _rings.clear()
        return open_sealed(ring(), token, aad, time.time())


def _aad(name: str, task_id: str, producer: str, jti: str) -> dict[str, str]:
    return {"task": name, "id": task_id, "producer": producer, "jti": jti}


def seal_send(name: str, args: Any, kwargs: Any, options: dict[str, Any]) -> tuple[Any, Any]:
    """(args, kwargs) to send for task `name`: sealed if it is encrypted (and `options`
    get the task id, the jti and the hidden reprs); as given otherwise."""
    if not encrypted(name) or (isinstance(kwargs, dict) and SEALED in kwargs and not args):
        return args, kwargs
    context = security()
    task_id = options.setdefault("task_id", str(uuid.uuid4()))
    jti = uuid.uuid4().hex
    plain = json.dumps([list(args or ()), dict(kwargs or {})]).encode()
    token = seal(ring(), plain, _aad(name, task_id, context.identity or "", jti), time.time())
    options["headers"] = {**(options.get("headers") or {}), JTI_HEADER: jti}
    options["argsrepr"] = options["kwargsrepr"] = HIDDEN
    return [], {SEALED: token}


def open_message(body: bytes, headers: dict[str, Any], producer: str, jti: str) -> bytes | None:
    """The body of a sealed task message with its arguments opened; None if not sealed.

    Raises `SealError` (tampered, moved, unknown or retired key) naming the reason.
    """
    try:
        args, kwargs, embed = json.loads(body)
    except (ValueError, TypeError):
        return None  # not [args, kwargs, embed]: the body checks that come next say so
    if not (isinstance(kwargs, dict) and SEALED in kwargs) or args:
        return None
    token = kwargs[SEALED]
    if not isinstance(token, str) or len(kwargs) != 1:
        raise SealError("malformed", "a sealed message holds one text token and nothing else")
    aad = _aad(str(headers.get("task")), str(headers.get("id")), producer, jti)
    plain_args, plain_kwargs = json.loads(_open(token, aad))
    return json.dumps([plain_args, plain_kwargs, embed]).encode()


def seal_value(value: Any, name: str, task_id: str, purpose: str) -> dict[str, str]:
    """`value` (JSON) sealed at rest for task `task_id` (a result, a dead letter)."""
    aad = {"task": name, "id": task_id, "purpose": purpose}
    return {SEALED: seal(ring(), json.dumps(value).encode(), aad, time.time())}


def open_value(sealed: dict[str, str], name: str, task_id: str, purpose: str) -> Any:
    aad = {"task": name, "id": task_id, "purpose": purpose}
    return json.loads(_open(sealed[SEALED], aad))


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEALED}


def _hide_results(sender: Any = None, **_: Any) -> None:
    """Celery logs a task's return value and sends it in `task-succeeded` events (Flower):
    an encrypted task's is shown as ', ...' (`resultrepr_maxsize` 0)."""
    app = getattr(sender, "app", None)
    for name, task in app.tasks.items() if app is not None else ():
        if encrypted(name):
            task.resultrepr_maxsize = 0


def connect() -> None:
    signals.worker_init.connect(_hide_results, weak=False, dispatch_uid="bulwark.sealed.hide")
