"""Fleet scaling decisions: how many workers each Procfile worker group should run.

The leading beat calls `FleetScaler.step` every `BULWARK_FLEET_SCALE_INTERVAL`
seconds (15). For each group (`workers.scaling.groups`) it reads, from one fleet
snapshot, the backlog of the group's queues, the breakers and bulkheads of their
tasks, and the heartbeats of the group's live workers, which carry each worker's
run-time totals (completions and run time between two decisions). It decides with
`policies.autoscale.Scaler`, counting the load in processes and the answer in
workers of the group's pool size (`unit`), within the group's MIN..MAX.

Each decision, with its reason and the scale-down window's history (so that a new
leader keeps the window), is stored in Redis (`DECISIONS_KEY`, a hash by group):
`bulwark up` acts on it, both beats serve it as JSON at /scaling (the shape KEDA's
`metrics-api` scaler reads) and the leader exports it as gauges.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from policies import keys
from policies.autoscale import Decision, Scaler, ScalingConfig
from workers.fleet import FleetSnapshot, WorkerState
from workers.scaling.groups import WorkerGroup
from workers.scaling.load import QueuePolicies, config_for, fleet_load, policies_of
from workers.settings import Settings

__all__ = [
    "DECISIONS_KEY",
    "FleetScaler",
    "GroupDecision",
    "members",
    "read_decisions",
    "scaling_document",
]

logger = logging.getLogger(__name__)

#: Hash: group name -> its last decision (JSON of `GroupDecision`).
DECISIONS_KEY = keys.key("scaling", "fleet", "decisions")
#: History entries kept per group (a window of 60 s at one decision a second at most).
MAX_HISTORY = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class GroupDecision:
    """The fleet scaler's last word on one worker group."""

    group: str
    queues: tuple[str, ...]
    desired: int
    #: Workers of the group with a live heartbeat, and those still beating on time.
    current: int
    ready: int
    min: int
    max: int
    #: Processes one worker of the group may run.
    processes: int
    reason: str
    #: When it was decided (Redis's clock, unix seconds).
    at: float
    #: (time, recommended workers) of the scale-down window.
    history: tuple[tuple[float, int], ...] = ()

    def public(self) -> dict[str, Any]:
        """What /scaling shows (the history stays inside)."""
        shown = asdict(self)
        del shown["history"]
        shown["queues"] = list(self.queues)
        return shown


def members(group: WorkerGroup, workers: Iterable[WorkerState]) -> list[WorkerState]:
    """The live workers of `group`: those consuming exactly its queues."""
    wanted = set(group.queues)
    return [w for w in workers if set(w.queues) == wanted]


class GroupMeter:
    """A group's completions, run time and arrivals between two decisions, from each
    member's run-time totals. A worker seen only once (new, or restarted with its
    totals back at zero) counts from its second reading."""

    def __init__(self) -> None:
        self._last: tuple[float, dict[str, tuple[float, int]], int] | None = None
        self.run_time: float | None = None

    def rates(
        self, workers: Sequence[WorkerState], backlog: int, now: float
    ) -> tuple[float, float | None]:
        totals = {w.hostname: w.runtime for w in workers if w.runtime is not None}
        last, self._last = self._last, (now, totals, backlog)
        if last is None:
            return 0.0, self.run_time
        at, before, backlog_before = last
        seconds, done = 0.0, 0
        for hostname, (s, n) in totals.items():
            if hostname in before and n >= before[hostname][1]:
                seconds += max(0.0, s - before[hostname][0])
                done += n - before[hostname][1]
        if done > 0:
            self.run_time = seconds / done
        elapsed = now - at
        if elapsed <= 0:
            return 0.0, self.run_time
        return max(0.0, done + backlog - backlog_before) / elapsed, self.run_time


