"""Alert rules: small callables over a fleet snapshot, each returning conditions.

A rule is any `Callable[[Snapshot], Iterable[Condition]]`. The snapshot is
plain data (see `workers.alerts.snapshot` for how it is read from Redis), so
a rule is tested with a hand-made snapshot and no Redis at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.alerts.model import Condition

log = logging.getLogger("bulwark.alerts")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """The fleet state one evaluation looks at."""

    now: float
    #: Health results by check name (HEALTH RESULTS CONTRACT values).
    health: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    health_last_run: float | None = None
    #: Breakers as `workers.status.fleet_status` lists them (name, state, circuit, ...).
    breakers: Sequence[Mapping[str, Any]] = ()
    #: Messages waiting per queue (priority sub-queues included).
    queues: Mapping[str, int] = field(default_factory=dict)
    deadletters_total: int = 0
    #: When the dead-letter total last grew (None: not since alerting began), and by how much.
    deadletters_grew_at: float | None = None
    deadletters_grew_by: int = 0


Rule = Callable[[Snapshot], Iterable[Condition]]


@dataclass(frozen=True, slots=True)
class HealthUnhealthy:
    """A health check reporting `unhealthy` -> critical, one alert per check."""

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        for check, result in sorted(snap.health.items()):
            if result.get("status") == "unhealthy":
                yield Condition(
                    name="HealthCheckUnhealthy",
                    service=check,
                    severity="critical",
                    message=f"health check {check} is unhealthy: {result.get('message', '')}",
                    labels={"check": check},
                )


@dataclass(frozen=True, slots=True)
class HealthStale:
    """No health-check run for `max_age` seconds -> warning (the checks themselves stopped)."""

    max_age: float

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        last = snap.health_last_run
        if last is not None and snap.now - last > self.max_age:
            yield Condition(
                name="HealthChecksStale",
                service="bulwark",
                severity="warning",
                message=f"no health-check run for {snap.now - last:.0f} s",
            )


@dataclass(frozen=True, slots=True)
class BreakerOpen:
    """A circuit breaker whose circuit is open (forced or tripped) -> warning."""

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        for b in snap.breakers:
            if b.get("circuit", b.get("state")) == "open":
                name = str(b["name"])
                yield Condition(
                    name="BreakerOpen",
                    service=name,
                    severity="warning",
                    message=f"circuit breaker {name} is {b.get('state', 'open')}",
                    labels={"breaker": name},
                )


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    """More than `threshold` messages waiting in a queue -> warning."""

    threshold: int

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        for queue, depth in sorted(snap.queues.items()):
            if depth > self.threshold:
                yield Condition(
                    name="QueueBacklog",
                    service=queue,
                    severity="warning",
                    message=f"{depth} messages waiting in queue {queue} (over {self.threshold})",
                    labels={"queue": queue},
                )


@dataclass(frozen=True, slots=True)
class DeadLetterGrowth:
    """New dead letters within the last `window` seconds -> warning."""

    window: float

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        grew = snap.deadletters_grew_at
        if grew is not None and snap.now - grew < self.window:
            yield Condition(
                name="DeadLetterGrowth",
                service="deadletter",
                severity="warning",
                message=(
                    f"{snap.deadletters_grew_by} new dead letter(s), "
                    f"{snap.deadletters_total} ever; see `bulwark deadletter list`"
                ),
            )


@dataclass(frozen=True, slots=True)
class Watchdog:
    """Always fires: a dead-man's switch; the receiver alarms when it STOPS arriving."""

    every: float

    def __call__(self, snap: Snapshot) -> Iterator[Condition]:
        yield Condition(
            name="Watchdog",
            service="bulwark",
            severity="info",
            message="alerting pipeline is alive (this alert always fires)",
            repeat_interval=self.every,
        )


def run_rules(rules: Iterable[Rule], snap: Snapshot) -> list[Condition]:
    """Every rule's conditions; a rule that raises is logged and skipped."""
    found: list[Condition] = []
    for rule in rules:
        try:
            found.extend(rule(snap))
        except Exception:
            log.exception("alert rule %r failed; skipped this evaluation", rule)
    return found
