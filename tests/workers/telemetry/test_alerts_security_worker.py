"""End to end: a burst of forged messages at a real worker raises `SecurityRefusals` through
the beat's alert evaluation, at a real webhook, within a minute; the alert names the kinds
and their counts and nothing of the messages."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from policies import keys
from tests.conftest import StartWorker
from tests.kit import poll
from tests.signing import sign_envelope
from tests.workers.telemetry.test_alerts_sinks import SECRET, Receiver
from tests.workers.telemetry.test_metrics_worker import sample, scrape
from tests.workers.test_security import QUEUE, Envelope, fresh, push, ran, tampered_arg
from workers.client import client
from workers.security.refusals import REFUSALS_KEY
from workers.settings import get_settings
from workers.telemetry.alerts.dispatch import deliver, evaluate
from workers.telemetry.alerts.sinks import SIGNATURE_HEADER, verify
from workers.telemetry.http import wait_address

pytestmark = pytest.mark.integration

TOKENS = keys.key("diagnostics", "ping", "tokens")
#: Over the default threshold (10) of the rule, in two kinds.
UNSIGNED, TAMPERED = 7, 6


@pytest.fixture
def template(r: redis.Redis) -> Envelope:
    """A real message as `client()` signs it, taken from a queue no worker here reads."""
    client().send_task("bulwark.ping", args=["template"], queue="payments")
    raw = r.rpop("payments")
    assert isinstance(raw, bytes)
    found: Envelope = json.loads(raw)
    return found


def counted(r: redis.Redis) -> int:
    return sum(int(n) for n in r.hvals(REFUSALS_KEY))


def security_alerts(rec: Receiver) -> list[dict[str, Any]]:
    return [a for p in rec.payloads() for a in p["alerts"] if a["name"] == "SecurityRefusals"]


class TestSecurityBurstAlert:
    """Forged burst -> refused, counted, and a critical alert at the webhook within 60 s."""

    def test_burst_fires_within_a_minute(
        self,
        r: redis.Redis,
        start_worker: StartWorker,
        template: Envelope,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Any,
    ) -> None:
        worker = start_worker(
            [QUEUE], name="guarded", env={"BULWARK_METRICS_DIR": str(tmp_path / "metrics")}
        )
        # The good path counts nothing.
        push(r, sign_envelope(fresh(template, "good-before"), QUEUE))
        poll(lambda: "good-before" in ran(r), deadline=30, what="a good message")
        assert not r.exists(REFUSALS_KEY)

        with Receiver() as rec:
            for name, value in {
                "BULWARK_ALERT_WEBHOOK_URL": rec.url,
                "BULWARK_ALERT_WEBHOOK_SECRET": SECRET,
                "BULWARK_ALERT_GROUP_WAIT": "0",
            }.items():
                monkeypatch.setenv(name, value)
            get_settings.cache_clear()
            settings = get_settings()

            burst = [fresh(template, f"secret-unsigned-{i}") for i in range(UNSIGNED)]
            burst += [
                tampered_arg(sign_envelope(fresh(template, f"secret-tampered-{i}"), QUEUE))
                for i in range(TAMPERED)
            ]
            for message in burst:
                push(r, message)
            burst_at = time.monotonic()
            # Every refusal counted fleet-wide (else the first notification could hold part).
            poll(
                lambda: counted(r) == UNSIGNED + TAMPERED,
                deadline=30,
                what="the burst counted",
            )

            def beat_tick() -> list[dict[str, Any]]:
                """What `bulwark.alerts.evaluate` and `bulwark.alerts.notify` do, once."""
                _plan, out = evaluate(settings, r, r)
                for delivery in out:
                    deliver(settings, delivery.sink, delivery.payload)
                return security_alerts(rec)

            # One evaluation a second, as beat's every `alert_evaluate_interval` (10 s).
            (alert,) = poll(beat_tick, deadline=50, every=1.0, what="the security alert")
            assert time.monotonic() - burst_at < 60

        assert (alert["status"], alert["severity"], alert["service"]) == (
            "firing",
            "critical",
            "security",
        )
        assert alert["message"].startswith(
            f"{UNSIGNED + TAMPERED} task messages refused by verification in the last 60 s "
            f"(over 10): unsigned {UNSIGNED}, signature {TAMPERED}; "
        )
        for req in rec.requests:
            assert verify(req["body"], SECRET, req["headers"][SIGNATURE_HEADER])
        # Nothing of the messages: no argument, task id or body in any notification.
        sent = b"".join(req["body"] for req in rec.requests).decode()
        assert "secret-" not in sent
        for message in burst:
            assert message["headers"]["id"] not in sent
            assert message["body"] not in sent
        assert ran(r) == ["good-before"], "nothing forged ran"

        # The worker's own counter, by kind.
        url = wait_address(r, worker.hostname)["url"]
        samples = scrape(url)
        assert sample(samples, "bulwark_security_refusals_total", kind="unsigned") == UNSIGNED
        assert sample(samples, "bulwark_security_refusals_total", kind="signature") == TAMPERED
