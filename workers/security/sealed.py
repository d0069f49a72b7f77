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
- Errors: an exception's message may quote the arguments, so the worker shows an
  encrypted task's exception by its type only, "TypeError: (sealed)": in Celery's
  log lines about the task (`SealedErrorFilter`, the traceback keeps its frames)
  and in its `task-failed` and `task-retried` events (`SealedEvents`, what Flower
  shows). Its return value is not logged nor sent in `task-succeeded` either.
"""

from __future__ import annotations

import functools
import json
import logging
import time
import traceback
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from celery import signals
from celery.utils.imports import symbol_by_name
from celery.utils.serialization import UnpickleableExceptionWrapper

from policies.authz import glob_match
from policies.sealing import KeyRing, SealError, open_sealed, seal
from workers.security.context import security
from workers.settings import get_settings

__all__ = [
    "JTI_HEADER",
    "SEALED",
    "SealError",
    "SealedErrorFilter",
    "SealedEvents",
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
#: What is shown of an encrypted task's exception message (after its type).
SEALED_TEXT = "(sealed)"
#: Celery's logger of task outcomes ("Task x[id] raised unexpected: ...", retries, ...).
TRACE_LOGGER = "celery.app.trace"


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


def open_message(body: Any, headers: dict[str, Any], producer: str, jti: str) -> bytes | None:
    """The body of a sealed task message with its arguments opened; None if not sealed.

    Raises `SealError` (tampered, moved, unknown or retired key) naming the reason.
    """
    if not isinstance(body, bytes):
        body = str(body).encode("utf-8", "surrogatepass")
    if SEALED.encode() not in body:  # most messages: no JSON parse in the consumer for them
        return None
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


def error_name(exc: Any) -> str:
    """The type name of `exc` as the worker sees it (unwrapped from billiard and Celery)."""
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    if isinstance(exc, UnpickleableExceptionWrapper):
        return str(exc.exc_cls_name)
    return type(exc).__name__


def sealed_error(exc: Any) -> str:
    """`exc` as an encrypted task's error is shown: its type, not its message."""
    return f"{error_name(exc)}: {SEALED_TEXT}" if exc is not None else SEALED_TEXT


def _frames(tb: TracebackType | None, said: str) -> str:
    """A traceback with its frames (file, line, code) and `said` in place of the exception."""
    frames = "".join(traceback.format_list(traceback.extract_tb(tb))) if tb is not None else ""
    return f"Traceback (most recent call last):\n{frames}{said}"


class SealedErrorFilter(logging.Filter):
    """On Celery's `celery.app.trace` logger: a line about an encrypted task's failure or
    retry names the exception's type, not its message, and its traceback only the frames.

    Celery logs `"Task %(name)s[%(id)s] %(description)s: %(exc)s"` with the context as
    the record's arguments (and as its `data` extra) and the exception as `exc_info`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        context = record.args
        if not isinstance(context, Mapping) or "exc" not in context:
            return True
        if not encrypted(str(context.get("name"))):
            return True
        exc_info = record.exc_info
        said = sealed_error(exc_info[1]) if exc_info and exc_info[1] is not None else SEALED_TEXT
        frames = _frames(exc_info[2], said) if exc_info else said
        hidden = {**context, "exc": said}
        if "traceback" in context:
            hidden["traceback"] = frames
        record.args = hidden
        if isinstance(record.__dict__.get("data"), Mapping):
            record.__dict__["data"] = hidden
        if exc_info:
            record.exc_info, record.exc_text = None, frames
        return True


class SealedEvents:
    """Mixed into the worker's request class of an encrypted task: its `task-failed` and
    `task-retried` events (what Flower stores and shows) carry the exception's type, not
    its message or traceback. The worker's main process sends them; `on_failure` and
    `on_retry` see the exception first."""

    _sealed_error = SEALED_TEXT

    def on_failure(self, exc_info: Any, *args: Any, **kwargs: Any) -> Any:
        self._sealed_error = sealed_error(exc_info.exception)
        return super().on_failure(exc_info, *args, **kwargs)  # type: ignore[misc]

    def on_retry(self, exc_info: Any) -> Any:
        retry = exc_info.exception
        cause = getattr(retry, "exc", None)
        self._sealed_error = sealed_error(retry if cause is None else cause)
        return super().on_retry(exc_info)  # type: ignore[misc]

    def send_event(self, type: str, **fields: Any) -> None:
        for key in ("exception", "traceback"):
            if key in fields:
                fields[key] = self._sealed_error
        super().send_event(type, **fields)  # type: ignore[misc]


def _sealed_request(request: Any) -> type:
    """The request class `request` (a class or its name) with `SealedEvents` mixed in."""
    base = symbol_by_name(request)
    if issubclass(base, SealedEvents):
        return base  # type: ignore[no-any-return]
    return type(f"Sealed{base.__name__}", (SealedEvents, base), {"__module__": __name__})


def _seal_worker(sender: Any = None, **_: Any) -> None:
    """Before the worker consumes or forks: for each encrypted task, its return value is
    not shown (`resultrepr_maxsize` 0: Celery's log line and `task-succeeded` say ', ...'),
    its events name only the type of an exception; Celery's lines about it too."""
    app = getattr(sender, "app", None)
    for name, task in app.tasks.items() if app is not None else ():
        if encrypted(name):
            task.resultrepr_maxsize = 0
            task.Request = _sealed_request(task.Request)
    trace_logger = logging.getLogger(TRACE_LOGGER)
    if not any(isinstance(f, SealedErrorFilter) for f in trace_logger.filters):
        trace_logger.addFilter(SealedErrorFilter())


def connect() -> None:
    signals.worker_init.connect(_seal_worker, weak=False, dispatch_uid="bulwark.sealed.hide")
