"""Prometheus metrics: per worker in multiprocess mode, fleet gauges from beat.

Nothing is built at import. In a worker's main process, `worker_init` (before
the pool forks) points PROMETHEUS_MULTIPROC_DIR at a folder of its own
(`<BULWARK_METRICS_DIR>/<hostname>`, emptied first), so every prefork child
writes its samples there and the worker's /metrics adds them up; a child that
exits is marked dead (`mark_process_dead`). Beat does the same in its own
folder and also serves the fleet gauges, read from Redis when scraped (at most
once per `BULWARK_METRICS_INTERVAL`). Signal handlers are connected by
`connect()` (the app does it), not at import.

Per worker process group (counters and histograms, no hostname labels):

- bulwark_tasks_total{task, queue, state}: state is one of sent, received,
  started, succeeded, failed, retried, rejected, deferred, dead_lettered,
  expired (its `expires` passed before it ran; logged as a warning with its id), revoked
- bulwark_task_runtime_seconds{task, queue} (histogram)
- bulwark_task_queue_wait_seconds{task, queue} (histogram): start time minus
  the later of the message's sent time (header `bulwark_sent_at`) and its ETA
- bulwark_breaker_transitions_total{breaker, from_state, to_state}
- bulwark_breaker_rejections_total{breaker}, bulwark_bulkhead_rejections_total{bulkhead}
- bulwark_degradation_changes_total{service, to_level}
- bulwark_store_outages_total{policy}: a policy lost its Redis and went local
- bulwark_alerts_sent_total{sink, severity}: see `alert_sent`
- bulwark_poison_messages_total{queue, source}: queue items the transport
  refused (not a kombu envelope; source `queue` or `unacked`)
- bulwark_security_refusals_total{kind}: task messages refused by verification
  (kind: `workers.security.refusals.KINDS`); see `security_refused`
- bulwark_autoscale_decisions_total{direction}: pool-size decisions of a worker run
  with --autoscale (up, down, hold; `workers.scaling.autoscaler`)
- bulwark_cache_events_total{cache, event}, bulwark_cache_fill_seconds_total{cache}:
  the tiered cache (`workers.caching`): hits per level, misses, fills, evictions
- bulwark_pool_events_total{pool, event}, bulwark_pool_wait_seconds_total{pool},
  bulwark_pool_in_use{pool}, bulwark_pool_idle{pool}: resource pools per dependency
  (`workers.pools`)

The fleet gauges (beat's /metrics) are in `workers.telemetry.fleet_metrics`.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any

import prometheus_client.metrics
import prometheus_client.values
from celery import signals
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.multiprocess import MultiProcessCollector

from policies import events
from workers.settings import get_settings

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
    "expired",
    "revoked",
)
_POSTRUN_STATES = {"SUCCESS": "succeeded", "FAILURE": "failed", "REJECTED": "rejected"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


# -- multiprocess mode -------------------------------------------------------------------------


def metrics_dir_for(process: str) -> Path:
    """The multiprocess folder of one worker (or beat): one per process group."""
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

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        self.poison = Counter(
            "bulwark_poison_messages",
            "Queue items refused before decoding (kept in the dead-letter store)",
            ["queue", "source"],
            registry=r,
        )
        self.alerts_sent = Counter(
            "bulwark_alerts_sent", "Alerts delivered to a sink", ["sink", "severity"], registry=r
        )
        self.security_refusals = Counter(
            "bulwark_security_refusals",
            "Task messages refused by verification (signature, replay, authorization, ...)",
            ["kind"],
            registry=r,
        )
        self.autoscale = Counter(
            "bulwark_autoscale_decisions",
            "Pool-size decisions of the worker's autoscaler (direction: up, down, hold)",
            ["direction"],
            registry=r,
        )
        self.cache = Counter(
            "bulwark_cache_events",
            "Tiered cache lookups and what they did (hit_l1, hit_l2, miss, fill, evicted, "
            "too_large, unstorable, corrupt)",
            ["cache", "event"],
            registry=r,
        )
        self.pool = Counter(
            "bulwark_pool_events",
            "Resource pool events (created, closed, failed, timed_out)",
            ["pool", "event"],
            registry=r,
        )
        self.pool_in_use = Gauge(
            "bulwark_pool_in_use",
            "Pooled resources checked out now (summed over the live processes)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_idle = Gauge(
            "bulwark_pool_idle",
            "Pooled resources idle now (summed over the live processes)",
            ["pool"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.pool_wait = Counter(
            "bulwark_pool_wait_seconds",
            "Seconds spent waiting for a pooled resource",
            ["pool"],
            registry=r,
        )
        self.cache_fill = Counter(
            "bulwark_cache_fill_seconds",
            "Seconds spent filling cache misses from the dependency",
            ["cache"],
            registry=r,
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


def security_refused(kind: str) -> None:
    """Count one task message refused by verification (`workers.security.refusals`)."""
    metrics().security_refusals.labels(kind=kind).inc()


def exposition() -> tuple[bytes, str]:
    """This process group's samples in the Prometheus text format."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(metrics().registry), CONTENT_TYPE_LATEST
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return generate_latest(registry), CONTENT_TYPE_LATEST


