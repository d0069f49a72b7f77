"""End to end: a real worker on the `alerts` queue turns a failing health result into a
signed webhook notification, deduplicates it, and sends the resolution."""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import pytest
import redis

from policies import keys
from tasks.alerts import notify_alert
from tests.kit import poll
from tests.workers.telemetry.test_alerts_sinks import SECRET, Receiver
from workers.client import client
from workers.settings import get_settings
from workers.telemetry.alerts.dispatch import evaluate
from workers.telemetry.alerts.sinks import SIGNATURE_HEADER, verify

pytestmark = pytest.mark.integration

RESULTS = keys.key("health", "fleet", "results")


def write_health(r: redis.Redis, status: str) -> None:
    result = {
        "check": "redis",
        "status": status,
        "message": "connection refused" if status == "unhealthy" else "PONG",
        "latency_seconds": 0.001,
        "checked_at": time.time(),
    }
    r.hset(RESULTS, "redis", json.dumps(result))
    r.set(keys.key("health", "fleet", "last_run"), repr(time.time()))


def redis_alerts(rec: Receiver) -> list[tuple[str, str]]:
    """(status, severity) of every notification about the `redis` check, in arrival order."""
    return [
        (a["status"], a["severity"])
        for p in rec.payloads()
        for a in p["alerts"]
        if a["name"] == "HealthCheckUnhealthy" and a["labels"]["check"] == "redis"
    ]


class TestAlertPipeline:
    """Failing check -> critical alert at the webhook, once; healthy again -> resolved."""

    def test_fires_dedups_and_resolves(self, r: redis.Redis, start_worker: Any) -> None:
        with Receiver() as rec:
            worker = start_worker(
                ["alerts"],
                name="alerts",
                concurrency=1,
                env={
                    "BULWARK_ALERT_WEBHOOK_URL": rec.url,
                    "BULWARK_ALERT_WEBHOOK_SECRET": SECRET,
                    # The group waits 1 s: the evaluation re-runs itself by countdown.
                    "BULWARK_ALERT_GROUP_WAIT": "1",
                },
            )
            app = client()

            def evaluate() -> dict[str, Any]:
                return dict(app.send_task("bulwark.alerts.evaluate").get(timeout=30))

            write_health(r, "unhealthy")
            evaluate()
            poll(lambda: redis_alerts(rec), deadline=30, what="the critical alert at the webhook")
            assert redis_alerts(rec) == [("firing", "critical")]
            for req in rec.requests:
                assert verify(req["body"], SECRET, req["headers"][SIGNATURE_HEADER])

            # Within the repeat interval, evaluating again sends nothing new.
            for _ in range(2):
                again = evaluate()
                assert again["firing"] >= 1 and again["deliveries"] == []
            assert redis_alerts(rec) == [("firing", "critical")]

            write_health(r, "healthy")
            assert evaluate()["resolved"] == 1
            poll(lambda: len(redis_alerts(rec)) == 2, deadline=30, what="the resolved notice")
            assert redis_alerts(rec) == [("firing", "critical"), ("resolved", "critical")]
            # The dead-man's switch went out too.
            names = {a["name"] for p in rec.payloads() for a in p["alerts"]}
            assert "Watchdog" in names
            log = worker.log.read_text()
            assert "HealthCheckUnhealthy" in log, "the log sink logged the alert"
            assert SECRET not in log


class TestNotifyRetry:
    """A webhook down for longer than the sink's own retries is retried by Celery countdown."""

    def test_delivered_after_celery_retry(self, r: redis.Redis, start_worker: Any) -> None:
        with Receiver() as rec:
            # The sink's three tenacity attempts at the health alert all fail.
            rec.fail_next, rec.fail_only = [503] * 3, b"HealthCheckUnhealthy"
            start_worker(
                ["alerts"],
                name="alerts",
                concurrency=1,
                env={
                    "BULWARK_ALERT_WEBHOOK_URL": rec.url,
                    "BULWARK_ALERT_WEBHOOK_SECRET": SECRET,
                    "BULWARK_ALERT_GROUP_WAIT": "0",
                },
            )
            write_health(r, "unhealthy")
            out = client().send_task("bulwark.alerts.evaluate").get(timeout=30)
            assert "webhook" in out["deliveries"]
            poll(lambda: redis_alerts(rec), deadline=30, what="delivery after the Celery retry")
            tries = [q["status"] for q in rec.requests if b"HealthCheckUnhealthy" in q["body"]]
            assert tries == [503, 503, 503, 200], "three refused attempts, then the Celery retry"
            assert redis_alerts(rec) == [("firing", "critical")]


class TestNoSecretInTasks:
    """Alert notifications name their sink; URLs and secrets stay in the worker's settings."""

    def test_notify_messages_carry_no_secret(
        self, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        secrets = {
            "BULWARK_ALERT_WEBHOOK_URL": "http://hookuser:urlpass@127.0.0.1:1/hook",
            "BULWARK_ALERT_WEBHOOK_SECRET": "hmacsecret",
            "BULWARK_ALERT_SLACK_URL": "https://hooks.example.test/services/T0/B0/slacktoken",
            "BULWARK_ALERT_SMTP_HOST": "127.0.0.1",
            "BULWARK_ALERT_SMTP_USER": "mailer",
            "BULWARK_ALERT_SMTP_PASSWORD": "smtppass",
            "BULWARK_ALERT_EMAIL_TO": "ops@example.test",
            "BULWARK_ALERT_GROUP_WAIT": "0",
        }
        for name, value in secrets.items():
            monkeypatch.setenv(name, value)
        get_settings.cache_clear()
        settings = get_settings()
        _plan, out = evaluate(settings, r, r)
        assert {d.sink for d in out} >= {"webhook", "slack", "email"}
        # What `bulwark.alerts.evaluate` sends each time: notify(sink name, payload).
        sent = json.dumps([[d.sink, d.payload] for d in out])
        for needle in ("urlpass", "hmacsecret", "slacktoken", "smtppass", "hookuser"):
            assert needle not in sent, needle
        names = {d.sink for d in out}
        assert list(inspect.signature(notify_alert.run).parameters) == ["sink", "payload"]
        assert names >= {"webhook", "slack", "email"}
