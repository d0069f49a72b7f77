"""Tracing set-up from OTEL_* variables, and policy decisions as span events."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from policies import events
from workers.settings import SettingsError
from workers.telemetry import tracing


class TestExporterChoice:
    """The exporter comes from the standard variables; none unless an endpoint is set."""

    def test_no_endpoint_means_no_exporter(self) -> None:
        assert tracing.exporter_name({}) == "none"
        assert tracing.exporter_from_env({}) is None

    @pytest.mark.parametrize(
        "var", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    )
    def test_an_endpoint_means_otlp_over_http(self, var: str) -> None:
        env = {var: "http://127.0.0.1:4318"}
        assert tracing.exporter_name(env) == "otlp"
        exporter = tracing.exporter_from_env(env)
        assert isinstance(exporter, tracing.RedactingExporter)
        assert isinstance(exporter.inner, OTLPSpanExporter)

    def test_explicit_none_wins_over_an_endpoint(self) -> None:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}
        assert tracing.exporter_name(env) == "none"

    def test_unknown_exporter_names_the_variable(self) -> None:
        with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER='zipkin'"):
            tracing.exporter_name({"OTEL_TRACES_EXPORTER": "zipkin"})

    def test_service_name_defaults_per_role_and_env_wins(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
        assert tracing._resource("bulwark-beat").attributes["service.name"] == "bulwark-beat"
        monkeypatch.setenv("OTEL_SERVICE_NAME", "payments-workers")
        assert tracing._resource("bulwark-beat").attributes["service.name"] == "payments-workers"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


class TestSpanEvents:
    """Policy decisions about a task land on the current span, routine calls do not."""

    def test_decisions_become_named_events_with_attributes(
        self, spans: tuple[TracerProvider, InMemorySpanExporter]
    ) -> None:
        provider, exporter = spans
        with provider.get_tracer("t").start_as_current_span("run/payments.charge"):
            tracing.span_event(
                events.TaskDeferred(
                    policy="breaker",
                    name="payments",
                    task_name="payments.charge",
                    task_id="t-1",
                    countdown=2.5,
                    deferrals=1,
                    reason="breaker open",
                )
            )
            tracing.span_event(
                events.BreakerTransition(
                    name="payments", from_state="closed", to_state="open", reason="5 failures"
                )
            )
            tracing.span_event(events.CallRecorded(name="payments", success=True, duration=0.1))
        (span,) = exporter.get_finished_spans()
        assert [e.name for e in span.events] == [
            "bulwark.task_deferred",
            "bulwark.breaker_transition",
        ]
        deferred = span.events[0].attributes
        assert deferred is not None
        assert deferred["bulwark.countdown"] == 2.5
        assert deferred["bulwark.task_id"] == "t-1"
        assert deferred["bulwark.reason"] == "breaker open"

    def test_reasons_are_redacted(self, spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
        provider, exporter = spans
        with provider.get_tracer("t").start_as_current_span("run"):
            tracing.span_event(
                events.TaskDeadLettered(
                    policy="retry",
                    name="payments.charge",
                    task_name="payments.charge",
                    task_id=None,
                    reason="auth failed for https://bot:tok3n@api/",
                )
            )
        (span,) = exporter.get_finished_spans()
        attributes = span.events[0].attributes
        assert attributes is not None
        assert attributes["bulwark.reason"] == "auth failed for https://bot:***@api/"
        assert "bulwark.task_id" not in attributes

    def test_event_names(self) -> None:
        assert tracing.event_name(
            events.TaskFellBack(policy="d", name="n", task_name="t", task_id=None, status="s")
        ) == ("bulwark.task_fell_back")


class TestRedactingExporter:
    """Secrets in exception text and attributes never leave the process in a span."""

    def test_exception_event_and_status_are_masked(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.trace import Status, StatusCode

        from workers.telemetry.tracing import RedactingExporter

        memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(RedactingExporter(memory)))
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("run/payments.charge") as span:
            error = ConnectionError("cannot reach redis://:hunter2@db:6379/0 (password=hunter2)")
            span.record_exception(error)
            span.set_attribute("api_key", "hunter2")
            span.set_attribute("celery.task_name", "payments.charge")
            span.set_status(Status(StatusCode.ERROR, str(error)))
        (exported,) = memory.get_finished_spans()
        dumped = exported.to_json()
        assert "hunter2" not in dumped
        assert exported.attributes["celery.task_name"] == "payments.charge"
        assert exported.events[0].name == "exception"
        assert exported.events[0].attributes["exception.message"] == (
            "cannot reach redis://:***@db:6379/0 (password=***)"
        )
        assert exported.attributes["api_key"] == "***"
        assert exported.status.description == "cannot reach redis://:***@db:6379/0 (password=***)"
        assert exported.context == span.get_span_context()
