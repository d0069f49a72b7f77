"""The producer side: a light Celery client for services that enqueue by name.

`client()` knows the broker, JSON-only serialization and the routing of task
names to bulkhead queues, and imports no task code, so another service can
`client().send_task("payments.charge", args=[...])` without Bulwark's tasks.
"""

from __future__ import annotations

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


def client(settings: Settings | None = None, *, name: str = "bulwark-client") -> Celery:
    """A Celery app that only produces: routes task names to Bulwark's queues.

    Each send is stamped with its sent time (queue-wait metrics) and counted.
    Tracing is set up for this process (once): each send gets a producer span
    whose context travels in the message headers, so the worker's span of the
    task is its child (see `workers.telemetry.tracing`).
    """
    tracing.setup_producer()
    metrics.connect_producer()
    config = build_config(settings or get_settings())
    app = Celery(name)
    app.conf.update({k: config[k] for k in PRODUCER_KEYS})
    return app
