"""OpenTelemetry tracing: one tracer provider per process, built after fork.

Configured only by the standard variables, read by the SDK itself:

- `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`): where
  spans go, over OTLP/HTTP (Jaeger accepts it on port 4318);
- `OTEL_TRACES_EXPORTER`: `otlp`, `console` or `none`; by default `otlp` when an
  endpoint is set, else `none` (spans are still made, so logs carry trace ids
  and the context reaches the next task, but nothing is sent anywhere);
- `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (default service name
  `bulwark-worker`, `bulwark-beat` or `bulwark-client`), `OTEL_TRACES_SAMPLER`,
  `OTEL_BSP_*` (batching), `OTEL_SDK_DISABLED=true` (no tracing at all).

Celery's producer and consumer spans come from opentelemetry-instrumentation-celery:
the consumer span of a task is a child of the span that sent it. Task arguments
are never recorded. The instrumentation records a failed task's exception (message
and stack trace, also in the span's status): an encrypted task's (`BULWARK_ENCRYPT`)
is exported by its type only, as its logs and events show it. Policy decisions
about a task (deferred, retried, dead-lettered, fell back, rejected, breaker
transitions, degradation) become events on the current span. Spans are flushed
when a pool child exits and when the worker or beat shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from celery import signals
from opentelemetry import trace
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Status

from policies import events
from workers.security import sealed
from workers.settings import SettingsError
from workers.telemetry.logs import redact, redact_value

__all__ = [
    "connect",
    "exporter_from_env",
    "instrument",
    "setup",
    "setup_producer",
    "shutdown",
    "span_event",
]

logger = logging.getLogger(__name__)

EXPORTERS = ("otlp", "console", "none")
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: Events that happen on every call: counted by metrics, not worth a span event.
ROUTINE = (events.CallRecorded, events.BulkheadChanged)
#: Attributes of the Celery instrumentation: the task a span runs or sends, a retry's reason.
TASK_NAME = "celery.task_name"
RETRY_REASON = "celery.retry.reason"
#: The span event `record_exception` adds, and its attributes that quote the exception.
EXCEPTION_EVENT = "exception"
EXCEPTION_TEXT = ("exception.message", "exception.stacktrace")

_lock = threading.Lock()
_provider: TracerProvider | None = None
_provider_pid: int | None = None


def _disabled(env: Mapping[str, str]) -> bool:
    return env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"


def exporter_name(env: Mapping[str, str] | None = None) -> str:
    """The exporter `OTEL_TRACES_EXPORTER` asks for (default: otlp if an endpoint is set)."""
    env = os.environ if env is None else env
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        return "otlp" if any(env.get(v, "").strip() for v in ENDPOINT_VARS) else "none"
    if raw not in EXPORTERS:
        raise SettingsError(
            [f"OTEL_TRACES_EXPORTER={raw!r}: accepts one of {', '.join(EXPORTERS)}"]
        )
    return raw


def exporter_from_env(env: Mapping[str, str] | None = None) -> SpanExporter | None:
    """The span exporter the environment asks for (behind `RedactingExporter`), or None."""
    name = exporter_name(env)
    if name == "otlp":
        # lazy: the OTLP exporter (protobuf, requests) loads only when an endpoint is set
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # endpoint, headers, timeout: OTEL_EXPORTER_OTLP_*
        return RedactingExporter(OTLPSpanExporter())
    if name == "console":
        return RedactingExporter(ConsoleSpanExporter())
    return None


def _masked(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        k: redact_value(v, k) if isinstance(v, str) else v for k, v in (attributes or {}).items()
    }


def _of_encrypted_task(span: ReadableSpan) -> bool:
    name = (span.attributes or {}).get(TASK_NAME)
    return isinstance(name, str) and sealed.encrypted(name)


def _sealed_events(span: ReadableSpan) -> tuple[list[SpanEvent], str]:
    """An encrypted task's span events with the exception text sealed, and what its
    status says instead ("TypeError: (sealed)")."""
    out, said = [], sealed.SEALED_TEXT
    for event in span.events:
        attributes = dict(event.attributes or {})
        if event.name == EXCEPTION_EVENT:
            kind = attributes.get("exception.type")
            said = f"{kind}: {sealed.SEALED_TEXT}" if kind else sealed.SEALED_TEXT
            for key in EXCEPTION_TEXT:
                if key in attributes:
                    attributes[key] = said
        out.append(SpanEvent(event.name, attributes, event.timestamp))
    return out, said


class RedactingExporter(SpanExporter):
    """Masks secrets in span attributes, event attributes and status text before export.

    The Celery instrumentation records a failed task's exception message and
    stack trace on its span; an exception may quote a password or a token, and
    a trace must never carry one. An encrypted task's exception may quote its
    arguments: its span keeps the exception's type, not its message or stack.
    """

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.inner.export([self._redacted(span) for span in spans])

    @staticmethod
    def _redacted(span: ReadableSpan) -> ReadableSpan:
        status, span_events, attributes = span.status, list(span.events), span.attributes
        if _of_encrypted_task(span):
            span_events, said = _sealed_events(span)
            if status.description:
                status = Status(status.status_code, said)
            if attributes and RETRY_REASON in attributes:
                attributes = {**attributes, RETRY_REASON: sealed.SEALED_TEXT}
        if status.description:
            status = Status(status.status_code, redact(status.description))
        return ReadableSpan(
            name=span.name,
            context=span.context,
            parent=span.parent,
            resource=span.resource,
            attributes=_masked(attributes),
            events=[SpanEvent(e.name, _masked(e.attributes), e.timestamp) for e in span_events],
            links=span.links,
            kind=span.kind,
            status=status,
            start_time=span.start_time,
            end_time=span.end_time,
            instrumentation_scope=span.instrumentation_scope,
        )

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def _resource(default_service: str) -> Resource:
    resource = Resource.create()
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: default_service}))
    return resource


def setup(default_service: str = "bulwark-worker") -> TracerProvider | None:
    """Build this process's tracer provider and instrument Celery (idempotent per process).

    Returns None when `OTEL_SDK_DISABLED=true`. The provider becomes the global
    one unless the process already has an SDK provider of its own.
    """
    global _provider, _provider_pid
    if _disabled(os.environ):
        return None
    with _lock:
        if _provider is not None and _provider_pid == os.getpid():
            return _provider
        current = trace.get_tracer_provider()
        if isinstance(current, TracerProvider):
            provider = current  # set up already (the host application's, or before a fork)
        else:
            provider = TracerProvider(resource=_resource(default_service))
            exporter = exporter_from_env()
            if exporter is not None:
                provider.add_span_processor(BatchSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
        _provider, _provider_pid = provider, os.getpid()
        instrument(provider)
        return provider


def instrument(provider: trace.TracerProvider | None = None) -> None:
    """(Re)instrument Celery's publish and run signals with `provider`'s tracer."""
    instrumentor = CeleryInstrumentor()
    if instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.uninstrument()
    instrumentor.instrument(tracer_provider=provider)


def setup_producer() -> TracerProvider | None:
    """Tracing for a process that only sends tasks (`workers.client.client()`)."""
    return setup("bulwark-client")


def shutdown() -> None:
    """Flush and stop this process's provider (spans still batched are exported now)."""
    global _provider, _provider_pid
    with _lock:
        provider, pid = _provider, _provider_pid
        _provider = _provider_pid = None
    if provider is not None and pid == os.getpid():
        provider.shutdown()


