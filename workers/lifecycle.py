"""Worker and beat lifecycle: preflight, policy-event listeners, heartbeats in Redis.

A worker that cannot reach Redis at start exits within 10 s with a message
naming the URL (password hidden), instead of retrying forever in silence.
Once ready, each worker publishes its app's balanced tasks (`workers.balancing.publish`,
for producers that route by name), adds its hostname to the workers index and keeps
`bulwark:{worker:<hostname>}:heartbeat` alive with a TTL, so the fleet
snapshot (and the tests) can see which workers are up; a worker shutting down
removes both. Signal handlers are connected by `connect()`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

import psutil
import redis
from celery import signals

from workers import balancing, listeners
from workers.amqp import BROKER_ERRORS, declare_dead_letters
from workers.fleet import WORKERS_INDEX, heartbeat_key
from workers.resources import RedisUnavailable, policy_redis, wait_for_redis
from workers.scaling import autoscaler
from workers.security.context import security
from workers.settings import SettingsError, get_settings
from workers.telemetry.metrics import runtime_totals

logger = logging.getLogger(__name__)

_stop = threading.Event()


def _preflight() -> None:
    try:
        settings = get_settings()
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None
    try:
        context = security()
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None
    if context.enabled:  # a worker verifies what it takes and signs what it re-sends
        problem = context.verifying_problem() or context.signing_problem()
        if problem is not None:
            raise SystemExit(f"bulwark: {problem}")
    # RabbitMQ: Celery's own connection (it retries at start) says if it is unreachable.
    for url in {settings.redis_url} if settings.rabbitmq else {settings.redis_url, settings.broker}:
        try:
            wait_for_redis(url, master=settings.sentinel_master).close()
        except RedisUnavailable as exc:
            raise SystemExit(f"bulwark: {exc}") from None


def _on_init(sender: Any = None, **_: Any) -> None:
    _preflight()
    if sender is not None and get_settings().rabbitmq:
        _declare_on_rabbitmq(sender.app)
    listeners.ensure()  # before the pool forks: every child inherits the subscriptions


def _declare_on_rabbitmq(app: Any) -> None:
    """Declare every queue of the fleet, and `bulwark.dead`, before the consumer starts:
    Celery's native delayed delivery binds all of them to its delay exchanges (not only
    those this worker consumes), and a queue that does not exist fails the whole setup."""
    try:
        with app.connection_for_write() as connection:
            declare_dead_letters(connection)
            with connection.channel() as channel:
                for queue in app.amqp.queues.values():
                    queue.bind(channel).declare()
    except BROKER_ERRORS as exc:
        raise SystemExit(f"bulwark: cannot declare the queues on RabbitMQ: {exc}") from None


def beat_once(hostname: str, queues: list[str], ttl: float) -> None:
    """Write one heartbeat and (re)add the hostname to the workers index: one round trip.
    It carries the run-time totals of the worker's tasks (beat's fleet scaler measures
    the group's completions and run time from them) and, with --autoscale, the pool's
    last decision."""
    seconds, tasks = runtime_totals(queues)
    value: dict[str, Any] = {
        "hostname": hostname,
        "pid": os.getpid(),
        "queues": queues,
        "at": time.time(),
        "runtime": [round(seconds, 6), tasks],
        "processes": _pool_processes(),
    }
    pool = autoscaler.report()
    if pool is not None:
        value["pool"] = pool
    pipe = policy_redis().pipeline(transaction=False)
    pipe.set(heartbeat_key(hostname), json.dumps(value), px=int(ttl * 1000))
    pipe.sadd(WORKERS_INDEX, hostname)
    pipe.execute()


def _pool_processes() -> int:
    """The worker's pool processes now (its live children; 1 for a pool that does not fork)."""
    try:
        return max(1, len(psutil.Process().children()))
    except psutil.Error:
        return 1


def _beat(hostname: str, queues: list[str]) -> None:
    ttl = get_settings().observability.heartbeat_ttl
    while not _stop.is_set():
        try:
            beat_once(hostname, queues, ttl)
        except Exception:
            logger.warning("heartbeat write failed for %s", hostname, exc_info=True)
        _stop.wait(ttl / 3)


def _on_worker_process_init(**_: Any) -> None:
    listeners.ensure()  # a pool that does not fork, or a child started by another parent


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    hostname = sender.hostname
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    try:
        balancing.publish(policy_redis())
    except redis.RedisError as exc:
        logger.warning("could not publish the balanced tasks (%s): producers that route "
                       "them by name only learn them from a worker that could", exc)  # fmt: skip
    _stop.clear()
    threading.Thread(
        target=_beat, args=(hostname, queues), name="bulwark-heartbeat", daemon=True
    ).start()
    logger.info("worker ready: %s consuming %s", hostname, ",".join(queues))


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    _stop.set()
    hostname = getattr(sender, "hostname", None)
    if hostname:
        try:
            pipe = policy_redis().pipeline(transaction=False)
            pipe.delete(heartbeat_key(hostname))
            pipe.srem(WORKERS_INDEX, hostname)
            pipe.execute()
        except Exception:
            logger.warning("could not clear heartbeat of %s", hostname, exc_info=True)


def connect() -> None:
    """Connect the lifecycle signal handlers (idempotent)."""
    for signal, handler in (
        (signals.worker_init, _on_init),
        (signals.beat_init, _on_init),
        (signals.worker_process_init, _on_worker_process_init),
        (signals.worker_ready, _on_worker_ready),
        (signals.worker_shutdown, _on_worker_shutdown),
    ):
        name = f"bulwark.lifecycle.{handler.__name__}.{signal.name}"
        signal.connect(handler, weak=False, dispatch_uid=name)
