"""One evaluation (snapshot -> rules -> plan) and the delivery of one payload to one sink."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from workers.amqp import AmqpBroker
from workers.fleet import FleetSnapshot, read_fleet
from workers.settings import Settings
from workers.telemetry.alerts.plan import AlertConfig, Plan
from workers.telemetry.alerts.rules import (
    BreakerOpen,
    DeadLetterGrowth,
    HealthStale,
    HealthUnhealthy,
    Observation,
    ProcessCrashLoop,
    QueueBacklog,
    Rule,
    SecurityRefusals,
    Watchdog,
    run_rules,
)
from workers.telemetry.alerts.sinks import (
    AlertmanagerSink,
    EmailSink,
    LogSink,
    Payload,
    Sink,
    SlackSink,
    WebhookSink,
)
from workers.telemetry.alerts.store import AlertStore
from workers.telemetry.metrics import alert_sent

log = logging.getLogger("bulwark.alerts")


def alert_config(settings: Settings) -> AlertConfig:
    o = settings.observability
    return AlertConfig(
        group_by=o.alert_group_by,
        group_wait=o.alert_group_wait,
        repeat_interval=o.alert_repeat_interval,
    )


def default_rules(settings: Settings) -> tuple[Rule, ...]:
    o = settings.observability
    return (
        HealthUnhealthy(),
        HealthStale(max_age=3 * o.health_check_interval),
        BreakerOpen(),
        ProcessCrashLoop(),
        QueueBacklog(threshold=o.alert_backlog_threshold),
        DeadLetterGrowth(window=o.alert_deadletter_window),
        SecurityRefusals(threshold=o.alert_security_refusals),
        Watchdog(every=o.alert_watchdog_interval),
    )


def build_sinks(settings: Settings) -> dict[str, Sink]:
    """The configured sinks by name (log, webhook, slack, alertmanager, email)."""
    o, sec = settings.observability, settings.security
    sinks: dict[str, Sink] = {}
    if o.alert_log:
        sinks["log"] = LogSink()
    if o.alert_webhook_url and sec.alert_webhook_secret:
        sinks["webhook"] = WebhookSink(
            o.alert_webhook_url, sec.alert_webhook_secret.reveal(), timeout=o.alert_sink_timeout
        )
    if o.alert_slack_url:
        sinks["slack"] = SlackSink(o.alert_slack_url, timeout=o.alert_sink_timeout)
    if o.alertmanager_url:
        sinks["alertmanager"] = AlertmanagerSink(
            o.alertmanager_url,
            timeout=o.alert_sink_timeout,
            resend_margin=max(60.0, 4 * o.alert_evaluate_interval),
        )
    if o.alert_smtp_host and o.alert_email_to:
        sinks["email"] = EmailSink(
            o.alert_smtp_host,
            o.alert_smtp_port,
            sender=o.alert_email_from,
            to=[a.strip() for a in o.alert_email_to.split(",") if a.strip()],
            starttls=o.alert_smtp_starttls,
            user=o.alert_smtp_user,
            password=sec.alert_smtp_password.reveal() if sec.alert_smtp_password else None,
            timeout=o.alert_sink_timeout,
        )
    return sinks


@dataclass(frozen=True, slots=True)
class Delivery:
    sink: str
    payload: dict[str, Any]


def deliveries(result: Plan, sinks: dict[str, Sink]) -> list[Delivery]:
    """Group notifications for ordinary sinks; every unsilenced alert for stream sinks."""
    out: list[Delivery] = []
    for name, sink in sinks.items():
        if sink.stream:
            if result.unsilenced:
                alerts = [a.to_dict() for a in result.unsilenced]
                out.append(Delivery(name, {"status": "stream", "group": {}, "alerts": alerts}))
        else:
            out.extend(Delivery(name, n.to_dict()) for n in result.notifications)
    return out


def observe(store: AlertStore, snapshot: FleetSnapshot) -> Observation:
    """The rules' input: the snapshot, and when the dead-letter total last grew."""
    growth = store.observe_deadletters(snapshot.deadletters_total)
    return Observation(fleet=snapshot, deadletters_grew_at=growth.at, deadletters_grew_by=growth.by)


def evaluate(
    settings: Settings,
    client: redis.Redis,
    broker: redis.Redis | AmqpBroker,
    rules: tuple[Rule, ...] | None = None,
) -> tuple[Plan, list[Delivery]]:
    """Snapshot the fleet, run the rules, update the alert state; return what to send."""
    snapshot = read_fleet(client, broker, settings.all_queues)
    if not snapshot.up:
        raise redis.ConnectionError(f"cannot evaluate alerts: {snapshot.error}")
    store = AlertStore(client)
    observation = observe(store, snapshot)
    conditions = run_rules(default_rules(settings) if rules is None else rules, observation)
    result = store.reconcile(conditions, alert_config(settings))
    return result, deliveries(result, build_sinks(settings))


def deliver(settings: Settings, sink_name: str, payload: Payload) -> None:
    """Send one payload through one configured sink; count what was sent."""
    sink = build_sinks(settings).get(sink_name)
    if sink is None:
        log.warning("alert sink %s is not configured here; notification dropped", sink_name)
        return
    sink.send(payload)
    try:
        for alert in payload["alerts"]:
            alert_sent(sink_name, alert["severity"])
    except Exception:  # a metric must never turn a delivered alert into a retried one
        log.exception("alert_sent metric failed")
