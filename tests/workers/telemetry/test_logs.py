"""JSON log lines: fields, task and trace context, redaction of secrets."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery._state import _task_stack
from opentelemetry.sdk.trace import TracerProvider

from workers.telemetry.logs import (
    MASK,
    JsonFormatter,
    RedactFilter,
    TextFormatter,
    configure,
    redact,
    redact_value,
)


def record(msg: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("bulwark.test", logging.WARNING, __file__, 1, msg, args or None, None)
    rec.__dict__.update(extra)
    return rec


def line(rec: logging.LogRecord) -> dict[str, Any]:
    RedactFilter().filter(rec)
    out = JsonFormatter().format(rec)
    assert "\n" not in out
    parsed: dict[str, Any] = json.loads(out)
    return parsed


@pytest.fixture
def current_task() -> Iterator[Any]:
    app = Celery("logs-test", set_as_current=False)

    @app.task(name="payments.charge", shared=False)
    def charge() -> None: ...

    charge.push_request(id="t-123")
    _task_stack.push(charge)
    yield charge
    _task_stack.pop()
    charge.pop_request()


class TestJsonFormatter:
    """One JSON object per line with the fixed field names, task and trace ids where known."""

    def test_fixed_fields_and_utc_timestamp(self) -> None:
        out = line(record("hello %s", "world"))
        assert out["message"] == "hello world"
        assert out["level"] == "warning"
        assert out["logger"] == "bulwark.test"
        assert out["timestamp"].endswith("Z") and "T" in out["timestamp"]
        assert "task_id" not in out and "trace_id" not in out

    def test_extras_are_fields_and_celery_data_is_dropped(self) -> None:
        data = {"id": "t-9", "name": "payments.charge", "args": "('4111-1111',)", "kwargs": "{}"}
        out = line(record("Task received", event="TaskDeferred", data=data))
        assert out["event"] == "TaskDeferred"
        assert "data" not in out
        assert "4111-1111" not in json.dumps(out)
        assert (out["task_id"], out["task_name"]) == ("t-9", "payments.charge")

    def test_running_task_gives_its_id_and_name(self, current_task: Any) -> None:
        out = line(record("inside"))
        assert (out["task_id"], out["task_name"]) == ("t-123", "payments.charge")

    def test_current_span_gives_trace_and_span_ids(self) -> None:
        tracer = TracerProvider().get_tracer("test")
        with tracer.start_as_current_span("run") as span:
            out = line(record("traced"))
            ctx = span.get_span_context()
        assert out["trace_id"] == f"{ctx.trace_id:032x}"
        assert out["span_id"] == f"{ctx.span_id:016x}"

    def test_exception_is_one_field_and_redacted(self) -> None:
        try:
            raise ConnectionError("cannot reach redis://:hunter2@db:6379/0")
        except ConnectionError:
            rec = record("failed")
            rec.exc_info = sys.exc_info()
        out = line(rec)
        assert "ConnectionError" in out["exception"]
        assert "hunter2" not in json.dumps(out)

    def test_text_formatter_names_the_task(self, current_task: Any) -> None:
        rec = record("plain")
        RedactFilter().filter(rec)
        assert "payments.charge[t-123]: plain" in TextFormatter().format(rec)


class TestRedaction:
    """Values of secret-named keys and URL passwords never reach a line."""

    @pytest.mark.parametrize(
        ("text", "secret"),
        [
            ("connecting to redis://:pw123@redis:6379/0", "pw123"),
            ("broker amqp://guest:guestpw@rabbit//", "guestpw"),
            ("login password=hunter2 ok", "hunter2"),
            ("sent {'token': 'abc.def', 'n': 1}", "abc.def"),
            ('body {"api_key": "k-9", "n": 1}', "k-9"),
            ("Authorization: Bearer eyJhbGci", "eyJhbGci"),
            ("client_secret=s3cr3t&scope=x", "s3cr3t"),
            ("API-KEY: zzz", "zzz"),
        ],
    )
    def test_secrets_in_text_are_masked(self, text: str, secret: str) -> None:
        masked = redact(text)
        assert secret not in masked
        assert MASK in masked

    def test_ordinary_text_is_unchanged(self) -> None:
        text = "Task payments.charge[abc] succeeded in 0.1s: {'receipt': 'r-1'} redis://db:6379/0"
        assert redact(text) == text

    def test_url_user_is_kept(self) -> None:
        assert redact("redis://app:pw@h:1/0") == f"redis://app:{MASK}@h:1/0"

    def test_nested_extras_are_masked_by_key(self) -> None:
        value = {
            "user": "ann",
            "Password": "x",
            "auth": {"token": "y", "n": 2},
            "urls": ["redis://:z@h"],
        }
        assert redact_value(value) == {
            "user": "ann",
            "Password": MASK,
            "auth": {"token": MASK, "n": 2},
            "urls": [f"redis://:{MASK}@h"],
        }

    def test_filter_masks_message_args_and_extras(self) -> None:
        out = line(
            record("login %s", "password=hunter2", api_key="k-1", headers={"Authorization": "b"})
        )
        assert "hunter2" not in json.dumps(out)
        assert out["api_key"] == MASK
        assert out["headers"] == {"Authorization": MASK}


class TestConfigure:
    """`configure` puts one redacting handler on the root; Celery's loggers propagate to it."""

    def test_task_logger_lines_come_out_as_json(self) -> None:
        root = logging.getLogger()
        saved = (root.handlers[:], root.level)
        stream = io.StringIO()
        try:
            configure(level="info", json_lines=True, stream=stream)
            from celery.utils.log import get_task_logger

            get_task_logger("tasks.x").info("charged with token=abc")
            logging.getLogger("bulwark.quiet").debug("not shown")
        finally:
            root.handlers[:], _ = saved
            root.setLevel(saved[1])
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x["message"] for x in lines] == [f"charged with token={MASK}"]
        assert lines[0]["logger"] == "tasks.x"
