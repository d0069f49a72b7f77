"""Policy events and task signals as metrics; fleet snapshots as gauges; queue wait."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from policies import events
from policies.bulkhead import BulkheadSnapshot
from tests.kit import breaker_snapshot, service_state
from workers.fleet import FleetSnapshot, HealthResult, QueueState, WorkerState
from workers.telemetry import metrics as m
from workers.telemetry.fleet_metrics import FleetCollector, fleet_families


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> m.TaskMetrics:
    """A TaskMetrics of its own, in place of the process's."""
    own = m.TaskMetrics(CollectorRegistry())
    monkeypatch.setattr(m, "metrics", lambda: own)
    return own


def value(metrics: m.TaskMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def request(**fields: Any) -> SimpleNamespace:
    base = {"id": "t1", "delivery_info": {"routing_key": "payments"}, "headers": None, "eta": None}
    return SimpleNamespace(**{**base, **fields})


class TestEvents:
    """Each policy event moves its counter."""

    def test_breaker_bulkhead_degradation_and_outage_events(self, fresh: m.TaskMetrics) -> None:
        m.record_event(
            events.BreakerTransition(name="pay", from_state="closed", to_state="open", reason="x")
        )
        m.record_event(
            events.CallRejected(policy="breaker", name="pay", reason="open", retry_after=1)
        )
        m.record_event(
            events.CallRejected(policy="bulkhead", name="pay", reason="full", retry_after=1)
        )
        m.record_event(
            events.DegradationChanged(name="pay", from_level="full", to_level="minimal", reason="x")
        )
        m.record_event(
            events.StoreUnavailable(policy="breaker", name="pay", error="e", mode="local")
        )
        labels = {"breaker": "pay", "from_state": "closed", "to_state": "open"}
        assert value(fresh, "bulwark_breaker_transitions_total", **labels) == 1
        assert value(fresh, "bulwark_breaker_rejections_total", breaker="pay") == 1
        assert value(fresh, "bulwark_bulkhead_rejections_total", bulkhead="pay") == 1
        assert (
            value(fresh, "bulwark_degradation_changes_total", service="pay", to_level="minimal")
            == 1
        )
        assert value(fresh, "bulwark_store_outages_total", policy="breaker") == 1

    def test_a_deferral_is_counted_as_deferred_not_as_a_retry(self, fresh: m.TaskMetrics) -> None:
        task = SimpleNamespace(name="payments.charge", request=request())
        m._on_prerun(task_id="t1", task=task)
        m.record_event(
            events.TaskDeferred(policy="breaker", name="pay", task_name="payments.charge",
                                task_id="t1", countdown=1.0, deferrals=1, reason="open")
        )  # fmt: skip
        m._on_postrun(task_id="t1", task=task, state="RETRY")
        m._on_prerun(task_id="t2", task=task)
        m._on_postrun(task_id="t2", task=task, state="RETRY")
        queue = {"task": "payments.charge", "queue": "payments"}
        assert value(fresh, "bulwark_tasks_total", state="deferred", **queue) == 1
        assert value(fresh, "bulwark_tasks_total", state="retried", **queue) == 1
        assert value(fresh, "bulwark_tasks_total", state="started", **queue) == 2
        assert value(fresh, "bulwark_task_runtime_seconds_count", **queue) == 2

    def test_alert_sent(self, fresh: m.TaskMetrics) -> None:
        m.alert_sent("webhook", "critical")
        assert value(fresh, "bulwark_alerts_sent_total", sink="webhook", severity="critical") == 1


class TestQueueWait:
    """Queue wait is start minus the later of sent time and ETA; unknown without a sent time."""

    def test_sent_header_and_eta(self) -> None:
        assert m.queue_wait(request(headers={m.SENT_HEADER: 100.0}), 103.0) == 3.0
        assert m.queue_wait(request(), 103.0) is None
        eta = datetime.fromtimestamp(110.0, tz=UTC).isoformat()
        assert m.queue_wait(request(headers={m.SENT_HEADER: 100.0}, eta=eta), 112.5) == 2.5

    def test_publish_stamps_the_sent_time(self) -> None:
        headers: dict[str, Any] = {}
        before = time.time()
        m._on_publish(headers=headers)
        after = time.time()
        assert before <= headers[m.SENT_HEADER] <= after, "the wall-clock time of the send"


class TestFleetFamilies:
    """A fleet snapshot becomes gauges: one-hot breaker state, numeric levels and health."""

    def test_snapshot_to_samples(self) -> None:
        snapshot = FleetSnapshot(
            taken_at=100.0,
            queues=(QueueState(name="payments", ready=4, unacked=2, scheduled=1),),
            breakers=(breaker_snapshot("pay", "open"),),
            bulkheads=(
                BulkheadSnapshot(
                    name="pay", limit=10, in_use=3, available=7, utilization=0.3, holders=()
                ),
            ),
            services=(service_state("pay", "minimal"),),
            workers=(
                WorkerState(hostname="a@h", pid=1, queues=("payments",), at=99.0),
                WorkerState(hostname="b@h", pid=2, queues=("default",), at=99.0),
            ),
            deadletters_kept=5,
            deadletters_total=7,
            health={
                "redis": HealthResult(
                    check="redis",
                    status="degraded",
                    message="",
                    latency_seconds=0.01,
                    checked_at=99.0,
                )
            },
            health_last_run=99.0,
        )
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in fleet_families(snapshot)
            for s in family.samples
        }
        assert samples[("bulwark_fleet_up", ())] == 1
        assert samples[("bulwark_queue_depth", (("queue", "payments"),))] == 4
        assert samples[("bulwark_queue_unacked", (("queue", "payments"),))] == 2
        assert samples[("bulwark_queue_scheduled", (("queue", "payments"),))] == 1
        assert samples[("bulwark_breaker_state", (("breaker", "pay"), ("state", "open")))] == 1
        assert samples[("bulwark_breaker_state", (("breaker", "pay"), ("state", "closed")))] == 0
        assert samples[("bulwark_bulkhead_in_use", (("bulkhead", "pay"),))] == 3
        assert samples[("bulwark_bulkhead_limit", (("bulkhead", "pay"),))] == 10
        assert samples[("bulwark_degradation_level", (("service", "pay"),))] == 2
        assert samples[("bulwark_deadletters_kept", ())] == 5
        assert samples[("bulwark_deadletters_total", ())] == 7
        assert samples[("bulwark_health_status", (("check", "redis"),))] == 1
        assert samples[("bulwark_health_last_run_timestamp_seconds", ())] == 99.0
        assert samples[("bulwark_workers", ())] == 2

    def test_unreachable_redis_is_only_fleet_up_zero(self) -> None:
        families = list(fleet_families(FleetSnapshot.unreadable("down", 1.0)))
        assert [f.name for f in families] == ["bulwark_fleet_up"]
        assert families[0].samples[0].value == 0

    def test_the_collector_reads_at_most_once_per_interval(self) -> None:
        taken: list[float] = []

        def take() -> FleetSnapshot:
            taken.append(1.0)
            return FleetSnapshot(taken_at=float(len(taken)))

        collector = FleetCollector(take, interval=3600.0)
        assert collector.snapshot().taken_at == 1.0
        assert collector.snapshot().taken_at == 1.0 and len(taken) == 1
        collector.interval = 0.0
        assert collector.snapshot().taken_at == 2.0
