"""The worker groups read from a Procfile, the group meter, and stored decisions read back."""

from __future__ import annotations

import json

import fakeredis
import pytest

from tests.kit import ROOT
from workers.fleet import WorkerState
from workers.ops.supervisor import read_procfile
from workers.scaling.fleet import (
    DECISIONS_KEY,
    GroupDecision,
    GroupMeter,
    read_decisions,
    scaling_document,
    store,
)
from workers.scaling.groups import WorkerGroup, groups_from_procfile, parse_worker_command
from workers.settings import Settings, SettingsError


def test_the_procfile_has_a_group_per_pooled_worker() -> None:
    s = Settings.from_env({"BULWARK_FLEET_WORKERS": "1..3,worker_payments=1..1"}).scaling
    groups = groups_from_procfile(
        read_procfile(ROOT / "Procfile"),
        default_processes=s.worker_concurrency,
        bounds=s.fleet_workers.of(),
        default_bounds=s.fleet_workers.default,
    )
    by_name = {g.name: g for g in groups}
    assert set(by_name) == {"worker_payments", "worker_general", "worker_alerts"}
    assert by_name["worker_payments"] == WorkerGroup("worker_payments", ("payments",), 4, 1, 1)
    general = by_name["worker_general"]
    assert general.queues == ("default", "inventory", "notifications", "shipping.0", "shipping.1")
    assert general.processes == 6
    assert by_name["worker_alerts"].processes == 1  # --concurrency=1


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("celery -A workers.app worker -Q b,a --autoscale 3,1", (("a", "b"), 3)),
        ("celery -A workers.app worker --queues=a -c 5", (("a",), 5)),
        ("celery -A workers.app worker -Q a", (("a",), 2)),  # the default concurrency
        ("celery -A workers.app beat", None),
        ("python -m tasks.demo", None),
    ],
)
def test_worker_commands_are_read(command: str, expected: object) -> None:
    assert parse_worker_command(command, 2) == expected


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        ("celery worker -c 2", "without -Q"),
        ("celery worker -Q a --autoscale=x,1", "--autoscale 'x,1'"),
        ("celery worker -Q a -c 0", "0 processes"),
        ("celery worker -Q 'a", "cannot split"),
    ],
)
def test_a_bad_worker_command_is_named(command: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        groups_from_procfile(
            {"worker_x": command}, default_processes=2, bounds={}, default_bounds=(1, 3)
        )
    assert "worker_x" in str(refused.value)


def test_fleet_bounds_are_checked() -> None:
    bounds = Settings.from_env({"BULWARK_FLEET_WORKERS": "0..5,worker_a=2..2"}).scaling
    assert bounds.fleet_workers.default == (0, 5)
    assert bounds.fleet_workers.of() == {"worker_a": (2, 2)}
    assert str(bounds.fleet_workers) == "0..5,worker_a=2..2"
    for bad in ("3..1", "0..0", "x", "1..2,worker_a=1..2,worker_a=1..3", "W=1..2", "1" * 5000):
        with pytest.raises(SettingsError, match="BULWARK_FLEET_WORKERS"):
            Settings.from_env({"BULWARK_FLEET_WORKERS": bad})


def worker(name: str, seconds: float, tasks: int) -> WorkerState:
    return WorkerState(hostname=name, pid=1, queues=("a",), at=0.0, runtime=(seconds, tasks))


def test_the_group_meter_counts_each_worker_from_its_second_reading() -> None:
    meter = GroupMeter()
    assert meter.rates([worker("w1", 10.0, 100)], 0, 0.0) == (0.0, None)
    # w1 ran 20 more tasks in 4 s of run time; w2 is new: counted from its next reading.
    arrival, run_time = meter.rates([worker("w1", 14.0, 120), worker("w2", 50.0, 9)], 10, 10.0)
    assert run_time == pytest.approx(0.2) and arrival == pytest.approx(3.0)  # (20 + 10) / 10 s
    # w1 restarted (its totals went back): nothing counted for it; w2 ran 5 of 1 s.
    arrival, run_time = meter.rates([worker("w1", 0.5, 1), worker("w2", 55.0, 14)], 10, 20.0)
    assert run_time == pytest.approx(1.0) and arrival == pytest.approx(0.5)


def test_stored_decisions_read_back_and_bad_ones_are_left_out() -> None:
    client = fakeredis.FakeRedis()
    decision = GroupDecision(group="worker_a", queues=("a",), desired=3, current=1, ready=1,
                             min=1, max=4, processes=2, reason="busy", at=100.0,
                             history=((90.0, 3),))  # fmt: skip
    store(client, [decision])
    client.hset(DECISIONS_KEY, "worker_bad", "{not json")
    client.hset(DECISIONS_KEY, "worker_half", json.dumps({"group": "worker_half"}))
    found = read_decisions(client)
    assert found == {"worker_a": decision}
    shown = scaling_document(found)["groups"]["worker_a"]
    assert shown["desired"] == 3 and shown["queues"] == ["a"] and "history" not in shown
