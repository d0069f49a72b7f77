"""What `bulwark up` starts and retires on beat's decisions, and the extras' commands."""

from __future__ import annotations

import pytest

from workers.ops.scaling import Change, extra_command, plan_changes
from workers.scaling.fleet import GroupDecision


def decision(desired: int, at: float = 100.0) -> GroupDecision:
    return GroupDecision(group="worker_g", queues=("g",), desired=desired, current=1, ready=1,
                         min=1, max=5, processes=2, reason="r", at=at)  # fmt: skip


def plan(desired: int, running: set[int], retiring: set[int] | None = None,
         at: float = 100.0) -> list[Change]:  # fmt: skip
    return plan_changes({"worker_g": decision(desired, at)}, {"worker_g": running}, now=101.0,
                        stale_after=60.0, retiring={"worker_g": retiring or set()})  # fmt: skip


def test_extras_follow_the_desired_count() -> None:
    assert plan(3, set()) == [Change("start", "worker_g", 2), Change("start", "worker_g", 3)]
    assert plan(3, {2, 3}) == []
    assert plan(1, {2, 3}) == [Change("retire", "worker_g", 3), Change("retire", "worker_g", 2)]
    assert plan(0, {2}) == [Change("retire", "worker_g", 2)]  # the first worker always runs
    assert plan(3, {3}) == [Change("start", "worker_g", 2)]  # the lowest free index


def test_an_extra_still_retiring_keeps_its_index() -> None:
    assert plan(2, set(), retiring={2}) == [Change("start", "worker_g", 3)]


def test_a_stale_or_missing_decision_changes_nothing() -> None:
    assert plan(4, {2}, at=0.0) == []
    assert plan_changes({}, {"worker_g": {2}}, now=0.0, stale_after=60.0) == []


def test_an_extra_gets_its_own_hostname_and_a_free_port() -> None:
    command = (
        "exec env BULWARK_HTTP_PORT=9102 celery -A workers.app --quiet worker "
        "--loglevel=${BULWARK_LOG_LEVEL:-info} -Q default,inventory -n general@%h --autoscale=6,2"
    )
    extra = extra_command(command, 3)
    assert "-n general-3@%h" in extra and "BULWARK_HTTP_PORT=0 " in extra
    assert "${BULWARK_LOG_LEVEL:-info}" in extra  # left for the shell to expand
    assert "--hostname=a-2@x" in extra_command("celery worker -Q a --hostname=a@x", 2)
    with pytest.raises(ValueError, match="without -n NAME@HOST"):
        extra_command("celery worker -Q a", 2)
