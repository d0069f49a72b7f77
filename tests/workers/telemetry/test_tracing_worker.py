"""Traces across a real worker, exported over real OTLP/HTTP to a receiver on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.kit import poll
from tests.otlp import otlp_receiver as serve_otlp
from workers.client import client

pytestmark = pytest.mark.integration


@dataclass
class Received:
    """One span as the receiver decoded it."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    service: str
    attributes: dict[str, Any]
    events: dict[str, dict[str, Any]]


@dataclass
class Receiver:
    """A minimal OTLP/HTTP trace receiver: POST /v1/traces, protobuf bodies."""

    endpoint: str
    spans: list[Received] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    def named(self, name: str) -> list[Received]:
        return [s for s in self.spans if s.name == name]


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def _decode(body: bytes) -> list[Received]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                out.append(
                    Received(
                        name=s.name,
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        kind=s.kind,
                        service=str(resource.get("service.name")),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        events={
                            e.name: {a.key: _value(a.value) for a in e.attributes} for e in s.events
                        },
                    )
                )
    return out


@pytest.fixture
def otlp_receiver() -> Iterator[Receiver]:
    receiver = Receiver(endpoint="")

    def keep(body: bytes) -> None:
        receiver.bodies.append(body)
        receiver.spans.extend(_decode(body))

    with serve_otlp(keep) as endpoint:
        receiver.endpoint = endpoint
        yield receiver


def worker_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "bulwark-test-worker",
        **extra,
    }


def sent(exporter: InMemorySpanExporter, task_name: str) -> ReadableSpan:
    (span,) = [s for s in exporter.get_finished_spans() if s.name == f"apply_async/{task_name}"]
    return span


class TestTraceAcrossWorker:
    """The worker's span of a task is the child of the producer's span that sent it."""

    def test_consumer_span_is_child_of_producer_span_and_flushed_on_exit(
        self, start_worker: Any, otlp_receiver: Receiver, producer_spans: InMemorySpanExporter
    ) -> None:
        # Batches wait 10 minutes: only the flush on shutdown can deliver them.
        worker = start_worker(
            ["default"],
            name="traced",
            concurrency=1,
            env=worker_env(otlp_receiver, OTEL_BSP_SCHEDULE_DELAY="600000"),
        )
        secret = f"s3cr3t-{uuid.uuid4().hex}"
        result = client().send_task("bulwark.ping", args=[secret])
        assert result.get(timeout=30)["token"] == secret
        assert not otlp_receiver.named("run/bulwark.ping"), "exported before the flush"

        os.kill(worker.process.pid, signal.SIGTERM)  # warm shutdown: children exit cleanly
        worker.process.wait(30)
        (run,) = poll(lambda: otlp_receiver.named("run/bulwark.ping"), what="the run span")

        producer = sent(producer_spans, "bulwark.ping").get_span_context()
        assert run.trace_id == f"{producer.trace_id:032x}"
        assert run.parent_span_id == f"{producer.span_id:016x}"
        assert run.kind == trace.SpanKind.CONSUMER.value + 1  # OTLP enum counts from UNSPECIFIED
        assert run.service == "bulwark-test-worker"
        assert run.attributes["messaging.message.id"] == result.id
        assert all(secret.encode() not in body for body in otlp_receiver.bodies)


class TestPolicySpanEvents:
    """A policy decision about a task is an event on the task's span."""

    def test_dead_lettered_task_carries_the_decision(
        self, start_worker: Any, otlp_receiver: Receiver, producer_spans: InMemorySpanExporter
    ) -> None:
        start_worker(
            ["payments"],
            name="payments",
            concurrency=1,
            env=worker_env(otlp_receiver, OTEL_BSP_SCHEDULE_DELAY="100"),
        )
        result = client().send_task("payments.charge", args=["o-bad", 0])
        (run,) = poll(
            lambda: otlp_receiver.named("run/payments.charge"), deadline=30, what="the run span"
        )
        event = run.events["bulwark.task_dead_lettered"]
        assert event["bulwark.task_id"] == result.id
        assert event["bulwark.task_name"] == "payments.charge"
        assert event["bulwark.reason"].startswith("permanent failure")
        assert (
            run.trace_id
            == f"{sent(producer_spans, 'payments.charge').get_span_context().trace_id:032x}"
        )
