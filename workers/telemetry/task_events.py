"""Task events only while a monitor watches them (`BULWARK_TASK_EVENTS=on-demand`).

Celery's task events (received, started, succeeded...) feed Flower's live view and
nothing else here: metrics, logs and traces come from signals in the pool child.
Each costs the worker's main process a publish, so by default a worker starts with
task events off, and `enable_events` (which Flower sends to every worker every 5 s)
turns them on for `LEASE` seconds: when no monitor has asked for that long, the
worker turns them off again. `BULWARK_TASK_EVENTS=always` keeps them on from the
start, as `celery worker -E` does, and has producers send `task-sent` events too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals
from celery.worker import control

from workers.settings import get_settings

__all__ = ["LEASE", "Lease", "connect"]

logger = logging.getLogger(__name__)

#: Seconds task events stay on after the last `enable_events`.
LEASE = 30.0

_celery_enable_events = control.Panel.data["enable_events"]


class Lease:
    """When task events were last asked for, in this worker process."""

    def __init__(self) -> None:
        self.asked_at: float | None = None

    def renew(self) -> None:
        self.asked_at = time.monotonic()

    def expired(self, now: float) -> bool:
        return self.asked_at is not None and now - self.asked_at > LEASE


lease = Lease()


@control.control_command()
def enable_events(state: Any) -> Any:
    """Celery's `enable_events`, renewing the lease of on-demand task events."""
    lease.renew()
    return _celery_enable_events(state)


def _expire(consumer: Any) -> None:
    dispatcher = consumer.event_dispatcher
    if dispatcher is None or not lease.expired(time.monotonic()):
        return
    if dispatcher.groups and "task" in dispatcher.groups:
        dispatcher.groups.discard("task")
        logger.info("task events off: no monitor asked for them in %.0f s", LEASE)
    lease.asked_at = None


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    if get_settings().observability.task_events == "on-demand":
        sender.timer.call_repeatedly(LEASE / 3, _expire, (sender,), priority=10)


def connect() -> None:
    """Expire on-demand task events in each worker (idempotent)."""
    signals.worker_ready.connect(
        _on_worker_ready, weak=False, dispatch_uid="bulwark.task_events.ready"
    )
