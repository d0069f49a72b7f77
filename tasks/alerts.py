"""Alert evaluation and dispatch, on the `alerts` queue (its own worker, never starved)."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from workers.app import app
from workers.resources import broker, policy_redis
from workers.settings import get_settings
from workers.telemetry.alerts.dispatch import deliver, evaluate
from workers.telemetry.alerts.sinks import SinkError

log = logging.getLogger("bulwark.alerts")

NOTIFY_MAX_RETRIES = 6


@app.task(name="bulwark.alerts.evaluate")
def evaluate_alerts() -> dict[str, Any]:
    """Run the rules over the fleet; queue one `notify` per sink and due notification."""
    settings = get_settings()
    result, out = evaluate(settings, policy_redis(), broker())
    for delivery in out:
        notify_alert.delay(delivery.sink, delivery.payload)
    # A group waiting out its group wait is due before the next beat tick: look again then.
    if (
        result.next_due is not None
        and result.next_due < settings.observability.alert_evaluate_interval
    ):
        evaluate_alerts.apply_async(countdown=result.next_due + 0.05)
    return {
        "firing": len(result.alerts),
        "resolved": len(result.resolved),
        "notifications": len(result.notifications),
        "deliveries": [d.sink for d in out],
    }


@app.task(name="bulwark.alerts.notify", bind=True, max_retries=NOTIFY_MAX_RETRIES)
def notify_alert(self: Task, sink: str, payload: dict[str, Any]) -> None:
    """Deliver one payload to one sink; on failure retry with a growing countdown."""
    try:
        deliver(get_settings(), sink, payload)
    except SinkError as exc:
        if exc.permanent or self.request.retries >= NOTIFY_MAX_RETRIES:
            log.error("alert notification to %s dropped: %s", sink, exc)
            return
        raise self.retry(countdown=min(60.0, 2.0 * 2**self.request.retries), exc=exc) from None