class FleetScaler:
    """Decides every group's worker count; keeps each group's meter and window."""

    def __init__(
        self, app: Any, settings: Settings, groups: Sequence[WorkerGroup], client: redis.Redis
    ) -> None:
        self.app = app
        self.settings = settings
        self.groups = tuple(groups)
        self.client = client
        self._meters = {g.name: GroupMeter() for g in self.groups}
        self._scalers: dict[str, Scaler] = {}
        self._policies: dict[str, tuple[QueuePolicies, dict[str, int]]] = {}

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(sorted({q for g in self.groups for q in g.queues}))

    def config(self, group: WorkerGroup) -> ScalingConfig:
        return config_for(self.settings, group.min_workers, group.max_workers, group.processes)

    def _scaler(self, group: WorkerGroup) -> Scaler:
        scaler = self._scalers.get(group.name)
        if scaler is None:  # a new leader: carry on with the window the last one kept
            stored = read_decisions(self.client).get(group.name)
            history = list(stored.history) if stored is not None else []
            scaler = self._scalers[group.name] = Scaler(self.config(group), history)
        return scaler

    def step(self, snapshot: FleetSnapshot) -> list[GroupDecision]:
        """Decide every group from `snapshot` (read with `self.queues`) and store it all."""
        snapshot.require()
        now = snapshot.taken_at
        beat_every = self.settings.observability.heartbeat_ttl / 3
        decisions = []
        for group in self.groups:
            mine = members(group, snapshot.workers)
            backlog = sum(snapshot.queue(q).backlog for q in group.queues)
            arrival, run_time = self._meters[group.name].rates(mine, backlog, now)
            if group.name not in self._policies:
                self._policies[group.name] = policies_of(self.app, self.settings, group.queues)
            found, limits = self._policies[group.name]
            load = fleet_load(
                snapshot,
                group.queues,
                found,
                limits=limits,
                current=len(mine),
                waiting_here=0,
                arrival_rate=arrival,
                run_time=run_time,
                own=lambda holder: True,  # the group's own workers hold what is held
            )
            scaler = self._scaler(group)
            decision: Decision = scaler.step(load, now)
            decisions.append(
                GroupDecision(
                    group=group.name,
                    queues=group.queues,
                    desired=decision.desired,
                    current=len(mine),
                    ready=sum(1 for w in mine if now - w.at <= 2 * beat_every),
                    min=group.min_workers,
                    max=group.max_workers,
                    processes=group.processes,
                    reason=decision.reason,
                    at=now,
                    history=tuple(scaler.history[-MAX_HISTORY:]),
                )
            )
        store(self.client, decisions)
        return decisions


def store(client: redis.Redis, decisions: Iterable[GroupDecision]) -> None:
    mapping = {d.group: json.dumps(asdict(d)) for d in decisions}
    if mapping:
        client.hset(DECISIONS_KEY, mapping=mapping)


def _decision(raw: Any) -> GroupDecision:
    data = json.loads(raw)
    history = tuple(
        (float(at), int(n))
        for at, n in data.get("history", ())[:MAX_HISTORY]
        if math.isfinite(float(at))
    )
    return GroupDecision(
        group=str(data["group"]),
        queues=tuple(str(q) for q in data["queues"]),
        desired=int(data["desired"]),
        current=int(data["current"]),
        ready=int(data["ready"]),
        min=int(data["min"]),
        max=int(data["max"]),
        processes=int(data["processes"]),
        reason=str(data["reason"])[:300],
        at=float(data["at"]),
        history=history,
    )


def read_decisions(client: redis.Redis) -> dict[str, GroupDecision]:
    """The stored decision of every group (an unreadable one is logged and left out)."""
    found = {}
    for name, raw in client.hgetall(DECISIONS_KEY).items():
        group = name.decode() if isinstance(name, bytes) else str(name)
        try:
            found[group] = _decision(raw)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("scaling: unreadable decision of group %r: %s", group[:80], exc)
    return found


def scaling_document(decisions: Mapping[str, GroupDecision]) -> dict[str, Any]:
    """The /scaling JSON: `{"groups": {name: {desired, current, ready, ...}}}`.

    KEDA's metrics-api scaler reads one number with `valueLocation`, e.g.
    `groups.worker_general.desired`, and with `targetValue: "1"` runs that many pods.
    """
    return {"groups": {name: d.public() for name, d in sorted(decisions.items())}}
