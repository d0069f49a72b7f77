"""The producer side: a light Celery client for services that enqueue by name.

`client()` knows the broker, JSON-only serialization and the routing of task
names to bulkhead queues, and imports no task code, so another service can
`client().send_task("payments.charge", args=[...])` without Bulwark's tasks.
It refuses a countdown or ETA that a worker could not hold without Redis
delivering the task twice (`EnqueueRefused`); a worker refuses such a message
from any other producer too (it is dead-lettered with that reason).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

from celery import Celery

from policies.authz import authorize
from workers.amqp import whole_seconds
from workers.celeryconfig import build_config
from workers.security import results, sealed, signer
from workers.security.context import Security, security
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
    "result_backend_transport_options",  # a sentinel:// backend's master name
    "task_publish_retry_policy",
    # A Redis broker's channel keeps one client (kombu's makes one per message sent).
    "broker_transport",
    "task_send_sent_event",
    "timezone",
    "enable_utc",
)


class EnqueueRefused(ValueError):
    """The client refused to enqueue a task; the message says why. Nothing was sent."""


class _Rate:
    """A token bucket: `rate` sends a second, bursts of up to one second's worth."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: float | None = None
        self._at = time.monotonic()

    def take(self, rate: float) -> bool:
        with self._lock:
            now = time.monotonic()
            tokens = rate if self._tokens is None else self._tokens
            tokens = min(max(rate, 1.0), tokens + (now - self._at) * rate)
            self._at = now
            if tokens < 1.0:
                self._tokens = tokens
                return False
            self._tokens = tokens - 1.0
            return True


class Producer(Celery):  # type: ignore[misc]
    """A Celery app that refuses, at `send_task`, what a worker would refuse anyway:

    - a countdown or ETA a worker may not hold: past the visibility timeout Redis
      gives it to another worker too, so it would run twice (`Settings.countdown_horizon`);
    - with security on: sending without an identity, a task or queue this producer's
      grant does not allow, a payload over its limit, or more than its rate.
    """

    horizon: float = float("inf")
    #: Countdowns wait in RabbitMQ's delay exchanges, in whole seconds (`whole_seconds`).
    delays_in_broker = False
    _rate = _Rate()
    #: Remote control commands are signed too (`workers.security.control`).
    control_cls = "workers.security.control:SignedControl"

    def _security_problem(
        self, context: Security, name: str, args: Any, kwargs: Any, options: dict[str, Any]
    ) -> str | None:
        problem = context.signing_problem()
        if problem is not None or context.trust is None:
            return problem
        identity = context.trust.get().identity(context.identity or "")
        if identity is None:
            return f"identity {context.identity!r} is not in the trust store"
        queue = options.get("queue")
        queue_name = getattr(queue, "name", queue) or ""
        size = len(signer.body_bytes([list(args or ()), dict(kwargs or {}), {}])[1])
        refused = authorize(identity.grant, name, str(queue_name), size)
        if refused is not None:
            return f"producer {identity.name!r} {refused}"
        rate = identity.grant.rate
        if rate is not None and not self._rate.take(rate):
            return f"producer {identity.name!r} is over its rate of {rate:g} messages a second"
        return None

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
        if options.get("queue") is None:  # routed once: a balanced task's choice is made once
            queue = self.amqp.router.route(dict(options), name, args, kwargs).get("queue")
            if queue is not None:
                options["queue"] = queue
        context = security()
        if context.enabled:
            problem = self._security_problem(context, name, args, kwargs, options)
            if problem is not None:
                raise EnqueueRefused(f"{name}: {problem}. Nothing was sent.")
        args, kwargs = sealed.seal_send(name, args, kwargs, options)
        if self.delays_in_broker:
            countdown, eta = whole_seconds(countdown, eta)
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
    signer.connect()  # after the metrics stamp: it signs the headers as they are then
    settings = settings or get_settings()
    config = build_config(settings)
    app = Producer(name)
    results.install(app)
    app.conf.update({k: config[k] for k in PRODUCER_KEYS if k in config})
    app.horizon = settings.countdown_horizon
    app.delays_in_broker = settings.delays_in_broker
    return app
