"""What an autoscaler sees: the queues and policies of the fleet snapshot, and this
worker's own run-time totals, turned into a `policies.autoscale.Load`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from policies.autoscale import Load, ScalingConfig
from workers.celeryconfig import route_for
from workers.fleet import FleetSnapshot
from workers.resources import policy
from workers.settings import Settings

__all__ = [
    "Meter",
    "QueuePolicies",
    "config_for",
    "fleet_load",
    "policies_of",
    "queue_policies",
]

#: Breaker states in which no call gets through.
REFUSING = frozenset({"open", "forced_open"})


@dataclass(frozen=True, slots=True)
class QueuePolicies:
    """The breakers and bulkheads the tasks of some queues run through.

    `every_breaker` / `every_bulkhead`: whether every task routed to the queues has
    one (a queue with an unguarded task can always use another process).
    """

    breakers: frozenset[str] = frozenset()
    bulkheads: frozenset[str] = frozenset()
    every_breaker: bool = False
    every_bulkhead: bool = False


def queue_policies(
    tasks: Iterable[Any], queues: Collection[str], route: Callable[[str], str | None]
) -> QueuePolicies:
    """Which breakers and bulkheads the `tasks` routed (`route(name)`) to `queues` use.
    Celery's own tasks (`celery.*`) are left out."""
    breakers: set[str] = set()
    bulkheads: set[str] = set()
    every_breaker = every_bulkhead = True
    found = False
    for task in tasks:
        name = getattr(task, "name", None)
        if not isinstance(name, str) or name.startswith("celery.") or route(name) not in queues:
            continue
        found = True
        breaker, bulkhead = getattr(task, "breaker", None), getattr(task, "bulkhead", None)
        if isinstance(breaker, str):
            breakers.add(breaker)
        else:
            every_breaker = False
        if isinstance(bulkhead, str):
            bulkheads.add(bulkhead)
        else:
            every_bulkhead = False
    return QueuePolicies(
        frozenset(breakers), frozenset(bulkheads), found and every_breaker, found and every_bulkhead
    )


def policies_of(
    app: Any, settings: Settings, queues: Collection[str]
) -> tuple[QueuePolicies, dict[str, int]]:
    """The policies of `app`'s tasks routed to `queues`, and each bulkhead's declared limit."""
    route = route_for(settings)

    def queue_of(name: str) -> str | None:
        task = app.tasks.get(name)
        own = getattr(task, "queue", None)
        return own if isinstance(own, str) else route(name, (), {}, {}).get("queue")

    found = queue_policies(app.tasks.values(), queues, queue_of)
    limits = {name: policy("bulkhead", name).config.limit for name in found.bulkheads}
    return found, limits


def config_for(settings: Settings, min_size: int, max_size: int, unit: int = 1) -> ScalingConfig:
    """The scaling settings as a `ScalingConfig` for a pool (or a group: `unit`)."""
    s = settings.scaling
    return ScalingConfig(
        min_size=min(min_size, max_size),
        max_size=max_size,
        target_utilization=s.autoscale_utilization,
        drain_seconds=s.autoscale_drain_seconds,
        tolerance=s.autoscale_tolerance,
        max_step=s.autoscale_max_step,
        scale_down_window=s.autoscale_scale_down_window,
        max_cpu=s.autoscale_max_cpu,
        max_memory=s.autoscale_max_memory,
        unit=unit,
    )


class Meter:
    """This worker's rates between two decisions, from the run-time totals of its pool
    (the sum and count of `bulwark_task_runtime_seconds`) and the backlog: tasks done,
    their mean run time, and the arrival rate (done plus the backlog's growth)."""

    def __init__(self) -> None:
        self._last: tuple[float, float, int, int] | None = None  # at, seconds, tasks, backlog
        #: The last measured mean run time (kept while no task finishes).
        self.run_time: float | None = None

    def rates(
        self, seconds: float, tasks: int, backlog: int, now: float
    ) -> tuple[float, float | None]:
        """(arrival rate, run time) since the last call; the first call sets the baseline."""
        last, self._last = self._last, (now, seconds, tasks, backlog)
        if last is None:
            return 0.0, self.run_time
        at, seconds_before, tasks_before, backlog_before = last
        elapsed = now - at
        done = tasks - tasks_before if tasks >= tasks_before else 0  # totals never go back
        if done > 0:
            self.run_time = max(0.0, seconds - seconds_before) / done
        if elapsed <= 0:
            return 0.0, self.run_time
        return max(0.0, done + backlog - backlog_before) / elapsed, self.run_time


def fleet_load(
    snapshot: FleetSnapshot,
    queues: Collection[str],
    policies: QueuePolicies,
    *,
    current: int,
    waiting_here: int,
    arrival_rate: float,
    run_time: float | None,
    own: Callable[[str], bool] = lambda holder: False,
    limits: Mapping[str, int] | None = None,
    cpu_percent: float = 0.0,
    memory_percent: float = 0.0,
) -> Load:
    """The load of `queues` as the snapshot shows it, for a pool of `current` processes.

    The backlog is what waits on the broker (ready and scheduled) plus what this worker
    reserved and has not started (`waiting_here`). The breaker counts as open when
    every task of the queues runs through a breaker and all of them refuse calls; the
    bulkhead caps the pool when every task takes a permit: at the permits free plus
    those this worker's processes hold (`own(holder)` says which). A bulkhead never
    acquired yet is not in the snapshot: all of its declared `limits` are free.
    """
    backlog = sum(snapshot.queue(q).backlog for q in queues) + max(0, waiting_here)
    states = {b.name: b.state for b in snapshot.breakers}
    breaker_open = (
        policies.every_breaker
        and bool(policies.breakers)
        and all(states.get(name) in REFUSING for name in policies.breakers)
    )
    room = None
    if policies.every_bulkhead and policies.bulkheads:
        seen = {b.name: b for b in snapshot.bulkheads}
        declared = limits or {}
        free: list[int] = []
        for name in policies.bulkheads:
            state = seen.get(name)
            if state is not None:
                free.append(state.available + sum(1 for h in state.holders if own(h)))
            elif name in declared:
                free.append(declared[name])
        if len(free) == len(policies.bulkheads):
            room = sum(free)
    return Load(
        current=current,
        backlog=backlog,
        arrival_rate=arrival_rate,
        run_time=run_time,
        breaker_open=breaker_open,
        bulkhead_room=room,
        cpu_percent=cpu_percent,
        memory_percent=memory_percent,
    )
