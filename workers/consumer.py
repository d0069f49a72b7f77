"""The worker's message consumer: a message it cannot run is dead-lettered, never dropped,
and never stops the worker.

Celery logs and acknowledges a message it cannot decode (pickle, when only JSON
is accepted), an unknown task name, or a malformed message, and the message is
gone; a message whose headers have the wrong types (`timelimit: "abc"`, no
`id`) raises out of Celery's handler and stops the worker, or makes it
reconnect and redeliver everything in flight. `GuardedConsumer` checks each
task message first (`workers.envelope.task_problem`), keeps any message it
refuses in the dead-letter store with the reason (its raw body, size-capped),
acknowledges it, and goes on; a message that still makes Celery's handler
raise is refused the same way.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ClassVar

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import registry
from vine import promise

from policies.deadletter import DeadLetter
from workers.delayed_delivery import CELERY_STEP, STEP
from workers.envelope import body_problem, eta_problem, header_problem, kept_raw
from workers.resources import broker_redis
from workers.security.audit import Action, record_message
from workers.security.verifier import message_problem
from workers.settings import get_settings
from workers.transport import keep

logger = logging.getLogger(__name__)


def _text(value: Any, default: str) -> str:
    return value[:200] if isinstance(value, str) and value else default


def _letter_from_message(message: Any, reason: str, exc: BaseException | None) -> DeadLetter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = getattr(message, "delivery_info", None) or {}
    raw = message.body
    body = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "surrogatepass")
    return DeadLetter(
        task_name=_text(headers.get("task"), "<unknown>"),
        task_id=_text(headers.get("id"), "") or None,
        queue=_text(delivery.get("routing_key"), "") or None,
        reason=reason,
        error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
        content_type=_text(message.content_type, "") or None,
        **kept_raw(body),
    )


def _refused(message: Any, exc: BaseException | None = None) -> str:
    if message.content_type == JSON and not isinstance(exc, ContentDisallowed):
        return f"body is not valid JSON: {exc}"
    serializer = registry.type_to_name.get(message.content_type, "unknown serializer")
    return f"refused content type {message.content_type!r} ({serializer}): only json is accepted"


JSON = "application/json"

#: Set on a message once it is kept, so that one message is never kept twice.
KEPT = "_bulwark_dead_lettered"

#: How the consumer tries the broker again after losing it: after 0.5 s, then 1.5 s
#: more, ... at most 5 s apart. Celery's (kombu's defaults: 2 s, then 4 s, ... 30 s)
#: added 4 s to a Sentinel failover the sentinels had done in one.
RECONNECT = {"interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}


class GuardedConsumer(Consumer):  # type: ignore[misc]
    class Blueprint(Consumer.Blueprint):  # type: ignore[misc]
        default_steps: ClassVar[list[str]] = [
            STEP if s == CELERY_STEP else s for s in Consumer.Blueprint.default_steps
        ]

    def ensure_connected(self, conn: Any) -> Any:
        # Celery's, with the intervals of `RECONNECT` (it passes none to kombu).
        conn.ensure_connection = functools.partial(conn.ensure_connection, **RECONNECT)
        try:
            return super().ensure_connected(conn)
        finally:
            del conn.ensure_connection  # the class's method again

    def _dead_letter(self, message: Any, reason: str, exc: BaseException | None) -> None:
        if getattr(message, KEPT, False):
            return
        try:
            letter = _letter_from_message(message, reason, exc)
        except Exception:  # a message too odd to describe: still keep what can be kept
            logger.exception("could not describe a refused message (%s)", reason)
            letter = DeadLetter(task_name="<unknown>", reason=reason)
        record_message(Action.MESSAGE_REJECTED, message, reason=reason)
        kept = keep(letter, broker_redis())
        if kept is None:
            logger.error("could not dead-letter a refused message (%s)", reason)
            return
        setattr(message, KEPT, True)
        logger.error(
            "dead-lettered refused message",
            extra={"reason": reason, "deadletter_id": kept.id, "task_id": kept.task_id},
        )

    def _refuse(self, message: Any, reason: str, exc: BaseException | None = None) -> None:
        """Keep `message` with `reason`, then take it off the queue: the worker goes on."""
        self._dead_letter(message, reason, exc)
        if not message.acknowledged:
            message.reject_log_error(logger, self.connection_errors)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        # Celery's own logs the headers and body at CRITICAL: one bad message is an error,
        # kept with its reason, and its content stays out of the log.
        self._refuse(message, _refused(message, exc), exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = _refused(message, exc) if isinstance(exc, ContentDisallowed) else "invalid task"
        self._dead_letter(message, f"{reason}: {exc}", exc)
        super().on_invalid_task(body, message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "unknown task name", exc)
        super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a task message", None)
        super().on_unknown_message(body, message)

    def create_task_handler(self, promise: Any = promise) -> Callable[[Any], Any]:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            try:
                problem = self._problem(message)
                if problem is not None:
                    return self._refuse(message, problem)
                record_message(Action.MESSAGE_ACCEPTED, message)
                return handle(message)
            except Exception as exc:
                logger.warning("a message made the worker's handler raise", exc_info=True)
                return self._refuse(
                    message, f"the worker cannot take this message: {type(exc).__name__}", exc
                )

        return on_task_received

    def _problem(self, message: Any) -> str | None:
        """Why a protocol-2 task message cannot run; None for anything Celery handles itself.

        In order: the headers' shapes; then security (signature, key, expiry, replay,
        authorization), before the body is decoded; then the body's shape.
        """
        headers = message.headers
        if not isinstance(headers, dict) or "task" not in headers:
            return None  # protocol 1 or not a task: Celery dead-letters it through our hooks
        problem = header_problem(headers, message.properties)
        if problem is None and message.content_type != JSON:
            problem = _refused(message, ContentDisallowed(message.content_type))
        problem = problem or message_problem(message)
        if problem is not None:
            return problem
        try:
            body = message.decode()
        except ContentDisallowed:
            return None  # Celery refuses it and calls on_invalid_task / on_decode_error
        except (DecodeError, ValueError, TypeError, RecursionError) as exc:
            return _refused(message, exc)
        return body_problem(body) or _beyond_horizon(headers)


def _beyond_horizon(headers: dict[str, Any]) -> str | None:
    """A task whose ETA outlasts the visibility timeout would be delivered twice."""
    return eta_problem(headers.get("eta"), get_settings().countdown_horizon)
