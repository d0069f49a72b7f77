"""Celery configuration built from `Settings` (never read at import)."""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP, Queues
from kombu import Exchange, Queue
from kombu.transport import TRANSPORT_ALIASES

from workers import balancing
from workers.amqp import DEAD_EXCHANGE
from workers.settings import ALERTS_QUEUE, DEFAULT_QUEUE, Settings

ALERTS_TASK_PREFIX = "bulwark.alerts."
#: The one exchange of every Bulwark queue (direct: the routing key is the queue's name).
EXCHANGE = Exchange("bulwark", type="direct")
#: On RabbitMQ: topic (the routing key is still the queue's name), as Celery's native
#: delayed delivery sends countdowns through a topic exchange and refuses a direct one.
AMQP_EXCHANGE = Exchange("bulwark", type="topic", durable=True)


def queue_for(settings: Settings, name: str) -> Queue:
    """The kombu queue `name` on this broker: on Redis a list; on RabbitMQ a durable quorum
    queue (or a classic one with priorities) that dead-letters into `bulwark.dead`."""
    if not settings.rabbitmq:
        return Queue(name, EXCHANGE, routing_key=name)
    scaling = settings.scaling
    arguments: dict[str, Any] = {"x-dead-letter-exchange": DEAD_EXCHANGE.name}
    if scaling.amqp_queue_type == "quorum":
        arguments |= {
            "x-queue-type": "quorum",
            # A message whose process keeps dying (SIGKILL, OOM) is dead-lettered after
            # this many deliveries, not redelivered forever.
            "x-delivery-limit": scaling.amqp_delivery_limit,
        }
    else:
        arguments["x-max-priority"] = 9
    return Queue(name, AMQP_EXCHANGE, routing_key=name, durable=True, queue_arguments=arguments)


class BalancedQueues(Queues):  # type: ignore[misc]
    """Celery's queues, which also know the targets of the balanced tasks declared after
    the configuration was built (the worker's `include` imports the catalogue later):
    `-Q shipping.0` is then a known queue; any other unknown name stays refused."""

    def __missing__(self, name: str) -> Any:
        if any(name in b.targets for b in balancing.declared().values()):
            template = self.get(DEFAULT_QUEUE)  # same exchange and arguments as the others
            if template is None:
                return self.add(Queue(name, EXCHANGE, routing_key=name))
            return self.add(
                Queue(name, template.exchange, routing_key=name, durable=template.durable,
                      queue_arguments=template.queue_arguments)
            )  # fmt: skip
        return super().__missing__(name)


class BulwarkAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP part with `BalancedQueues` (the app's `amqp_cls`)."""

    queues_cls = BalancedQueues


def route_for(settings: Settings) -> Any:
    """A Celery router: a balanced task to the queue its `Balance` picks (`workers.balancing`),
    `<queue>.<job>` to its bulkhead queue, alert jobs to `alerts`."""
    bulkheads = frozenset(settings.scaling.queues)

    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
        balanced = None
        if not (options or {}).get("queue"):  # not chosen yet
            balanced = balancing.router().queue_for(name, args, kwargs)
        if balanced is not None:  # a Queue, not a name: known even to a config built earlier
            return {"queue": queue_for(settings, balanced)}
        if name.startswith(ALERTS_TASK_PREFIX):
            return {"queue": ALERTS_QUEUE}
        head = name.split(".", 1)[0]
        return {"queue": head if head in bulkheads else DEFAULT_QUEUE}

    return route


#: Brokers `workers.transport` guards. For `rediss://`, kombu still reads the TLS options
#: (`ssl_cert_reqs`, `ssl_ca_certs`, which the settings require) from the URL's query.
GUARDED_SCHEMES = ("redis://", "rediss://", "unix://")


#: kombu's transport names that `workers.transport` guards, and its transports for them.
GUARDED_TRANSPORTS = {
    "redis": "workers.transport:GuardedTransport",
    "rediss": "workers.transport:GuardedTransport",
    "sentinel": "workers.transport:GuardedSentinelTransport",
}


def transport_for(broker_url: str) -> dict[str, str]:
    """`broker_transport` for a Redis broker: kombu's Redis (or Sentinel) transport with
    the poison guard. RabbitMQ keeps kombu's own (py-amqp).

    Celery's failover moves to the next URL of the broker's `;`-list (each sentinel of
    a `sentinel://` broker) with the transport that URL's scheme names, not the
    configured one: kombu's names for these schemes are pointed at the guarded
    transports too, or a worker would consume unguarded after its first failover.
    """
    TRANSPORT_ALIASES.update(GUARDED_TRANSPORTS)
    if broker_url.startswith(GUARDED_SCHEMES):
        return {"broker_transport": GUARDED_TRANSPORTS["redis"]}
    if broker_url.startswith("sentinel://"):
        return {"broker_transport": GUARDED_TRANSPORTS["sentinel"]}
    return {}


def sentinel_options(url: str, master: str) -> dict[str, str]:
    """The transport options a `sentinel://` URL needs: the master's name."""
    return {"master_name": master} if url.startswith("sentinel://") else {}


def queue_names(settings: Settings) -> tuple[str, ...]:
    targets = sorted({t for b in balancing.declared().values() for t in b.targets})
    return settings.all_queues + tuple(t for t in targets if t not in settings.all_queues)


def build_config(settings: Settings) -> dict[str, Any]:
    exchange = EXCHANGE
    scaling = settings.scaling
    return {
        "broker_url": settings.broker,
        # Signed by the worker, verified on read: `workers.security.results.install`.
        "result_backend": settings.backend,
        # JSON only: pickle (or anything else) is refused before it is decoded.
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        # A task is acknowledged after it ran; a worker lost mid-task gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # One message reserved per process by default: a killed worker's reserved messages
        # wait for the visibility timeout. Short jobs gain from more (see the README).
        "worker_prefetch_multiplier": scaling.prefetch_multiplier,
        "worker_concurrency": scaling.worker_concurrency,
        # `--autoscale=MAX,MIN` sizes the pool from the load and the policies (not Celery's
        # rule, which grows on what the worker prefetched: the queue, not the load).
        "worker_autoscaler": "workers.scaling.autoscaler:Autoscaler",
        # Prefork, less the 30 s stall of a warm shutdown with a job just handed over.
        "worker_pool": "workers.prefork:TaskPool",
        "task_time_limit": scaling.task_time_limit,
        "task_soft_time_limit": max(1.0, scaling.task_time_limit - 5.0),
        # Task events cost the worker's main process a publish per task state: on demand
        # (`workers.telemetry.task_events`), they are sent only while a monitor asks.
        "worker_send_task_events": settings.observability.task_events == "always",
        "task_send_sent_event": settings.observability.task_events == "always",
        "task_track_started": True,
        "result_expires": 24 * 3600,
        "result_extended": True,
        # Queues: one per bulkhead, plus default, alerts and the dead-letter queue.
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_exchange": exchange.name,
        "task_default_exchange_type": (AMQP_EXCHANGE if settings.rabbitmq else EXCHANGE).type,
        "task_default_routing_key": DEFAULT_QUEUE,
        # The queues of the settings, and the targets of every balanced task declared.
        "task_queues": [queue_for(settings, q) for q in queue_names(settings)],
        "task_create_missing_queues": False,
        "task_routes": (route_for(settings),),
        # kombu's Redis transport, refusing poison items instead of crashing on them.
        **transport_for(settings.broker),
        # Redis redelivers an unacked message after the visibility timeout: it must
        # exceed the longest countdown we schedule plus the task time limit
        # (checked by Settings). kombu looks for such messages every
        # `restore_interval` seconds, every time (throttle 1), so a task of a worker
        # that died comes back within the visibility timeout plus that interval.
        "broker_transport_options": {
            "visibility_timeout": scaling.visibility_timeout,
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
            "socket_timeout": 30,
            "retry_on_timeout": True,
            **sentinel_options(settings.broker, settings.sentinel_master),
            # RabbitMQ: a publish returns once the broker has the message (confirms).
            **({"confirm_publish": True} if settings.rabbitmq else {}),
        },
        "result_backend_transport_options": {
            "socket_connect_timeout": 5,
            **sentinel_options(settings.backend, settings.sentinel_master),
        },
        # A result write that meets a Redis outage is retried (up to about a minute),
        # so a task that succeeded is never reported as FAILURE because Redis blinked.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "broker_connection_retry_on_startup": True,
        # A publish that meets a broker gone away (a Sentinel failover, a RabbitMQ restart)
        # is retried for about 10 s before `send_task` raises (Celery's default: 0.6 s).
        "task_publish_retry_policy": {
            "max_retries": 10,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1.0,
        },
        "worker_consumer": "workers.consumer:GuardedConsumer",
        "worker_hijack_root_logger": False,
        "timezone": "UTC",
        "enable_utc": True,
        # One leading beat sends; a standby takes over within BULWARK_BEAT_LOCK_TTL.
        "beat_scheduler": "workers.beat:LeaderScheduler",
        "beat_schedule": {
            # Automatic degradation and stepwise recovery of every declared service.
            "policies-tick": {"task": "bulwark.policies.tick", "schedule": 10.0},
            # Alert rules over the fleet state; notifications go out on the `alerts` queue.
            "alerts-evaluate": {
                "task": "bulwark.alerts.evaluate",
                "schedule": settings.observability.alert_evaluate_interval,
            },
            # Fleet health checks; results in Redis feed `bulwark health`, metrics and alerts.
            "health-check": {
                "task": "bulwark.health.check",
                "schedule": settings.observability.health_check_interval,
            },
        },
    }
