"""Each worker's and beat's HTTP server: /metrics, /healthz (liveness), /readyz (readiness).

Probes never call `celery inspect ping`: a worker's liveness looks at its own
process and event loop only (never the broker); readiness looks at the
consumer's broker connection and pings the broker. Beat also serves the fleet
gauges (`fleet_metrics`) on its /metrics. The server starts when the worker is
ready (or beat starts) and advertises its address in Redis
(`workers.telemetry.http`). Signal handlers are connected by `connect()`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery import signals

from workers import beat, fleet
from workers.amqp import BROKER_ERRORS
from workers.celeryconfig import queue_names
from workers.resources import broker, policy_redis
from workers.scaling.fleet import read_decisions, scaling_document
from workers.settings import get_settings
from workers.stores import check_all
from workers.telemetry.fleet_metrics import FleetCollector
from workers.telemetry.http import Response, Route, Server
from workers.telemetry.metrics import beat_process_name, exposition

logger = logging.getLogger(__name__)


class WorkerProbe:
    """Liveness and readiness of one worker's main process (its Celery consumer)."""

    def __init__(self, consumer: Any, stale_after: float | None = None) -> None:
        self.consumer = consumer
        self.stale_after = stale_after or get_settings().observability.liveness_stale
        self.last_turn = time.monotonic()
        hub = getattr(consumer, "hub", None)
        if hub is not None:
            hub.on_tick.add(self._turn)  # called on every turn of the event loop

    def _turn(self) -> None:
        self.last_turn = time.monotonic()

    def liveness(self) -> Response:
        age = time.monotonic() - self.last_turn
        connected = getattr(self.consumer, "connection", None) is not None
        data = {"pid": os.getpid(), "loop_age_seconds": round(age, 3)}
        if not threading.main_thread().is_alive():
            return Response.json(503, {"status": "dead", "reason": "main thread ended", **data})
        # While the broker is away the loop does not turn; that is not a liveness failure.
        if connected and getattr(self.consumer, "hub", None) is not None and age > self.stale_after:
            return Response.json(503, {"status": "stalled", "reason": "event loop stalled", **data})
        return Response.json(200, {"status": "alive", **data})

    def readiness(self) -> Response:
        problems = []
        if getattr(self.consumer, "connection", None) is None:
            problems.append("no broker connection")
        if getattr(self.consumer, "task_consumer", None) is None:
            problems.append("not consuming")
        try:
            broker().ping()
        except (redis.RedisError, *BROKER_ERRORS) as exc:
            problems.append(f"broker unreachable: {exc}")
        if problems:
            return Response.json(503, {"status": "not ready", "problems": problems})
        queues = sorted(q.name for q in self.consumer.task_consumer.queues)
        return Response.json(200, {"status": "ready", "queues": queues})


def beat_liveness() -> Response:
    return Response.json(200, {"status": "alive", "pid": os.getpid()})


def beat_readiness() -> Response:
    try:
        policy_redis().ping()
        broker().ping()
    except (redis.RedisError, *BROKER_ERRORS) as exc:
        return Response.json(503, {"status": "not ready", "problems": [str(exc)]})
    return Response.json(200, {"status": "ready"})


_server: Server | None = None


def serve(process: str, probes: dict[str, Route], *, with_fleet: bool = False) -> Server | None:
    """Start this process's HTTP server (/metrics plus `probes`) and advertise it."""
    global _server
    obs = get_settings().observability
    collector = (
        FleetCollector(
            _take,
            obs.metrics_interval,
            scaling=policy_redis,
            stores=lambda: check_all(get_settings()),
        )
        if with_fleet
        else None
    )

    def metrics_route() -> Response:
        body, content_type = exposition()
        if collector is not None and beat.leading():  # one beat serves the fleet's gauges
            body += collector.exposition()
        return Response(200, body, content_type)

    try:
        _server = Server(obs.http_host, obs.http_port, {"/metrics": metrics_route, **probes})
    except OSError as exc:
        logger.error("cannot serve /metrics on %s:%s: %s", obs.http_host, obs.http_port, exc)
        return None
    _server.start()
    _server.advertise(policy_redis(), process, obs.heartbeat_ttl)
    logger.info("%s serves /metrics, /healthz, /readyz on %s", process, _server.url)
    return _server


def _take() -> fleet.FleetSnapshot:
    """The fleet snapshot beat serves: the settings' queues and every balanced target."""
    return fleet.read_fleet(policy_redis(), broker(), queue_names(get_settings()))


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    probe = WorkerProbe(sender)
    serve(sender.hostname, {"/healthz": probe.liveness, "/readyz": probe.readiness})


def beat_scaling() -> Response:
    """The fleet scaler's last decisions (either beat serves them: they are in Redis)."""
    try:
        decisions = read_decisions(policy_redis())
    except redis.RedisError as exc:
        return Response.json(503, {"error": f"Redis unreachable: {exc}"})
    return Response.json(200, scaling_document(decisions))


def _on_beat_init(**_: Any) -> None:
    serve(
        beat_process_name(),
        {"/healthz": beat_liveness, "/readyz": beat_readiness, "/scaling": beat_scaling},
        with_fleet=True,
    )


def _on_worker_shutdown(**_: Any) -> None:
    if _server is not None:
        _server.stop()


def connect() -> None:
    """Connect the probe server's signal handlers (after `metrics.connect()`)."""
    for signal, handler in (
        (signals.worker_ready, _on_worker_ready),
        (signals.beat_init, _on_beat_init),
        (signals.worker_shutdown, _on_worker_shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"bulwark.probes.{handler.__name__}")
