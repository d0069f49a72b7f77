"""The bare app of `bench/bare.py` with Bulwark's layers added (`BENCH_LAYERS`, comma-separated).

    BENCH_LAYERS=acks_late,events,metrics celery -A bench.layered worker -Q default

Layers, in the order `bench/stack_overhead.py` adds them:
- `acks_late`: acknowledged after the task ran, one message reserved per process
  (`BENCH_PREFETCH` other than 1: that many);
- `events`: task events (`worker_send_task_events`, producers' `task-sent`);
- `metrics`: Bulwark's Prometheus signal handlers and its /metrics, /healthz server;
- `tracing`: OpenTelemetry spans per task (exported where OTEL_* says);
- `logs`: Bulwark's JSON log lines (at the worker's log level).
Everything else is the bare app: no policies, no Bulwark consumer or transport, no security.
"""

from __future__ import annotations

import os

from bench.bare import app, plain, sleep
from workers.telemetry import logs, metrics, probes, tracing

LAYERS = frozenset(filter(None, os.environ.get("BENCH_LAYERS", "").split(",")))
KNOWN = frozenset({"acks_late", "events", "metrics", "tracing", "logs"})
if LAYERS - KNOWN:
    raise SystemExit(f"BENCH_LAYERS: unknown {sorted(LAYERS - KNOWN)}; known {sorted(KNOWN)}")

if "acks_late" in LAYERS:
    prefetch = int(os.environ.get("BENCH_PREFETCH", "1"))
    app.conf.update(task_acks_late=True, worker_prefetch_multiplier=prefetch)
if "events" in LAYERS:
    app.conf.update(worker_send_task_events=True, task_send_sent_event=True)
if "metrics" in LAYERS:
    metrics.connect()
    probes.connect()
if "tracing" in LAYERS:
    tracing.connect()
if "logs" in LAYERS:
    logs.connect()

__all__ = ["app", "plain", "sleep"]
