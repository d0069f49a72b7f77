"""This process's audit log (`policies.audit`), and what the worker records in it.

One log per process (a prefork child makes its own after the fork: a chain has
one writer), written by a background flusher every 200 ms in one pipelined
round trip, so no task waits on it; stopped (and its last records written,
with a signed checkpoint) when the process ends. With no audit key
(`BULWARK_AUDIT_KEY_FILE`) there is no log and nothing is recorded.

Records keep who (the signing producer, or the operator), what, when, the
task id and the SHA-256 of the message body: never the arguments.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any

from celery import signals

from policies.audit import Action, AuditLog, args_digest, load_private_key, writer_id
from policies.signing import SIG_HEADER
from workers.resources import policy_redis
from workers.settings import get_settings

__all__ = ["Action", "audit_log", "connect", "forget", "record", "record_message"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_log: tuple[int, AuditLog | None] | None = None


def audit_log(role: str = "") -> AuditLog | None:
    """This process's audit log (made on first use, again after a fork); None if off."""
    global _log
    pid = os.getpid()
    with _lock:
        if _log is not None and _log[0] == pid:
            return _log[1]
        settings = get_settings().security
        key_file = settings.audit_key_file or _dev_audit_key()
        log = None
        if key_file:
            try:
                key = load_private_key(key_file)
            except (OSError, ValueError) as exc:
                logger.error("audit log off: %s", exc)
            else:
                log = AuditLog(
                    writer=writer_id(role),
                    signing_key=key,
                    client=policy_redis(),
                    directory=settings.audit_dir,
                ).start(0.2)
                atexit.register(log.stop)
        _log = (pid, log)
        return log


def _dev_audit_key() -> str | None:
    """The development audit key in the keys folder (`bulwark keys init`), if there is one."""
    found = get_settings().keys_folder / "audit.pem"
    return str(found) if found.exists() else None


def record(action: str, *, actor: str, task_id: str | None = None,
           digest: str | None = None, **details: str) -> None:  # fmt: skip
    """Record one event (no I/O: the flusher writes it); never raises."""
    log = audit_log()
    if log is None:
        return
    try:
        log.record(action, actor=actor, task_id=task_id, args_digest=digest,
                   details={k: v[:500] for k, v in details.items()})  # fmt: skip
    except Exception:
        logger.exception("audit record %s failed", action)


def producer_of(headers: Any) -> str:
    """`producer:<identity>` of a message, as its signature claims it (or 'unsigned')."""
    sig = headers.get(SIG_HEADER) if isinstance(headers, dict) else None
    iss = sig.get("iss") if isinstance(sig, dict) else None
    return f"producer:{iss[:128]}" if isinstance(iss, str) else "unsigned"


def record_message(action: str, message: Any, **details: str) -> None:
    """Record an event about a received kombu message."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    body = message.body
    data = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
    record(action, actor=producer_of(headers), task_id=task_id, digest=args_digest(data),
           task=str(headers.get("task"))[:200], **details)  # fmt: skip


def _on_postrun(task_id: str | None = None, task: Any = None, state: str | None = None,
                **_: Any) -> None:  # fmt: skip
    headers = getattr(getattr(task, "request", None), "headers", None) or {}
    sig = getattr(getattr(task, "request", None), SIG_HEADER, None)
    actor = producer_of({SIG_HEADER: sig} if sig is not None else headers)
    record(Action.MESSAGE_EXECUTED, actor=actor, task_id=task_id,
           task=getattr(task, "name", "?"), outcome=str(state))  # fmt: skip


def _on_process_shutdown(**_: Any) -> None:
    log = _log[1] if _log is not None and _log[0] == os.getpid() else None
    if log is not None:
        log.stop()


def forget() -> None:
    """Stop and drop this process's log (tests that point the settings elsewhere)."""
    global _log
    _on_process_shutdown()
    _log = None


def connect() -> None:
    """Record every task's outcome, and write the last records when a process ends."""
    signals.task_postrun.connect(_on_postrun, weak=False, dispatch_uid="bulwark.audit.postrun")
    signals.worker_process_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="bulwark.audit.shutdown"
    )
    signals.worker_shutdown.connect(
        _on_process_shutdown, weak=False, dispatch_uid="bulwark.audit.worker_shutdown"
    )
