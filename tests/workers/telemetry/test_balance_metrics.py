"""Worker utilisation and balance efficiency from two fleet snapshots (pure: no Redis)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.balanced_app import REPORTS
from workers.fleet import FleetSnapshot, QueueState, WorkerState
from workers.telemetry.fleet_metrics import Utilisation


def snapshot(at: float, busy: dict[str, float], backlog: tuple[int, int] = (0, 0),
             processes: int = 2) -> FleetSnapshot:  # fmt: skip
    workers = tuple(
        WorkerState(
            hostname=f"w{i}",
            pid=1,
            queues=(queue,),
            at=at,
            runtime=(busy[queue], 0),
            processes=processes,
        )
        for i, queue in enumerate(REPORTS)
    )
    queues = tuple(QueueState(name=q, ready=n) for q, n in zip(REPORTS, backlog, strict=True))
    return FleetSnapshot(taken_at=at, workers=workers, queues=queues)


def gauges(tracker: Utilisation, snap: FleetSnapshot) -> dict[tuple[str, str], float]:
    class Families:
        def collect(self):  # type: ignore[no-untyped-def]
            yield from tracker.families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    return {
        (s.name, next(iter(s.labels.values()), "")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def test_utilisation_and_efficiency_between_two_heartbeats() -> None:
    tracker = Utilisation()
    tracker.update(snapshot(10.0, {"reports.0": 0.0, "reports.1": 0.0}))
    later = snapshot(20.0, {"reports.0": 16.0, "reports.1": 8.0}, backlog=(3, 1))
    tracker.update(later)  # 16 busy seconds of 2 processes x 10 s: 80 %; the other 40 %
    assert tracker.of == {"w0": 0.8, "w1": 0.4}
    found = gauges(tracker, later)
    assert found[("bulwark_worker_utilization", "w0")] == 0.8
    assert found[("bulwark_balance_efficiency", "reports.render")] == 0.5
    assert found[("bulwark_balance_backlog_spread", "reports.render")] == 0.5  # stdev 1, mean 2


def test_a_restarted_worker_or_the_same_heartbeat_counts_nothing_new() -> None:
    tracker = Utilisation()
    tracker.update(snapshot(10.0, {"reports.0": 5.0, "reports.1": 5.0}))
    tracker.update(snapshot(10.0, {"reports.0": 9.0, "reports.1": 9.0}))  # same heartbeat
    assert tracker.of == {}
    tracker.update(snapshot(20.0, {"reports.0": 1.0, "reports.1": 10.0}))  # w0 restarted
    assert tracker.of == {"w1": 0.05}
