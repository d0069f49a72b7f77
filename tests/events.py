"""Celery events as a monitor sees them: a real `app.events.Receiver` in a thread."""

from __future__ import annotations

import threading
from typing import Any

from workers.client import client


class Events:
    """Every event dict the fleet sends, captured by a real `app.events.Receiver`."""

    def __init__(self) -> None:
        self.app = client()
        self.received: list[dict[str, Any]] = []
        self.connection = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(
            self.connection, handlers={"*": self.received.append}
        )
        self.thread = threading.Thread(
            target=self.receiver.capture, kwargs={"limit": None, "wakeup": False}, daemon=True
        )

    def of(self, kind: str, task_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.received)
            if e.get("type") == kind and (task_id is None or e.get("uuid") == task_id)
        ]

    def stop(self) -> None:
        self.receiver.should_stop = True
        self.thread.join(15)
        self.connection.release()
