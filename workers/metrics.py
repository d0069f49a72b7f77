"""Prometheus metrics: per worker in multiprocess mode, fleet gauges from beat.

Nothing is built at import. In a worker's main process, `worker_init` (before
the pool forks) points PROMETHEUS_MULTIPROC_DIR at a folder of its own
(`<BULWARK_METRICS_DIR>/<hostname>`, emptied first), so every prefork child
writes its samples there and the worker's /metrics adds them up; a child that
exits is marked dead (`mark_process_dead`). Beat does the same in its own
folder and also serves the fleet gauges, read from Redis when scraped (at most
once per `BULWARK_METRICS_INTERVAL`).

Per worker process group (counters and histograms, no hostname labels):

- bulwark_tasks_total{task, queue, state}: state is one of sent, received,
  started, succeeded, failed, retried, rejected, deferred, dead_lettered
- bulwark_task_runtime_seconds{task, queue} (histogram)
- bulwark_task_queue_wait_seconds{task, queue} (histogram): start time minus
  the later of the message's sent time (header `bulwark_sent_at`) and its ETA
- bulwark_breaker_transitions_total{breaker, from_state, to_state}
- bulwark_breaker_rejections_total{breaker}, bulwark_bulkhead_rejections_total{bulkhead}
- bulwark_degradation_changes_total{service, to_level}
- bulwark_store_outages_total{policy}: a policy lost its Redis and went local
- bulwark_alerts_sent_total{sink, severity}: see `alert_sent`

Fleet (beat's /metrics, `FleetCollector`):

- bulwark_queue_depth{queue}: ready messages, all Redis priority sub-queues
- bulwark_queue_unacked{queue}: reserved by workers, not acknowledged yet
  (prefetched, running, or waiting for their countdown/ETA)
- bulwark_breaker_state{breaker, state}: 1 for the current state, 0 for the
  others (closed, half_open, open, forced_open, disabled, metrics_only)
- bulwark_bulkhead_in_use{bulkhead}, bulwark_bulkhead_limit{bulkhead}
- bulwark_degradation_level{service}: 0 full, 1 degraded, 2 minimal, 3 offline
- bulwark_deadletters_kept (now), bulwark_deadletters_total (ever)
- bulwark_workers: workers with a live heartbeat
- bulwark_health_status{check}: 0 healthy, 1 degraded, 2 unhealthy;
  bulwark_health_check_latency_seconds{check}; bulwark_health_last_run_timestamp_seconds
- bulwark_fleet_up: 1 if the last read of Redis worked
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from celery import signals

from policies import events

logger = logging.getLogger(__name__)

SENT_HEADER = "bulwark_sent_at"
TASK_STATES = (
    "sent",
    "received",
    "started",
    "succeeded",
    "failed",
    "retried",
    "rejected",
    "deferred",
    "dead_lettered",
)
BREAKER_STATES = ("closed", "half_open", "open", "forced_open", "disabled", "metrics_only")
HEALTH_VALUES = {"healthy": 0, "degraded": 1, "unhealthy": 2}
_POSTRUN_STATES = {"SUCCESS": "succeeded", "FAILURE": "failed", "REJECTED": "rejected"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# -- multiprocess mode -------------------------------------------------------------------------


def metrics_dir_for(process: str) -> Path:
    """The multiprocess folder of one worker (or beat): one per process group."""
    from workers.settings import get_settings

    base = get_settings().observability.metrics_dir or os.path.join(
        tempfile.gettempdir(), "bulwark-metrics"
    )
    return Path(base) / re.sub(r"[^A-Za-z0-9_.@-]", "_", process)


def enable_multiprocess(path: Path) -> Path:
    """Empty `path` and make this process (and its future children) write metrics there.

    Must run before any metric exists in this process. If prometheus_client was
    imported already (its value class is chosen at import), switch it over.
    The folder is removed when this process exits.
    """
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    import prometheus_client.metrics
    import prometheus_client.values

    value_class = prometheus_client.values.get_value_class()
    prometheus_client.values.ValueClass = value_class
    prometheus_client.metrics.ValueClass = value_class  # type: ignore[attr-defined]
    _metrics.cache_clear()
    atexit.register(_remove, path)  # runs in this process only: prefork children os._exit
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # the shared base folder, once no worker uses it


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


# -- the per-process metrics -------------------------------------------------------------------


class TaskMetrics:
    """The counters and histograms one process updates (built on first use)."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # In multiprocess mode samples go to files; the registry only avoids the global one.
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.tasks = Counter(
            "bulwark_tasks", "Tasks by state", ["task", "queue", "state"], registry=r
        )
        self.runtime = Histogram(
            "bulwark_task_runtime_seconds",
            "Task run time",
            ["task", "queue"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "bulwark_task_queue_wait_seconds",
            "Time from a task being sent (or its ETA) to its start",
            ["task", "queue"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "bulwark_breaker_transitions",
            "Circuit breaker state changes",
            ["breaker", "from_state", "to_state"],
            registry=r,
        )
        self.breaker_rejections = Counter(
            "bulwark_breaker_rejections", "Calls an open breaker refused", ["breaker"], registry=r
        )
        self.bulkhead_rejections = Counter(
            "bulwark_bulkhead_rejections", "Calls a full bulkhead refused", ["bulkhead"], registry=r
        )
        self.degradation_changes = Counter(
            "bulwark_degradation_changes",
            "Degradation level changes",
            ["service", "to_level"],
            registry=r,
        )
        self.store_outages = Counter(
            "bulwark_store_outages",
            "A policy lost its Redis and ran locally",
            ["policy"],
            registry=r,
        )
        self.alerts_sent = Counter(
            "bulwark_alerts_sent", "Alerts delivered to a sink", ["sink", "severity"], registry=r
        )

    def task(self, state: str, task: str, queue: str | None) -> None:
        self.tasks.labels(task=task, queue=queue or "unknown", state=state).inc()


@functools.cache
def _metrics() -> TaskMetrics:
    return TaskMetrics()


def metrics() -> TaskMetrics:
    """This process's metrics (after `enable_multiprocess`, they land in its folder)."""
    return _metrics()


def alert_sent(sink: str, severity: str) -> None:
    """Count one alert delivered to `sink` (for the alerting work)."""
    metrics().alerts_sent.labels(sink=sink, severity=severity).inc()


def exposition() -> tuple[bytes, str]:
    """This process group's samples in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    path = multiprocess_dir()
    if path is None:
        return generate_latest(metrics().registry), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST


# -- policy events -> metrics ------------------------------------------------------------------

_deferred: set[str] = set()
_listening = False
_listening_lock = threading.Lock()


def record_event(event: events.Event) -> None:
    """Listener: turn a policy event into metrics."""
    m = metrics()
    match event:
        case events.BreakerTransition():
            m.transitions.labels(event.name, event.from_state, event.to_state).inc()
        case events.CallRejected(policy="breaker"):
            m.breaker_rejections.labels(event.name).inc()
        case events.CallRejected(policy="bulkhead"):
            m.bulkhead_rejections.labels(event.name).inc()
        case events.DegradationChanged():
            m.degradation_changes.labels(event.name, event.to_level).inc()
        case events.StoreUnavailable():
            m.store_outages.labels(event.policy).inc()
        case events.TaskDeferred():
            if event.task_id:
                _deferred.add(event.task_id)
            m.task("deferred", event.task_name, _current_queue(event.task_id))
        case events.TaskDeadLettered():
            m.task("dead_lettered", event.task_name, _current_queue(event.task_id))


def ensure_listener() -> None:
    """Subscribe `record_event` once per process (a forked child inherits it)."""
    global _listening
    with _listening_lock:
        if not _listening:
            events.default_emitter.subscribe(record_event)
            _listening = True


def _current_queue(task_id: str | None) -> str | None:
    """The queue of a task running in this process (seen at its prerun)."""
    return _running.get(task_id) if task_id else None


def _queue_of(request: Any) -> str | None:
    info = getattr(request, "delivery_info", None) or {}
    queue = info.get("routing_key")
    return str(queue) if queue else None


def _header(request: Any, name: str) -> Any:
    headers = getattr(request, "headers", None) or {}
    return headers.get(name, getattr(request, name, None))


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, datetime):
        return value.timestamp()
    return None


def queue_wait(request: Any, started: float) -> float | None:
    """Seconds a task waited: its start minus the later of its sent time and its ETA."""
    sent = _timestamp(_header(request, SENT_HEADER))
    if sent is None:
        return None
    eta = _timestamp(getattr(request, "eta", None))
    return max(0.0, started - max(sent, eta or 0.0))


# -- Celery signals (connected at import; nothing built until they fire) ------------------------

_started: dict[str, float] = {}
_running: dict[str, str | None] = {}


@signals.before_task_publish.connect
def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if isinstance(headers, dict):
        headers[SENT_HEADER] = time.time()


@signals.after_task_publish.connect
def _on_sent(sender: str | None = None, routing_key: str | None = None, **_: Any) -> None:
    metrics().task("sent", str(sender), routing_key)


@signals.task_received.connect
def _on_received(request: Any = None, **_: Any) -> None:
    metrics().task("received", request.name, _queue_of(request))


@signals.task_prerun.connect
def _on_prerun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    now = time.time()
    queue = _queue_of(task.request)
    if task_id:
        _started[task_id] = time.perf_counter()
        _running[task_id] = queue
    m = metrics()
    m.task("started", task.name, queue)
    waited = queue_wait(task.request, now)
    if waited is not None:
        m.queue_wait.labels(task=task.name, queue=queue or "unknown").observe(waited)


@signals.task_postrun.connect
def _on_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    queue = _queue_of(task.request)
    m = metrics()
    began = _started.pop(task_id, None) if task_id else None
    _running.pop(task_id or "", None)
    if began is not None:
        m.runtime.labels(task=task.name, queue=queue or "unknown").observe(
            time.perf_counter() - began
        )
    if state == "RETRY":
        if task_id in _deferred:
            _deferred.discard(task_id)  # counted as deferred, not as a retry
        else:
            m.task("retried", task.name, queue)
    elif state in _POSTRUN_STATES:
        m.task(_POSTRUN_STATES[state], task.name, queue)


@signals.task_rejected.connect
def _on_rejected(message: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    metrics().task("rejected", str(headers.get("task", "unknown")), info.get("routing_key"))


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Before the pool forks: every child inherits the folder.
    enable_multiprocess(metrics_dir_for(str(getattr(sender, "hostname", None) or os.getpid())))
    ensure_listener()


@signals.worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    _started.clear()
    _running.clear()
    _deferred.clear()
    ensure_listener()


@signals.worker_process_shutdown.connect
def _on_worker_process_shutdown(**_: Any) -> None:
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    from workers.health import WorkerProbe

    probe = WorkerProbe(sender)
    _serve(sender.hostname, {"/healthz": probe.liveness, "/readyz": probe.readiness})


@signals.beat_init.connect
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    process = f"beat@{socket.gethostname()}"
    enable_multiprocess(metrics_dir_for(process))
    ensure_listener()
    from workers.health import beat_liveness, beat_readiness

    _serve(process, {"/healthz": beat_liveness, "/readyz": beat_readiness}, fleet=True)


_server: Any = None


def _serve(process: str, probes: dict[str, Any], *, fleet: bool = False) -> None:
    """Start this process's HTTP server (/metrics plus `probes`) and advertise it."""
    global _server
    from workers.http import Response, Server
    from workers.resources import policy_redis
    from workers.settings import get_settings

    obs = get_settings().observability
    collector = FleetCollector(obs.metrics_interval) if fleet else None

    def metrics_route() -> Response:
        body, content_type = exposition()
        if collector is not None:
            body += collector.exposition()
        return Response(200, body, content_type)

    try:
        _server = Server(obs.http_host, obs.http_port, {"/metrics": metrics_route, **probes})
    except OSError as exc:
        logger.error("cannot serve /metrics on %s:%s: %s", obs.http_host, obs.http_port, exc)
        return
    _server.start()
    _server.advertise(policy_redis(), process, obs.heartbeat_ttl)
    logger.info("%s serves /metrics, /healthz, /readyz on %s", process, _server.url)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    if _server is not None:
        _server.stop()


# -- fleet gauges (beat) ------------------------------------------------------------------------


def priority_queues(queue: str) -> list[str]:
    """The Redis lists kombu keeps for `queue`, one per priority step."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [f"{queue}{Channel.sep}{p}" if p else queue for p in PRIORITY_STEPS]


def queue_depths(client: Any, queues: Iterable[str]) -> dict[str, int]:
    """Ready messages per queue, summed over its priority sub-queues (one round trip)."""
    names = list(queues)
    pipe = client.pipeline(transaction=False)
    for queue in names:
        for list_key in priority_queues(queue):
            pipe.llen(list_key)
    counts = pipe.execute()
    steps = len(priority_queues("x"))
    return {q: int(sum(counts[i * steps : (i + 1) * steps])) for i, q in enumerate(names)}


def unacked_by_queue(client: Any) -> dict[str, int]:
    """Messages reserved by workers and not acknowledged, by queue (kombu's `unacked` hash)."""
    from kombu.transport.redis import Channel

    found: dict[str, int] = {}
    for _tag, raw in client.hscan_iter(Channel.unacked_key, count=500):
        try:
            queue = str(json.loads(raw)[2])
        except (ValueError, IndexError, TypeError):
            queue = "unknown"
        found[queue] = found.get(queue, 0) + 1
    return found


def fleet_families(snapshot: dict[str, Any]) -> Iterator[Any]:
    """Metric families for one fleet snapshot (see `read_fleet`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[Any, ...]]) -> Any:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for *values, number in rows:
            family.add_metric([str(v) for v in values], float(number))
        return family

    yield gauge(
        "bulwark_fleet_up", "1 if Redis answered the last fleet read", [], [(snapshot["up"],)]
    )
    if not snapshot["up"]:
        return
    queues = snapshot["queues"]
    yield gauge(
        "bulwark_queue_depth",
        "Ready messages, all priorities",
        ["queue"],
        ((q, n) for q, n in queues["ready"].items()),
    )
    yield gauge(
        "bulwark_queue_unacked",
        "Messages reserved by workers, not acknowledged",
        ["queue"],
        ((q, n) for q, n in queues["unacked"].items()),
    )
    status = snapshot["status"]
    yield gauge(
        "bulwark_breaker_state",
        "1 for the breaker's current state",
        ["breaker", "state"],
        ((b["name"], s, int(b["state"] == s)) for b in status["breakers"] for s in BREAKER_STATES),
    )
    yield gauge(
        "bulwark_bulkhead_in_use",
        "Leases held",
        ["bulkhead"],
        ((b["name"], b["in_use"]) for b in status["bulkheads"]),
    )
    yield gauge(
        "bulwark_bulkhead_limit",
        "Concurrent calls allowed",
        ["bulkhead"],
        ((b["name"], b["limit"]) for b in status["bulkheads"]),
    )
    yield gauge(
        "bulwark_degradation_level",
        "0 full, 1 degraded, 2 minimal, 3 offline",
        ["service"],
        ((s["service"], s["level_value"]) for s in status["services"]),
    )
    letters = status["deadletters"]
    yield gauge("bulwark_deadletters_kept", "Dead letters kept", [], [(letters["count"],)])
    total = CounterMetricFamily("bulwark_deadletters", "Dead letters ever", labels=[])
    total.add_metric([], float(letters["total"]))
    yield total
    yield gauge("bulwark_workers", "Workers with a live heartbeat", [], [(len(status["workers"]),)])
    health = snapshot["health"]
    yield gauge(
        "bulwark_health_status",
        "0 healthy, 1 degraded, 2 unhealthy",
        ["check"],
        ((r["check"], HEALTH_VALUES.get(r["status"], 2)) for r in health["results"]),
    )
    yield gauge(
        "bulwark_health_check_latency_seconds",
        "How long the check took",
        ["check"],
        ((r["check"], r["latency_seconds"]) for r in health["results"]),
    )
    if health["last_run"] is not None:
        yield gauge(
            "bulwark_health_last_run_timestamp_seconds",
            "When health checks last ran",
            [],
            [(health["last_run"],)],
        )


def read_fleet() -> dict[str, Any]:
    """Everything the fleet gauges show, as plain data (policy and broker Redis)."""
    import redis

    from workers.health import load_results
    from workers.resources import broker_redis, policy_redis
    from workers.settings import get_settings
    from workers.status import fleet_status

    try:
        client, broker = policy_redis(), broker_redis()
        status = fleet_status(client)
        for service in status["services"]:
            from policies.degradation.store import Level

            service["level_value"] = int(Level.parse(service["level"]))
        results, last_run = load_results(client)
        queues = {
            "ready": queue_depths(broker, get_settings().all_queues),
            "unacked": unacked_by_queue(broker),
        }
    except redis.RedisError as exc:
        logger.warning("fleet metrics: Redis unreachable (%s)", exc)
        return {"up": 0}
    return {
        "up": 1,
        "status": status,
        "queues": queues,
        "health": {"results": [r.as_dict() for r in results], "last_run": last_run},
    }


class FleetCollector:
    """Fleet gauges read from Redis when scraped, at most once per `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._snapshot: dict[str, Any] = {"up": 0}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at >= self.interval:
                self._snapshot = read_fleet()
                self._at = time.monotonic()
            return self._snapshot

    def collect(self) -> Iterator[Any]:
        yield from fleet_families(self.snapshot())

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)
