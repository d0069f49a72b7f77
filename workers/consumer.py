"""The worker's message consumer: refused messages are dead-lettered, not dropped.

Celery logs and acknowledges a message it cannot decode (pickle, when only JSON
is accepted), an unknown task name, or a malformed message, and the message is
gone. `GuardedConsumer` first records each such message in the dead-letter
store with its reason, then lets Celery do what it does.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed
from kombu.serialization import registry

from policies.deadletter import DeadLetter
from workers.resources import deadletters

logger = logging.getLogger(__name__)


def _letter_from_message(message: Any, reason: str, exc: BaseException | None) -> DeadLetter:
    headers = message.headers if isinstance(message.headers, dict) else {}
    delivery = getattr(message, "delivery_info", None) or {}
    body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
    return DeadLetter(
        task_name=str(headers.get("task", "<unknown>")),
        task_id=headers.get("id"),
        queue=delivery.get("routing_key"),
        reason=reason,
        error=f"{type(exc).__name__}: {exc}" if exc is not None else None,
        content_type=message.content_type,
        raw_body=base64.b64encode(body).decode("ascii"),
    )


def _refused(message: Any) -> str:
    serializer = registry.type_to_name.get(message.content_type, "unknown serializer")
    return f"refused content type {message.content_type!r} ({serializer}): only json is accepted"


class GuardedConsumer(Consumer):  # type: ignore[misc]
    def _dead_letter(self, message: Any, reason: str, exc: BaseException | None) -> None:
        try:
            letter = deadletters().add(_letter_from_message(message, reason, exc))
            logger.error(
                "dead-lettered refused message",
                extra={"reason": reason, "deadletter_id": letter.id, "task_id": letter.task_id},
            )
        except Exception:  # the message is still logged in full by Celery below
            logger.exception("could not dead-letter a refused message (%s)", reason)

    def on_decode_error(self, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, _refused(message), exc)
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: BaseException) -> None:
        reason = _refused(message) if isinstance(exc, ContentDisallowed) else "invalid task message"
        self._dead_letter(message, reason, exc)
        super().on_invalid_task(body, message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: BaseException) -> None:
        self._dead_letter(message, "unknown task name", exc)
        super().on_unknown_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "not a task message", None)
        super().on_unknown_message(body, message)
