"""Where notifications go: log, webhook (HMAC-signed), Slack, Alertmanager, email.

A sink takes a notification payload (`Notification.to_dict()`: group, status,
alerts) and delivers it, or raises `SinkError` (`permanent=True` when trying
again cannot help, e.g. HTTP 400). HTTP sinks retry transient failures a few
times within a few seconds (tenacity); the `bulwark.alerts.notify` task
retries longer with a Celery countdown. Secrets (the HMAC key, the SMTP
password) are never logged nor put in an exception message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from typing import Any, ClassVar, Protocol

from tenacity import (
    retry,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from workers.telemetry.alerts.model import iso

log = logging.getLogger("bulwark.alerts")

SIGNATURE_HEADER = "X-Bulwark-Signature"
Payload = Mapping[str, Any]


class SinkError(Exception):
    """A notification was not delivered."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class Sink(Protocol):
    #: Fed every firing and resolved alert on every evaluation (Alertmanager),
    #: instead of deduplicated group notifications.
    stream: ClassVar[bool]

    def send(self, payload: Payload) -> None: ...


def sign(body: bytes, secret: str) -> str:
    """The signature header value: `sha256=<hex HMAC-SHA256 of the body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, header: str | None) -> bool:
    """True if `header` is the signature of `body` under `secret` (constant time)."""
    return header is not None and hmac.compare_digest(sign(body, secret), header)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, SinkError) and not exc.permanent


def post_json(
    url: str,
    body: Any,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    secret: str | None = None,
    attempts: int = 3,
) -> int:
    """POST `body` as JSON; retry transient failures within about `timeout` seconds."""
    data = json.dumps(body, separators=(",", ":")).encode()
    sent = {"Content-Type": "application/json", "User-Agent": "bulwark-alerts", **(headers or {})}
    if secret is not None:
        sent[SIGNATURE_HEADER] = sign(data, secret)

    @retry(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(attempts) | stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.2, max=1.0),
        reraise=True,
    )
    def once() -> int:
        request = urllib.request.Request(url, data=data, headers=sent, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            permanent = 400 <= exc.code < 500 and exc.code not in (408, 429)
            raise SinkError(f"POST {_safe(url)}: HTTP {exc.code}", permanent=permanent) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise SinkError(f"POST {_safe(url)}: {type(exc).__name__}") from None

    return once()


def _safe(url: str) -> str:
    """The URL without its path and query (Slack-style URLs carry their token in the path)."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/..."


def summary(payload: Payload) -> str:
    alerts = payload["alerts"]
    group = ", ".join(f"{k}={v}" for k, v in payload.get("group", {}).items())
    return f"[{payload['status'].upper()}:{len(alerts)}] {group}"


def lines(payload: Payload) -> list[str]:
    return [
        f"{a['status']:8} {a['severity']:8} {a['name']} ({a['service']}): {a['message']}"
        for a in payload["alerts"]
    ]


class LogSink:
    """One log line per alert (warning for firing critical/warning alerts, else info)."""

    stream: ClassVar[bool] = False

    def send(self, payload: Payload) -> None:
        for alert in payload["alerts"]:
            loud = alert["status"] == "firing" and alert["severity"] in ("critical", "warning")
            log.log(
                logging.WARNING if loud else logging.INFO,
                "alert %s %s %s (%s): %s",
                alert["status"],
                alert["severity"],
                alert["name"],
                alert["service"],
                alert["message"],
                extra={"alert_id": alert["id"], "alert_status": alert["status"]},
            )


class WebhookSink:
    """The payload as JSON, signed: `X-Bulwark-Signature: sha256=<HMAC-SHA256(body)>`."""

    stream: ClassVar[bool] = False

    def __init__(self, url: str, secret: str, *, timeout: float = 5.0) -> None:
        self.url, self._secret, self.timeout = url, secret, timeout

    def send(self, payload: Payload) -> None:
        post_json(self.url, dict(payload), timeout=self.timeout, secret=self._secret)

    def __repr__(self) -> str:
        return f"WebhookSink({_safe(self.url)!r})"


class SlackSink:
    """A Slack-compatible incoming webhook: `{"text": ..., "blocks": [...]}`."""

    stream: ClassVar[bool] = False

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self.url, self.timeout = url, timeout

    def send(self, payload: Payload) -> None:
        text = summary(payload)
        body = {
            "text": text + "\n" + "\n".join(lines(payload)),
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": text[:150]}},
                *(
                    {"type": "section", "text": {"type": "mrkdwn", "text": line}}
                    for line in lines(payload)
                ),
            ],
        }
        post_json(self.url, body, timeout=self.timeout)

    def __repr__(self) -> str:
        return f"SlackSink({_safe(self.url)!r})"


class AlertmanagerSink:
    """Prometheus Alertmanager API v2: POST /api/v2/alerts on every evaluation.

    Alertmanager expects a stream (as from Prometheus): firing alerts carry an
    `endsAt` a few evaluations ahead, so it resolves them itself if Bulwark
    stops sending; resolved alerts carry their real end time.
    """

    stream: ClassVar[bool] = True

    def __init__(self, url: str, *, timeout: float = 5.0, resend_margin: float = 60.0) -> None:
        self.url = url.rstrip("/") + "/api/v2/alerts"
        self.timeout, self.resend_margin = timeout, resend_margin

    def send(self, payload: Payload) -> None:
        body = [self.convert(a) for a in payload["alerts"]]
        if body:
            post_json(self.url, body, timeout=self.timeout)

    def convert(self, alert: Mapping[str, Any]) -> dict[str, Any]:
        ends = alert["ends_at"] or iso(time.time() + self.resend_margin)
        return {
            "labels": dict(alert["labels"]),
            "annotations": {"summary": alert["message"], "bulwark_id": alert["id"]},
            "startsAt": alert["starts_at"],
            "endsAt": ends,
            "generatorURL": "bulwark://alerts",
        }


class EmailSink:
    """Email through SMTP (STARTTLS and login optional)."""

    stream: ClassVar[bool] = False

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sender: str,
        to: Sequence[str],
        starttls: bool = False,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.host, self.port, self.sender, self.to = host, port, sender, list(to)
        self.starttls, self.user, self._password, self.timeout = starttls, user, password, timeout

    def message(self, payload: Payload) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = "bulwark " + summary(payload)
        msg["From"] = self.sender
        msg["To"] = ", ".join(self.to)
        body = "\n".join(lines(payload))
        details = json.dumps(payload["alerts"], indent=2)
        msg.set_content(f"{body}\n\n{details}\n")
        return msg

    def send(self, payload: Payload) -> None:
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout) as smtp:
                if self.starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.user:
                    smtp.login(self.user, self._password or "")
                smtp.send_message(self.message(payload))
        except smtplib.SMTPAuthenticationError:
            raise SinkError("SMTP login refused", permanent=True) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SinkError(f"SMTP {self.host}:{self.port}: {type(exc).__name__}") from None

    def __repr__(self) -> str:
        return f"EmailSink({self.host}:{self.port} -> {self.to})"
