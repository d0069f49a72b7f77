"""No leak, end to end: a canary placed in an encrypted task's arguments and in its
exception's message, and a configured secret (a settings value) placed there too, are
absent from every log line (worker, Flower), every exported span, every Celery event,
every Flower response and every key and value in Redis (broker, results, dead letters).

Real parts only: a worker logging at debug and exporting spans over OTLP/HTTP to a
receiver in this test, `python -m workers.ops.flower` signing as the operator, and a
Celery event receiver in a thread, all running while the tasks run.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from google.protobuf.json_format import MessageToJson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from policies.deadletter import DeadLetterStore
from tests.conftest import StartWorker
from tests.events import Events
from tests.flower import Flower, start_flower
from tests.kit import Worker, poll
from tests.kit import redis_contents as everything_in
from tests.otlp import otlp_receiver
from workers.client import client
from workers.security import sealed
from workers.settings import get_settings

pytestmark = pytest.mark.integration

ENCRYPT = "inventory.*,payments.*,bulwark.ping"
QUEUES = ["default", "inventory", "payments"]


@dataclass(frozen=True)
class Canaries:
    """`argument`: plain data a task is sent; `secret`: a configured secret's value."""

    argument: str
    secret: str
    secret_file: Path

    def found_in(self, text: str | bytes) -> list[str]:
        """The canaries `text` holds, as is or inside base64 (the broker's bodies)."""
        data = text.encode() if isinstance(text, str) else text
        return [
            name
            for name, value in (("argument", self.argument), ("secret", self.secret))
            if any(form in data for form in encodings(value))
        ]


