"""The producer side: a light Celery client for services that enqueue by name.

`client()` knows the broker, JSON-only serialization and the routing of task
names to bulkhead queues, and imports no task code, so another service can
`client().send_task("payments.charge", args=[...])` without Bulwark's tasks.
It refuses a countdown or ETA that a worker could not hold without Redis
delivering the task twice (`EnqueueRefused`); a worker refuses such a message
from any other producer too (it is dead-lettered with that reason).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from celery import Celery

from workers.celeryconfig import build_config
from workers.settings import Settings, get_settings
from workers.telemetry import metrics, tracing

PRODUCER_KEYS = (
    "broker_url",
    "result_backend",
    "accept_content",
    "result_accept_content",
    "task_serializer",
    "result_serializer",
    "task_default_queue",
    "task_default_exchange",
    "task_default_routing_key",
    "task_queues",
    "task_create_missing_queues",
    "task_routes",
    "broker_transport_options",
    "task_send_sent_event",
    "timezone",
    "enable_utc",
)


class EnqueueRefused(ValueError):
    """The client refused to enqueue a task; the message says why. Nothing was sent."""


class Producer(Celery):  # type: ignore[misc]
    """A Celery app that refuses, at `send_task`, a countdown or ETA a worker may not hold.

    A worker holds a task until its ETA; past the visibility timeout Redis gives it
    to another worker too, so the task would run twice (`Settings.countdown_horizon`).
    """

    horizon: float = float("inf")

    def send_task(
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        countdown: float | None = None,
        eta: datetime | None = None,
        **options: Any,
    ) -> Any:
        ahead = countdown
        if eta is not None:
            due = eta if eta.tzinfo is not None else eta.replace(tzinfo=UTC)
            ahead = (due - datetime.now(UTC)).total_seconds()
        if ahead is not None and ahead > self.horizon:
            raise EnqueueRefused(
                f"{name}: a countdown of {ahead:.0f} s is beyond what a worker may hold "
                f"({self.horizon:.0f} s: BULWARK_VISIBILITY_TIMEOUT less "
                "BULWARK_TASK_TIME_LIMIT); it would run twice. Nothing was sent."
            )
        return super().send_task(name, args, kwargs, countdown=countdown, eta=eta, **options)


def client(settings: Settings | None = None, *, name: str = "bulwark-client") -> Producer:
    """A Celery app that only produces: routes task names to Bulwark's queues.

    Each send is stamped with its sent time (queue-wait metrics) and counted.
    Tracing is set up for this process (once): each send gets a producer span
    whose context travels in the message headers, so the worker's span of the
    task is its child (see `workers.telemetry.tracing`).
    """
    tracing.setup_producer()
    metrics.connect_producer()
    settings = settings or get_settings()
    config = build_config(settings)
    app = Producer(name)
    app.conf.update({k: config[k] for k in PRODUCER_KEYS})
    app.horizon = settings.countdown_horizon
    return app