def runtime_totals(queues: Collection[str]) -> tuple[float, int]:
    """(seconds, tasks) this process group's tasks on `queues` have run so far: the sum
    and count of `bulwark_task_runtime_seconds`, as every pool process wrote them (the
    autoscaler's measure of run time and completions)."""
    path = multiprocess_dir()
    if path is None:
        families = metrics().registry.collect()
    else:
        families = MultiProcessCollector(None, path=path).collect()
    seconds, count = 0.0, 0
    for family in families:
        if family.name != "bulwark_task_runtime_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("queue") not in queues:
                continue
            if sample.name.endswith("_sum"):
                seconds += sample.value
            elif sample.name.endswith("_count"):
                count += int(sample.value)
    return seconds, count


# -- policy events -> metrics ------------------------------------------------------------------

_deferred: set[str] = set()


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


# -- Celery signals (connected by `connect()`; nothing built until they fire) -------------------

_started: dict[str, float] = {}
_running: dict[str, str | None] = {}


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if isinstance(headers, dict):
        headers[SENT_HEADER] = time.time()


def _on_sent(sender: str | None = None, routing_key: str | None = None, **_: Any) -> None:
    metrics().task("sent", str(sender), routing_key)


def _on_received(request: Any = None, **_: Any) -> None:
    metrics().task("received", request.name, _queue_of(request))


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


def _on_rejected(message: Any = None, **_: Any) -> None:
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    metrics().task("rejected", str(headers.get("task", "unknown")), info.get("routing_key"))


def _on_revoked(
    request: Any = None, expired: bool = False, terminated: bool = False, **_: Any
) -> None:
    """A task revoked before it ran: counted, and an expired one logged with its id."""
    name = str(getattr(request, "name", None) or getattr(request, "task", None) or "unknown")
    task_id = getattr(request, "id", None)
    state = "expired" if expired else "revoked"
    metrics().task(state, name, _queue_of(request))
    if expired:
        logger.warning(
            "task %s[%s] expired before it could run (expires %s)",
            name,
            task_id,
            getattr(request, "expires", None),
            extra={"task_id": task_id, "task_name": name},
        )


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # Before the pool forks: every child inherits the folder.
    enable_multiprocess(metrics_dir_for(str(getattr(sender, "hostname", None) or os.getpid())))


def _on_worker_process_init(**_: Any) -> None:
    _started.clear()
    _running.clear()
    _deferred.clear()


def _on_worker_process_shutdown(**_: Any) -> None:
    path = multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(os.getpid(), path)


def _on_beat_init(sender: Any = None, **_: Any) -> None:
    enable_multiprocess(metrics_dir_for(beat_process_name()))


def beat_process_name() -> str:
    """How beat names itself for metrics and its advertised HTTP address."""
    return f"beat@{socket.gethostname()}"


def _connect(*pairs: tuple[Any, Any]) -> None:
    for signal, handler in pairs:
        signal.connect(handler, weak=False, dispatch_uid=f"bulwark.metrics.{handler.__name__}")


def connect_producer() -> None:
    """Stamp the sent time on every message this process publishes, and count it (idempotent)."""
    _connect(
        (signals.before_task_publish, _on_publish),
        (signals.after_task_publish, _on_sent),
    )


def connect() -> None:
    """Connect every metric signal handler (idempotent: Celery keys them by `dispatch_uid`)."""
    connect_producer()
    _connect(
        (signals.task_received, _on_received),
        (signals.task_prerun, _on_prerun),
        (signals.task_postrun, _on_postrun),
        (signals.task_rejected, _on_rejected),
        (signals.task_revoked, _on_revoked),
        (signals.worker_init, _on_worker_init),
        (signals.worker_process_init, _on_worker_process_init),
        (signals.worker_process_shutdown, _on_worker_process_shutdown),
        (signals.beat_init, _on_beat_init),
    )
