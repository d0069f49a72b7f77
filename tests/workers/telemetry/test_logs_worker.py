"""A real worker logs one JSON object per line, tied to its task and to the exported span."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.kit import poll
from tests.workers.telemetry import test_tracing_worker as test_tracing
from tests.workers.telemetry.test_tracing_worker import Receiver, worker_env
from workers.client import client

pytestmark = pytest.mark.integration

# The OTLP receiver of the tracing tests (the traced producer is a conftest fixture).
otlp_receiver = test_tracing.otlp_receiver

#: Celery's own default line format, which must not appear: `[2024-01-01 00:00:00,000: INFO/...`
CELERY_PLAIN = re.compile(r"^\[\d{4}-\d\d-\d\d ")


class TestWorkerJsonLogs:
    """Worker and task lines are JSON with task_id, task_name, trace_id and span_id; no secrets."""

    def test_task_lines_carry_task_and_span_ids(
        self, start_worker: Any, otlp_receiver: Receiver, producer_spans: InMemorySpanExporter
    ) -> None:
        worker = start_worker(
            ["default"],
            name="logged",
            concurrency=1,
            env=worker_env(otlp_receiver, OTEL_BSP_SCHEDULE_DELAY="100", BULWARK_LOG_LEVEL="info"),
        )
        secret = f"s3cr3t-{uuid.uuid4().hex}"
        result = client().send_task("bulwark.ping", args=[secret])
        assert result.get(timeout=30)["token"] == secret
        (run,) = poll(lambda: otlp_receiver.named("run/bulwark.ping"), what="the run span")

        def lines() -> list[dict[str, Any]]:
            text = worker.log.read_text()
            assert not [x for x in text.splitlines() if CELERY_PLAIN.match(x)]
            return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

        def task_lines() -> list[dict[str, Any]]:
            return [x for x in lines() if x.get("task_id") == result.id]

        mine = poll(lambda: len(task_lines()) >= 2 and task_lines(), what="the task's lines")
        for entry in lines():
            assert {"timestamp", "level", "logger", "message"} <= entry.keys()
        assert {x["task_name"] for x in mine} == {"bulwark.ping"}
        received = next(x for x in mine if x["logger"] == "celery.worker.strategy")
        assert "received" in received["message"]
        done = next(x for x in mine if "succeeded" in x["message"])
        assert (done["trace_id"], done["span_id"]) == (run.trace_id, run.span_id)
        assert any(x["logger"] == "workers.lifecycle" for x in lines()), "Bulwark's own lines"
        assert secret not in worker.log.read_text()