def encodings(value: str) -> list[bytes]:
    """`value`, and what base64 makes of it wherever it starts in an encoded stream."""
    raw, forms = value.encode(), [value.encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        forms.append(encoded[4 if shift else 0 : 4 * ((shift + len(raw)) // 3)])
    return forms


@pytest.fixture
def canaries(tmp_path: Path) -> Canaries:
    path = tmp_path / "webhook-secret"
    secret = f"canary-s3cr3t-{uuid.uuid4().hex}"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return Canaries(f"canary-arg-{uuid.uuid4().hex}", secret, path)


# -- spans: a minimal OTLP/HTTP receiver ---------------------------------------------------------


@dataclass
class Spans:
    endpoint: str = ""
    bodies: list[bytes] = field(default_factory=list)
    #: Each span as JSON (every attribute, event, link and the status), by span name.
    decoded: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [span for span_name, span in list(self.decoded) if span_name == name]


@pytest.fixture
def spans() -> Iterator[Spans]:
    received = Spans()

    def keep(body: bytes) -> None:
        received.bodies.append(body)
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.decoded.append((span.name, json.loads(MessageToJson(span))))

    with otlp_receiver(keep) as endpoint:
        received.endpoint = endpoint
        yield received


# -- Flower ---------------------------------------------------------------------------------------


# -- Redis ----------------------------------------------------------------------------------------


# -- the test -------------------------------------------------------------------------------------


def leaks(canaries: Canaries, where: str, texts: Iterable[str | bytes]) -> list[str]:
    """`where: canary: ...the text around it...` for each text holding a canary."""
    found = []
    for text in texts:
        for name in canaries.found_in(text):
            shown = text.decode(errors="replace") if isinstance(text, bytes) else text
            found.append(f"{where}: the {name} canary in: {shown[:600]}")
    return found


class TestNoLeak:
    """Canaries in arguments, exceptions and settings appear in nothing anyone can read."""

    def test_canaries_absent_everywhere(
        self,
        r: redis.Redis,
        redis_url: str,
        start_worker: StartWorker,
        spans: Spans,
        producer_spans: InMemorySpanExporter,
        events: Events,
        canaries: Canaries,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
    ) -> None:
        secrets = {
            "BULWARK_ENCRYPT": ENCRYPT,
            "BULWARK_LOG_LEVEL": "debug",
            "BULWARK_ALERT_WEBHOOK_SECRET_FILE": str(canaries.secret_file),
            "BULWARK_ALERT_WEBHOOK_URL": f"{spans.endpoint}/hook",
        }
        worker = start_worker(QUEUES, name="noleak", env={
            **secrets,
            "OTEL_EXPORTER_OTLP_ENDPOINT": spans.endpoint,
            "OTEL_SERVICE_NAME": "bulwark-noleak-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "BULWARK_TASK_EVENTS": "always",  # from the first task, not within 5 s of Flower
        })  # fmt: skip
        flower = start_flower(redis_url, secrets, tmp_path)
        try:
            self.run_and_check(r, worker, flower, spans, producer_spans, events, canaries,
                               monkeypatch)  # fmt: skip
        finally:
            flower.stop()

    def run_and_check(
        self,
        r: redis.Redis,
        worker: Worker,
        flower: Flower,
        spans: Spans,
        producer_spans: InMemorySpanExporter,
        events: Events,
        canaries: Canaries,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        host = worker.hostname
        online = f'flower_worker_online{{worker="{host}"}} 1.0'
        poll(lambda: online in flower.get("/metrics")[1], deadline=30, every=0.2,
             what=f"Flower receiving the worker's events ({flower.log})")  # fmt: skip
        poll(lambda: events.of("worker-heartbeat"), deadline=30, what="events received")

        monkeypatch.setenv("BULWARK_ENCRYPT", ENCRYPT)  # this process seals what it sends
        get_settings.cache_clear()
        sealed.forget()
        app = client()
        both = f"{canaries.argument} {canaries.secret}"
        # (1) the canaries as an argument
        reserved = app.send_task("inventory.reserve", args=[both, 3])
        # (2) and (3) the canaries in an exception's message: an unexpected keyword argument
        # names them (Celery's failure; and a ResilientTask's, dead-lettered)
        unexpected = f"{canaries.argument}-{canaries.secret}"
        pinged = app.send_task("bulwark.ping", kwargs={unexpected: 1, "token": "t"})
        charged = app.send_task("payments.charge", args=["o-1", 100], kwargs={unexpected: 1})
        assert reserved.get(timeout=30) == {"sku": both, "reserved": 3}, "opened to be run"
        for failed in (pinged, charged):
            with pytest.raises(TypeError, match="unexpected keyword argument"):
                failed.get(timeout=30)
        (letter,) = poll(DeadLetterStore(r).latest, what="the charge dead-lettered")
        assert letter.task_id == charged.id and sealed.is_sealed(letter.kwargs)
        ids = {reserved.id: "SUCCESS", pinged.id: "FAILURE", charged.id: "FAILURE"}

        # Events: every task's final event was seen; a failure names the exception's type.
        poll(lambda: events.of("task-succeeded", reserved.id), what="task-succeeded event")
        for task_id in (pinged.id, charged.id):
            (failure,) = poll(lambda: events.of("task-failed", task_id), what="task-failed")  # noqa: B023
            assert failure["exception"] == failure["traceback"] == "TypeError: (sealed)"
        assert events.of("task-received", reserved.id)[0]["args"] == sealed.HIDDEN

        # Flower: lists the three tasks in their final state; every view of them is read.
        def listed() -> dict[str, Any]:
            status, text = flower.get("/api/tasks")
            tasks: dict[str, Any] = json.loads(text) if status == 200 else {}
            states = {i: tasks.get(i, {}).get("state") for i in ids}
            return tasks if states == ids else {}

        tasks = poll(listed, deadline=30, every=0.2, what="Flower listing the tasks")
        assert tasks[pinged.id]["exception"] and tasks[reserved.id]["args"] == sealed.HIDDEN
        paths = [
            "/api/tasks",
            "/api/task/types",
            "/api/workers",
            f"/api/workers?refresh=1&workername={host}",
            "/metrics",
            "/tasks",
            "/tasks/datatable?draw=1&start=0&length=100&search%5Bvalue%5D=&order%5B0%5D%5Bcolumn%5D=0&columns%5B0%5D%5Bdata%5D=name",
            "/workers",
            f"/worker/{host}",
        ]
        for task_id in ids:
            paths += [f"/api/task/info/{task_id}", f"/api/task/result/{task_id}",
                      f"/task/{task_id}"]  # fmt: skip
        statuses = {path: flower.get(path)[0] for path in paths}
        assert {p: s for p, s in statuses.items() if s != 200} == {}
        info = json.loads(flower.responses[f"/api/task/info/{pinged.id}"])
        assert (info["state"], info["exception"]) == ("FAILURE", "TypeError: (sealed)")
        result = json.loads(flower.responses[f"/api/task/result/{reserved.id}"])
        assert (result["state"], result["result"]) == ("SUCCESS", "(sealed)"), "never opened"
        result = json.loads(flower.responses[f"/api/task/result/{pinged.id}"])
        assert (result["state"], result["result"]) == ("FAILURE", "Exception('(sealed)')")
        assert host in json.loads(flower.responses[f"/api/workers?refresh=1&workername={host}"])
        flower.stop()

        # Spans: the worker's are flushed at its warm shutdown at the latest.
        assert worker.stop() == 0
        for name in ("run/inventory.reserve", "run/bulwark.ping", "run/payments.charge"):
            poll(lambda: spans.named(name), deadline=30, what=f"the span {name}")  # noqa: B023
        (ping_span,) = spans.named("run/bulwark.ping")
        assert ping_span["status"] == {"code": "STATUS_CODE_ERROR",
                                       "message": "TypeError: (sealed)"}  # fmt: skip
        (exception,) = [e for e in ping_span.get("events", []) if e["name"] == "exception"]
        assert {"key": "exception.type", "value": {"stringValue": "TypeError"}} in (
            exception["attributes"]
        )
        sent = [s.name for s in producer_spans.get_finished_spans()]
        assert {f"apply_async/{n}" for n in ("inventory.reserve", "bulwark.ping")} <= set(sent)
        events.stop()

        # Redis: the results and the dead letter are there, sealed.
        stored = everything_in(r)
        for task_id in ids:
            meta = json.loads(json.loads(stored[f"celery-task-meta-{task_id}".encode()])["payload"])
            assert sealed.is_sealed(meta["result"]), meta

        worker_log = worker.log.read_text(errors="replace").splitlines()
        flower_log = flower.log.read_text(errors="replace").splitlines()
        (failed_line,) = [json.loads(line) for line in worker_log
                          if "raised unexpected" in line and pinged.id in line]  # fmt: skip
        assert failed_line["message"].endswith("raised unexpected: TypeError: (sealed)")
        assert failed_line["exception"].startswith("Traceback (most recent call last):\n  File")
        assert failed_line["exception"].endswith("\nTypeError: (sealed)"), "frames, no message"
        assert any('"level": "debug"' in line for line in worker_log), "logged at debug"
        assert flower_log, "Flower logged"

        found = [
            *leaks(canaries, "worker log", worker_log),
            *leaks(canaries, "Flower log", flower_log),
            *leaks(canaries, "span (OTLP body)", spans.bodies),
            *leaks(canaries, "span", (json.dumps(s) for _, s in spans.decoded)),
            *leaks(canaries, "producer span",
                   (s.to_json() for s in producer_spans.get_finished_spans())),
            *leaks(canaries, "event", (json.dumps(e, default=repr) for e in events.received)),
            *(x for path, text in flower.responses.items()
              for x in leaks(canaries, f"Flower {path}", [text])),
            *(x for key, value in stored.items()
              for x in leaks(canaries, f"Redis {key.decode(errors='replace')}", [key, value])),
        ]  # fmt: skip
        assert not found, "\n".join(found)
