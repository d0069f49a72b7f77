"""Alert sinks against real receivers: an HTTP server, Alertmanager, an SMTP server."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.kit import free_port, need, poll
from workers.telemetry.alerts.model import Alert, Condition
from workers.telemetry.alerts.plan import Notification
from workers.telemetry.alerts.sinks import (
    SIGNATURE_HEADER,
    AlertmanagerSink,
    EmailSink,
    SinkError,
    SlackSink,
    WebhookSink,
    verify,
)

pytestmark = pytest.mark.integration

SECRET = "test-hmac-secret"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every POST (and can fail on purpose)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail_next: list[int] = []  # status codes to answer with, in order
        self.fail_only: bytes = b""  # ... to requests whose body contains this
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer._lock:
                    status = 200
                    if outer.fail_next and outer.fail_only in body:
                        status = outer.fail_next.pop(0)
                    outer.requests.append(
                        {"headers": dict(self.headers), "body": body, "status": status}
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def payloads(self) -> list[dict[str, Any]]:
        """The bodies of the requests it accepted (answered 200)."""
        with self._lock:
            return [json.loads(r["body"]) for r in self.requests if r["status"] == 200]

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as rec:
        yield rec


def payload(status: str = "firing", **labels: str) -> dict[str, Any]:
    alert = Alert.start(
        Condition(
            name="BreakerOpen",
            service="payments",
            severity="warning",
            message="circuit breaker payments is open",
            labels={"breaker": "payments", **labels},
        ),
        1_700_000_000.0,
    )
    if status == "resolved":
        alert = alert.resolve(1_700_000_060.0)
    return Notification({"service": "payments"}, (alert,)).to_dict()


class TestWebhook:
    """The webhook body is JSON signed with HMAC-SHA256; transient failures are retried."""

    def test_signed_json_arrives(self, receiver: Receiver) -> None:
        WebhookSink(receiver.url, SECRET, timeout=5).send(payload())
        (req,) = receiver.requests
        assert verify(req["body"], SECRET, req["headers"][SIGNATURE_HEADER])
        assert not verify(req["body"], "wrong", req["headers"][SIGNATURE_HEADER])
        body = json.loads(req["body"])
        assert body["status"] == "firing" and body["alerts"][0]["labels"]["breaker"] == "payments"

    def test_server_errors_are_retried_client_errors_are_not(self, receiver: Receiver) -> None:
        receiver.fail_next = [503, 502]
        WebhookSink(receiver.url, SECRET, timeout=5).send(payload())
        assert len(receiver.requests) == 3
        receiver.fail_next = [400]
        with pytest.raises(SinkError) as err:
            WebhookSink(receiver.url, SECRET, timeout=5).send(payload())
        assert err.value.permanent and len(receiver.requests) == 4
        assert SECRET not in str(err.value)

    def test_unreachable_receiver_is_a_transient_error(self) -> None:
        with pytest.raises(SinkError) as err:
            WebhookSink(f"http://127.0.0.1:{free_port()}/x", SECRET, timeout=1).send(payload())
        assert not err.value.permanent


class TestSlack:
    """A Slack-compatible webhook gets `text` and `blocks`."""

    def test_text_and_blocks(self, receiver: Receiver) -> None:
        SlackSink(receiver.url, timeout=5).send(payload())
        (body,) = receiver.payloads()
        assert body["text"].startswith("[FIRING:1] service=payments")
        assert "circuit breaker payments is open" in body["text"]
        assert body["blocks"][0]["type"] == "header"


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    need(
        Path(ALERTMANAGER).exists(),
        f"{ALERTMANAGER} missing: apt-get install prometheus-alertmanager",
    )
    folder = tmp_path_factory.mktemp("alertmanager")
    config = folder / "alertmanager.yml"
    config.write_text('route:\n  receiver: "null"\nreceivers:\n  - name: "null"\n')
    port = free_port()
    log = (folder / "am.log").open("wb")
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={config}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError((folder / "am.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        poll(ready, deadline=30, every=0.1, what="alertmanager ready")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def am_alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
        return list(json.loads(resp.read()))


class TestAlertmanager:
    """A real Alertmanager accepts firing alerts (API v2) and drops them once resolved."""

    def test_firing_then_resolved(self, alertmanager: str) -> None:
        sink = AlertmanagerSink(alertmanager, timeout=5)
        sink.send(payload(run="am"))

        def found() -> list[dict[str, Any]]:
            return [a for a in am_alerts(alertmanager) if a["labels"].get("run") == "am"]

        (alert,) = poll(found, deadline=20, what="the alert in Alertmanager")
        assert alert["labels"]["alertname"] == "BreakerOpen"
        assert alert["labels"]["severity"] == "warning"
        assert alert["annotations"]["summary"] == "circuit breaker payments is open"
        assert alert["status"]["state"] == "active"
        sink.send(payload("resolved", run="am"))
        poll(lambda: not found(), deadline=20, what="Alertmanager to drop the resolved alert")


class TestEmail:
    """Alert email reaches a real SMTP server (aiosmtpd) with its subject and alerts."""

    def test_email_delivered(self) -> None:
        need(importlib.util.find_spec("aiosmtpd"), "aiosmtpd missing: pip install -e '.[dev]'")
        controller_mod = importlib.import_module("aiosmtpd.controller")
        received: list[Any] = []

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                received.append(envelope)
                return "250 OK"

        port = free_port()
        controller = controller_mod.Controller(Handler(), hostname="127.0.0.1", port=port)
        controller.start()
        try:
            sink = EmailSink(
                "127.0.0.1", port, sender="bulwark@test", to=["ops@test", "dev@test"], timeout=5
            )
            sink.send(payload())
            (envelope,) = poll(lambda: list(received), what="the email")
        finally:
            controller.stop()
        assert envelope.mail_from == "bulwark@test"
        assert envelope.rcpt_tos == ["ops@test", "dev@test"]
        msg = message_from_bytes(envelope.content)
        assert msg["Subject"] == "bulwark [FIRING:1] service=payments"
        assert "circuit breaker payments is open" in msg.get_payload()

    def test_unreachable_smtp_is_a_transient_error(self) -> None:
        sink = EmailSink("127.0.0.1", free_port(), sender="a@t", to=["b@t"], timeout=2)
        with pytest.raises(SinkError) as err:
            sink.send(payload())
        assert not err.value.permanent
