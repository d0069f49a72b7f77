"""The autoscaler's inputs from a hand-made fleet snapshot: which policies a queue's tasks
use, the backlog, the breaker and the bulkhead's room, and the rates of the run-time totals."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from policies.bulkhead import BulkheadSnapshot
from tests.kit import breaker_snapshot
from workers.fleet import FleetSnapshot, QueueState
from workers.scaling.load import Meter, QueuePolicies, fleet_load, queue_policies

ROUTES = {"pay.charge": "pay", "pay.refund": "pay", "mail.send": "mail", "celery.ping": "pay"}


def task(name: str, breaker: str | None = None, bulkhead: str | None = None) -> object:
    return SimpleNamespace(name=name, breaker=breaker, bulkhead=bulkhead)


def bulkhead(name: str, limit: int, holders: tuple[str, ...] = ()) -> BulkheadSnapshot:
    in_use = len(holders)
    return BulkheadSnapshot(name=name, limit=limit, in_use=in_use, available=limit - in_use,
                            utilization=in_use / limit, holders=holders)  # fmt: skip


def test_queue_policies_of_the_routed_tasks_only() -> None:
    tasks = [
        task("pay.charge", "pay", "pay"),
        task("pay.refund", "pay", "pay"),
        task("mail.send", "mail"),
        task("celery.ping"),  # Celery's own: left out
    ]
    found = queue_policies(tasks, {"pay"}, ROUTES.get)
    assert found == QueuePolicies(frozenset({"pay"}), frozenset({"pay"}), True, True)
    mixed = queue_policies(tasks, {"pay", "mail"}, ROUTES.get)
    assert mixed.every_breaker and not mixed.every_bulkhead
    assert queue_policies(tasks, {"none"}, ROUTES.get) == QueuePolicies()


PAY = QueuePolicies(frozenset({"pay"}), frozenset({"pay"}), True, True)


def load(snapshot: FleetSnapshot, policies: QueuePolicies = PAY, **options: object) -> object:
    values: dict[str, object] = {
        "current": 2, "waiting_here": 0, "arrival_rate": 1.0, "run_time": 0.1, **options
    }  # fmt: skip
    return fleet_load(snapshot, {"pay"}, policies, **values)  # type: ignore[arg-type]


def test_backlog_is_ready_plus_scheduled_plus_reserved_here() -> None:
    snap = FleetSnapshot(taken_at=0.0, queues=(
        QueueState(name="pay", ready=7, unacked=5, scheduled=2),
        QueueState(name="mail", ready=100),
    ))  # fmt: skip
    assert load(snap, waiting_here=3).backlog == 12  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("state", "refused"),
    [("open", True), ("forced_open", True), ("half_open", False), ("closed", False)],
)
def test_breaker_counts_as_open_only_when_it_refuses(state: str, refused: bool) -> None:
    snap = FleetSnapshot(taken_at=0.0, breakers=(breaker_snapshot("pay", state),))
    assert load(snap).breaker_open is refused  # type: ignore[attr-defined]
    unguarded = QueuePolicies(frozenset({"pay"}), frozenset(), False, False)
    assert load(snap, unguarded).breaker_open is False  # type: ignore[attr-defined]


def test_bulkhead_room_is_free_permits_plus_own_holders() -> None:
    snap = FleetSnapshot(taken_at=0.0, bulkheads=(
        bulkhead("pay", 4, ("here:11:a", "here:12:b", "there:11:c")),
    ))  # fmt: skip
    mine = load(snap, own=lambda h: h.startswith("here:"))
    assert mine.bulkhead_room == 1 + 2  # type: ignore[attr-defined]
    never_acquired = load(FleetSnapshot(taken_at=0.0), limits={"pay": 4})
    assert never_acquired.bulkhead_room == 4  # type: ignore[attr-defined]
    unknown = load(FleetSnapshot(taken_at=0.0))
    assert unknown.bulkhead_room is None  # type: ignore[attr-defined]


def test_meter_rates_from_run_time_totals() -> None:
    meter = Meter()
    assert meter.rates(10.0, 100, 50, now=0.0) == (0.0, None)  # the baseline
    arrival, run_time = meter.rates(13.0, 130, 40, now=2.0)
    assert arrival == pytest.approx((30 - 10) / 2) and run_time == pytest.approx(0.1)
    assert meter.rates(13.0, 130, 40, now=3.0) == (0.0, pytest.approx(0.1))  # kept
    assert meter.rates(0.0, 0, 40, now=4.0) == (0.0, pytest.approx(0.1))  # totals reset
