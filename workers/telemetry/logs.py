"""Logs: one JSON object per line, with the task and the trace it belongs to; secrets masked.

Every line carries `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`,
`pid`, and where known `task_id`, `task_name` (the Celery task running in this
process, or the task a worker line is about), `trace_id` and `span_id` (the
current OpenTelemetry span, hex), then the record's extra fields.

The worker, its prefork children and beat log through Celery's `setup_logging`
signal (answered once `connect()` ran): when a receiver answers it, Celery
leaves logging alone, so this module owns the root logger (level from
`BULWARK_LOG_LEVEL`, JSON or plain text from `BULWARK_LOG_JSON`, Celery's
`--logfile` honoured). Task loggers propagate to the root, so task lines get
the same format.

Secrets never reach a line: `RedactFilter` masks the values of keys named like
password, secret, token, authorization or api_key (in the message text and in
extra fields, nested too), the password of URLs (`redis://:***@host`), and the
value of every configured secret wherever it appears (the settings register
theirs with `workers.telemetry.redact.remember_secrets`), in the message, the
exception, the stack and the extra fields. Celery's own `data` extra (a task's
args and kwargs) is never written.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from celery import signals
from celery._state import get_current_task
from opentelemetry import trace

from workers.settings import SettingsError, get_settings
from workers.telemetry.redact import MASK, SECRET_KEY, redact

__all__ = [
    "JsonFormatter",
    "RedactFilter",
    "TextFormatter",
    "configure",
    "connect",
    "redact",
    "redact_value",
]

#: Nesting below this depth is not written out (hostile input may nest without end).
MAX_DEPTH = 20


def redact_value(value: Any, key: str | None = None, depth: int = 0) -> Any:
    """A JSON-ready copy of `value` with secrets masked (by key name, and inside strings)."""
    if key is not None and value is not None and len(key) <= 256 and SECRET_KEY.search(key):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth >= MAX_DEPTH:
        return "<nested too deeply>"
    if isinstance(value, dict):
        return {redact(str(k)): redact_value(v, str(k), depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [redact_value(v, None, depth + 1) for v in value]
    return redact(str(value))


class RedactFilter(logging.Filter):
    """Masks secrets in a record's message, exception text and extra fields, in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we have, still redacted
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name in extra_fields(record):
            record.__dict__[name] = redact_value(record.__dict__[name], name)
        return True


#: Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
#: Extras never written: Celery's `data` holds a task's args and kwargs.
_DROPPED = frozenset({"data", "task_id", "task_name", "trace_id", "span_id"})


def extra_fields(record: logging.LogRecord) -> list[str]:
    return [k for k in record.__dict__ if k not in _STANDARD and k not in _DROPPED]


def task_context(record: logging.LogRecord) -> dict[str, str]:
    """`task_id` and `task_name` of the running task, else of the task a Celery line is about."""
    task = get_current_task()
    if task is not None and task.request is not None and task.request.id is not None:
        return {"task_id": str(task.request.id), "task_name": str(task.name)}
    data = record.__dict__.get("data")
    if isinstance(data, dict) and data.get("id") and data.get("name"):
        return {"task_id": str(data["id"]), "task_name": str(data["name"])}
    given: dict[str, str] = {
        k: str(record.__dict__[k]) for k in ("task_id", "task_name") if k in record.__dict__
    }
    return given


def trace_context() -> dict[str, str]:
    """`trace_id` and `span_id` (hex) of the current OpenTelemetry span, if there is one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, task and trace ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": _timestamp(record).replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
            **task_context(record),
            **trace_context(),
        }
        for name in extra_fields(record):
            line.setdefault(name, record.__dict__[name])
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal (`BULWARK_LOG_JSON=false`), with the task when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(task)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = task_context(record)
        record.__dict__["task"] = f" {ids['task_name']}[{ids['task_id']}]" if ids else ""
        try:
            return super().format(record)
        finally:
            del record.__dict__["task"]


def configure(
    *,
    level: str | int | None = None,
    json_lines: bool | None = None,
    logfile: str | None = None,
    stream: Any = None,
) -> logging.Handler:
    """Send every log line through one redacting handler on the root logger.

    Defaults come from the settings (`BULWARK_LOG_LEVEL`, `BULWARK_LOG_JSON`).
    Replaces the root logger's handlers; returns the handler installed.
    """
    if level is None or json_lines is None:
        observability = get_settings().observability
        level = observability.log_level if level is None else level
        json_lines = observability.log_json if json_lines is None else json_lines
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(RedactFilter())
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Celery's task loggers stop at `celery.task` unless told to propagate.
    for name in ("celery", "celery.task", "celery.redirected"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # billiard's pool logger ("Process 'ForkPoolWorker-1' exited with ...") does not
    # propagate and had no handler, so Python printed its errors as plain text.
    pool = logging.getLogger("multiprocessing")
    pool.handlers = [handler]
    pool.setLevel(logging.ERROR)
    logging.captureWarnings(True)
    return handler


def _on_setup_logging(logfile: str | None = None, **_: Any) -> None:
    """Celery (worker, its children, beat) asks for logging: configure it ourselves."""
    try:
        configure(logfile=logfile or None)
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None


def _on_celeryd_init(**_: Any) -> None:
    """The worker's first signal, before its start-up checks warn: log as configured now."""
    _on_setup_logging()


def connect() -> None:
    """Answer Celery's `setup_logging` signal, so that this module owns the root logger
    (and configure it already at `celeryd_init`, so that start-up warnings are lines too)."""
    signals.setup_logging.connect(
        _on_setup_logging, weak=False, dispatch_uid="bulwark.logs.setup_logging"
    )
    signals.celeryd_init.connect(
        _on_celeryd_init, weak=False, dispatch_uid="bulwark.logs.celeryd_init"
    )