# -- policy decisions as span events ---------------------------------------------------------


def _attributes(event: events.Event) -> dict[str, str | int | float | bool]:
    attributes: dict[str, str | int | float | bool] = {}
    for f in fields(event):
        value = getattr(event, f.name)
        if value is None:
            continue
        key = f"bulwark.{f.name}"
        attributes[key] = redact(value) if isinstance(value, str) else value
    return attributes


def event_name(event: events.Event) -> str:
    """`TaskDeadLettered` -> `bulwark.task_dead_lettered`."""
    name = type(event).__name__
    return "bulwark." + "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def span_event(event: events.Event) -> None:
    """Listener: add a policy decision as an event on the current span (if one records)."""
    if isinstance(event, ROUTINE):
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(event_name(event), attributes=_attributes(event))


# -- lifecycle -------------------------------------------------------------------------------


def _pool_forks(worker: Any) -> bool:
    pool = getattr(worker, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    return "prefork" in str(name) or not name


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Check OTEL_TRACES_EXPORTER before forking; a pool that does not fork traces here."""
    try:
        exporter_name()
    except SettingsError as exc:
        raise SystemExit(f"bulwark: {exc}") from None
    if sender is not None and not _pool_forks(sender):
        setup("bulwark-worker")


def _on_child_start(**_: Any) -> None:
    setup("bulwark-worker")


def _on_child_exit(**_: Any) -> None:
    shutdown()


def _on_beat_init(**_: Any) -> None:
    setup("bulwark-beat")


def _on_worker_shutdown(**_: Any) -> None:
    shutdown()


def connect() -> None:
    """Connect tracing's lifecycle handlers: set up after fork, flush on exit."""
    for signal, handler in (
        (signals.worker_init, _on_worker_init),
        (signals.worker_process_init, _on_child_start),
        (signals.worker_process_shutdown, _on_child_exit),
        (signals.beat_init, _on_beat_init),
        (signals.worker_shutdown, _on_worker_shutdown),
    ):
        signal.connect(handler, weak=False, dispatch_uid=f"bulwark.tracing.{handler.__name__}")
