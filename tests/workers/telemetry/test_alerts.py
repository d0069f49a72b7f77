"""Alerting logic without receivers: model, plan, rules, the Redis store on fakeredis, CLI."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from datetime import datetime
from typing import Any, ClassVar

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kit import breaker_snapshot
from workers.fleet import FleetSnapshot, HealthResult, QueueState
from workers.ops import alerts as ops_alerts
from workers.ops import cli as ops_cli
from workers.ops.alerts import duration, matcher
from workers.ops.cli import main
from workers.telemetry.alerts.model import Alert, Condition, Silence, fingerprint, iso
from workers.telemetry.alerts.plan import AlertConfig, plan
from workers.telemetry.alerts.rules import (
    BreakerOpen,
    DeadLetterGrowth,
    HealthStale,
    HealthUnhealthy,
    Observation,
    QueueBacklog,
    Watchdog,
    run_rules,
)
from workers.telemetry.alerts.sinks import AlertmanagerSink, EmailSink, sign, verify
from workers.telemetry.alerts.store import AlertStore

CFG = AlertConfig(group_by=("service",), group_wait=5.0, repeat_interval=100.0)


def cond(name: str = "BreakerOpen", service: str = "payments", **kw: object) -> Condition:
    base: dict[str, object] = {"severity": "warning", "message": f"{name} {service}"}
    return Condition(name=name, service=service, **{**base, **kw})  # type: ignore[arg-type]


class TestModel:
    """Fingerprints are stable over label order; silences match on all labels."""

    def test_fingerprint_ignores_label_order_and_message(self) -> None:
        a = Condition(name="X", service="s", severity="info", message="1", labels={"a": 1, "b": 2})
        b = Condition(
            name="X", service="s", severity="critical", message="2", labels={"b": 2, "a": 1}
        )
        assert a.fingerprint == b.fingerprint == fingerprint("X", "s", {"a": "1", "b": "2"})
        assert a.fingerprint != cond("X", "t").fingerprint

    def test_bad_severity_is_refused(self) -> None:
        with pytest.raises(ValueError, match="severity"):
            cond(severity="loud")

    def test_alert_round_trips_and_renders_utc(self) -> None:
        alert = Alert.start(cond(labels={"breaker": "payments"}), 0.0)
        assert Alert.from_json(alert.to_json()) == alert
        data = alert.to_dict()
        assert data["starts_at"] == "1970-01-01T00:00:00.000Z"
        assert data["labels"] == {
            "breaker": "payments",
            "alertname": "BreakerOpen",
            "service": "payments",
            "severity": "warning",
        }
        assert iso(None) is None

    def test_silence_matches_every_matcher_and_expires(self) -> None:
        alert = Alert.start(cond(), 0.0)
        s = Silence(
            matchers={"service": "payments", "severity": "warning"}, starts_at=0, ends_at=10
        )
        assert s.matches(alert) and s.active(5) and not s.active(10)
        assert not Silence(matchers={"service": "other"}, starts_at=0, ends_at=1).matches(alert)
        with pytest.raises(ValueError):
            Silence(matchers={}, starts_at=0, ends_at=1)


def run(stored: dict[str, Alert], conditions: list[Condition], now: float, silences=()):  # type: ignore[no-untyped-def]
    result = plan(stored, conditions, silences, now, CFG)
    return dict(result.alerts), result


class TestPlan:
    """Dedup, group wait, repeat interval, resolved notifications and silences."""

    def test_new_alert_waits_for_its_group_then_goes_once(self) -> None:
        state, p = run({}, [cond()], 0.0)
        assert p.notifications == () and p.next_due == pytest.approx(5.0)
        state, p = run(state, [cond(), cond("Other")], 3.0)
        assert p.notifications == ()
        state, p = run(state, [cond(), cond("Other")], 5.0)
        (note,) = p.notifications
        assert note.group == {"service": "payments"}
        assert [a.name for a in note.alerts] == ["BreakerOpen", "Other"], "grouped, one message"
        state, p = run(state, [cond(), cond("Other")], 50.0)
        assert p.notifications == (), "deduplicated within the repeat interval"
        state, p = run(state, [cond(), cond("Other")], 105.0)
        assert len(p.notifications[0].alerts) == 2, "repeated after the interval"

    def test_groups_are_separate_notifications(self) -> None:
        state, _ = run({}, [cond(service="a"), cond(service="b")], 0.0)
        _, p = run(state, [cond(service="a"), cond(service="b")], 5.0)
        assert [n.group["service"] for n in p.notifications] == ["a", "b"]

    def test_resolved_is_sent_once_then_forgotten(self) -> None:
        state, _ = run({}, [cond()], 0.0)
        state, _ = run(state, [cond()], 5.0)
        state, p = run(state, [], 6.0)
        (note,) = p.notifications
        assert note.status == "resolved" and note.alerts[0].ends_at == 6.0
        assert state == {} and p.removed == {cond().fingerprint}
        _, p = run(state, [], 7.0)
        assert p.notifications == ()

    def test_never_sent_alert_resolves_quietly(self) -> None:
        state, _ = run({}, [cond()], 0.0)
        _, p = run(state, [], 1.0)
        assert p.notifications == () and p.resolved[0].status == "resolved"

    def test_severity_change_is_sent_at_once(self) -> None:
        state, _ = run({}, [cond()], 0.0)
        state, _ = run(state, [cond()], 5.0)
        _, p = run(state, [cond(severity="critical")], 6.0)
        assert p.notifications[0].alerts[0].severity == "critical"

    def test_silenced_alert_is_kept_but_not_sent_until_the_silence_ends(self) -> None:
        mute = Silence(matchers={"service": "payments"}, starts_at=0, ends_at=20)
        state, p = run({}, [cond()], 0.0, [mute])
        state, p = run(state, [cond()], 10.0, [mute])
        assert p.notifications == () and p.unsilenced == () and len(state) == 1
        _, p = run(state, [cond()], 20.0, [mute])
        assert len(p.notifications) == 1

    def test_own_repeat_interval_wins(self) -> None:
        dog = cond("Watchdog", "bulwark", severity="info", repeat_interval=10.0)
        state, _ = run({}, [dog], 0.0)
        state, p = run(state, [dog], 5.0)
        assert len(p.notifications) == 1
        state, p = run(state, [dog], 14.0)
        assert p.notifications == ()
        _, p = run(state, [dog], 15.0)
        assert len(p.notifications) == 1

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.booleans(), st.floats(0.5, 60.0)), min_size=1, max_size=30))
    def test_at_most_once_per_repeat_interval_and_every_sent_alert_resolves(
        self, steps: list[tuple[bool, float]]
    ) -> None:
        """Model: sends of one alert are >= repeat_interval apart; a sent one resolves once."""
        state: dict[str, Alert] = {}
        now, last_firing_send, fired_unresolved, resolved_sends = 0.0, None, False, 0
        for firing, dt in steps:
            now += dt
            state, p = run(state, [cond()] if firing else [], now)
            for note in p.notifications:
                alert = note.alerts[0]
                if alert.status == "firing":
                    if last_firing_send is not None:
                        assert now - last_firing_send >= CFG.repeat_interval
                    last_firing_send, fired_unresolved = now, True
                else:
                    assert fired_unresolved
                    resolved_sends += 1
                    fired_unresolved, last_firing_send = False, None
            if not firing:
                assert not fired_unresolved
                assert state == {}


def result(check: str, status: str, message: str = "") -> HealthResult:
    return HealthResult(
        check=check, status=status, message=message, latency_seconds=0.0, checked_at=990.0
    )  # type: ignore[arg-type]


FLEET = FleetSnapshot(
    taken_at=1000.0,
    health={
        "broker": result("broker", "degraded"),
        "redis": result("redis", "unhealthy", "refused"),
    },
    health_last_run=990.0,
    breakers=(
        breaker_snapshot("payments", "open"),
        breaker_snapshot("inventory", "closed"),
        breaker_snapshot("mail", "forced_open"),
    ),
    queues=(
        QueueState(name="payments", ready=5000),
        QueueState(name="default", ready=3),
        QueueState(name="deadletter", ready=9000),
    ),
    deadletters_total=12,
)
SNAP = Observation(fleet=FLEET, deadletters_grew_at=900.0, deadletters_grew_by=2)


class TestRules:
    """Each rule turns a hand-made snapshot into the conditions it should."""

    def test_unhealthy_check_is_critical(self) -> None:
        (c,) = HealthUnhealthy()(SNAP)
        assert (c.name, c.service, c.severity, c.labels) == (
            "HealthCheckUnhealthy",
            "redis",
            "critical",
            {"check": "redis"},
        )
        assert "refused" in c.message

    def test_open_breakers_warn(self) -> None:
        found = list(BreakerOpen()(SNAP))
        assert [(c.service, c.severity) for c in found] == [
            ("payments", "warning"),
            ("mail", "warning"),
        ]

    def test_backlog_over_threshold_warns(self) -> None:
        assert [c.service for c in QueueBacklog(threshold=1000)(SNAP)] == ["payments"]
        assert list(QueueBacklog(threshold=5000)(SNAP)) == []

    def test_deadletter_growth_warns_within_its_window(self) -> None:
        (c,) = DeadLetterGrowth(window=300)(SNAP)
        assert "2 new dead letter" in c.message
        assert list(DeadLetterGrowth(window=50)(SNAP)) == []
        quiet = Observation(fleet=FLEET)
        assert list(DeadLetterGrowth(window=300)(quiet)) == []

    def test_stale_health_and_watchdog(self) -> None:
        assert list(HealthStale(max_age=90)(SNAP)) == []
        assert [c.name for c in HealthStale(max_age=5)(SNAP)] == ["HealthChecksStale"]
        (dog,) = Watchdog(every=60)(Observation(fleet=FleetSnapshot(taken_at=0.0)))
        assert dog.repeat_interval == 60 and dog.name == "Watchdog"

    def test_a_crashing_rule_is_skipped(self) -> None:
        def broken(obs: Observation) -> list[Condition]:
            raise RuntimeError("boom")

        assert [c.name for c in run_rules([broken, Watchdog(every=1)], SNAP)] == ["Watchdog"]


class TestStore:
    """The Redis store applies plans, keeps silences and the dead-letter watermark."""

    def test_reconcile_dedups_across_calls(self, fake_redis: fakeredis.FakeRedis) -> None:
        store = AlertStore(fake_redis)
        cfg = AlertConfig(group_wait=0.0, repeat_interval=3600.0)
        first = store.reconcile([cond()], cfg)
        second = store.reconcile([cond()], cfg)
        assert len(first.notifications) == 1 and second.notifications == ()
        (alert,) = store.alerts()
        assert alert.sent_at is not None and alert.updated_at >= alert.starts_at
        third = store.reconcile([], cfg)
        assert third.notifications[0].status == "resolved" and store.alerts() == []

    def test_silences_add_list_remove_and_mute(self, fake_redis: fakeredis.FakeRedis) -> None:
        store = AlertStore(fake_redis)
        silence = store.add_silence({"service": "payments"}, 3600, comment="deploy", by="ops")
        assert [s.id for s in store.silences()] == [silence.id]
        result = store.reconcile([cond()], AlertConfig(group_wait=0.0))
        assert result.notifications == ()
        assert store.silenced(store.alerts()[0])
        assert store.remove_silence(silence.id) and not store.remove_silence(silence.id)
        assert len(store.reconcile([cond()], AlertConfig(group_wait=0.0)).notifications) == 1

    def test_deadletter_watermark(self, fake_redis: fakeredis.FakeRedis) -> None:
        store = AlertStore(fake_redis)
        assert store.observe_deadletters(5).at is None, "existing dead letters do not alert"
        assert store.observe_deadletters(5).at is None
        grew = store.observe_deadletters(8)
        assert grew.at is not None and grew.by == 3
        assert store.observe_deadletters(8) == grew, "the last growth is remembered"


class TestSinkPieces:
    """Signature, Alertmanager conversion and email rendering (no network)."""

    PAYLOAD: ClassVar[dict[str, Any]] = {
        "status": "firing",
        "group": {"service": "payments"},
        "alerts": [Alert.start(cond(), 0.0).to_dict()],
    }

    def test_signature_verifies_only_with_the_secret_and_body(self) -> None:
        header = sign(b"{}", "s3cret")
        assert verify(b"{}", "s3cret", header)
        assert not verify(b"{} ", "s3cret", header) and not verify(b"{}", "other", header)
        assert not verify(b"{}", "s3cret", None)

    def test_alertmanager_firing_alert_ends_ahead(self) -> None:
        sink = AlertmanagerSink("http://am:9093/", resend_margin=120.0)
        before = time.time()
        converted = sink.convert(self.PAYLOAD["alerts"][0])
        after = time.time()
        assert converted["labels"]["alertname"] == "BreakerOpen"
        assert converted["startsAt"] == "1970-01-01T00:00:00.000Z"
        ends = datetime.fromisoformat(converted["endsAt"].replace("Z", "+00:00")).timestamp()
        # A firing alert ends one resend margin ahead, so Alertmanager keeps it until re-sent.
        assert before + 120.0 - 0.001 <= ends <= after + 120.0 + 0.001

    def test_email_subject_and_no_password_in_repr(self) -> None:
        sink = EmailSink("mx", 25, sender="a@x", to=["b@x"], user="u", password="pw-secret")
        msg = sink.message(self.PAYLOAD)
        assert msg["Subject"] == "bulwark [FIRING:1] service=payments"
        assert "pw-secret" not in repr(sink) and "pw-secret" not in msg.as_string()


class TestCli:
    """Durations and matchers parse; the commands round-trip a silence through Redis."""

    def test_parsers(self) -> None:
        assert duration("1h") == 3600 and duration("90") == 90 and duration("15m") == 900
        assert matcher("service=payments") == ("service", "payments")
        for bad in ("", "0s", "1w", "-1"):
            with pytest.raises(argparse.ArgumentTypeError):
                duration(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            matcher("service")

    def test_silence_commands(
        self, fake_redis: fakeredis.FakeRedis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(ops_alerts, "policy_redis", lambda: fake_redis)
        monkeypatch.setattr(ops_cli, "_reachable", lambda: None)  # the store is fakeredis

        def cli(*args: str) -> tuple[int, str]:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(list(args))
            return code, out.getvalue()

        code, out = cli(
            "alerts", "silence", "--match", "service=payments", "--for", "1h", "--comment", "x"
        )
        assert code == 0 and out.startswith("silence ")
        silence_id = out.split()[1]
        code, out = cli("alerts", "silences", "--json")
        assert json.loads(out)[0]["matchers"] == {"service": "payments"}
        AlertStore(fake_redis).reconcile([cond()], AlertConfig())
        code, out = cli("alerts", "list")
        assert "BreakerOpen" in out and "(silenced)" in out
        assert cli("alerts", "unsilence", silence_id)[0] == 0
        assert cli("alerts", "unsilence", silence_id)[0] == 1
        assert "no active silences" in cli("alerts", "silences")[1]
