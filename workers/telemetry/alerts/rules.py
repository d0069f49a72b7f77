"""Alert rules: small callables over a fleet snapshot, each returning conditions.

A rule is any `Callable[[Observation], Iterable[Condition]]`. An observation
is a `workers.fleet.FleetSnapshot` plus the dead-letter watermark: plain data,
so a rule is tested with a hand-made snapshot and no Redis at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from workers.fleet import FleetSnapshot
from workers.telemetry.alerts.model import Condition

log = logging.getLogger("bulwark.alerts")


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What one evaluation looks at: a fleet snapshot, and the dead-letter watermark."""

    fleet: FleetSnapshot
    #: When the dead-letter total last grew (None: not since alerting began), and by how much.
    deadletters_grew_at: float | None = None
    deadletters_grew_by: int = 0

    @property
    def now(self) -> float:
        return self.fleet.taken_at


Rule = Callable[[Observation], Iterable[Condition]]


@dataclass(frozen=True, slots=True)
class HealthUnhealthy:
    """A health check reporting `unhealthy` -> critical, one alert per check."""

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        for check, result in sorted(obs.fleet.health.items()):
            if result.status == "unhealthy":
                yield Condition(
                    name="HealthCheckUnhealthy",
                    service=check,
                    severity="critical",
                    message=f"health check {check} is unhealthy: {result.message}",
                    labels={"check": check},
                )


@dataclass(frozen=True, slots=True)
class HealthStale:
    """No health-check run for `max_age` seconds -> warning (the checks themselves stopped)."""

    max_age: float

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        last = obs.fleet.health_last_run
        if last is not None and obs.now - last > self.max_age:
            yield Condition(
                name="HealthChecksStale",
                service="bulwark",
                severity="warning",
                message=f"no health-check run for {obs.now - last:.0f} s",
            )


@dataclass(frozen=True, slots=True)
class BreakerOpen:
    """A circuit breaker whose circuit is open (forced or tripped) -> warning."""

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        for b in obs.fleet.breakers:
            if b.circuit == "open":
                yield Condition(
                    name="BreakerOpen",
                    service=b.name,
                    severity="warning",
                    message=f"circuit breaker {b.name} is {b.state}",
                    labels={"breaker": b.name},
                )


@dataclass(frozen=True, slots=True)
class ProcessCrashLoop:
    """A supervised process that keeps crashing -> critical (the rest of the fleet runs on)."""

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        for p in obs.fleet.processes:
            if p.crash_looping:
                yield Condition(
                    name="ProcessCrashLoop",
                    service=p.process,
                    severity="critical",
                    message=(
                        f"process {p.process} on {p.host} is crash-looping "
                        f"({p.restarts} restarts, last exit code {p.last_exit})"
                    ),
                    labels={"process": p.process, "host": p.host},
                )


@dataclass(frozen=True, slots=True)
class QueueBacklog:
    """More than `threshold` messages waiting in a queue -> warning."""

    threshold: int

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        for queue, depth in sorted((q.name, q.ready) for q in obs.fleet.work_queues):
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

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        grew = obs.deadletters_grew_at
        if grew is not None and obs.now - grew < self.window:
            yield Condition(
                name="DeadLetterGrowth",
                service="deadletter",
                severity="warning",
                message=(
                    f"{obs.deadletters_grew_by} new dead letter(s), "
                    f"{obs.fleet.deadletters_total} ever; see `bulwark deadletter list`"
                ),
            )


#: More than this many task messages refused by verification within a minute is a burst.
#: (To become the setting BULWARK_ALERT_SECURITY_REFUSALS.)
SECURITY_REFUSAL_THRESHOLD = 10
#: Refusal kinds that mean someone forges, replays or sends what it may not: a burst
#: with any of them is critical. The others (unsigned, unknown/revoked/expired key or
#: message, other) are as often a misconfigured producer or a late backlog: warning.
CRITICAL_REFUSALS = frozenset({"signature", "replay", "unauthorized"})


@dataclass(frozen=True, slots=True)
class SecurityRefusals:
    """More than `threshold` task messages refused by verification within `window` seconds
    (fleet-wide) -> critical if any of them was forged, replayed or unauthorized, else
    warning. One alert, which resolves once the window holds `threshold` or fewer.

    The message names each kind and its count, never a message's content.
    """

    threshold: int = SECURITY_REFUSAL_THRESHOLD
    window: float = 60.0

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        counts = obs.fleet.refusals_within(self.window)
        total = sum(counts.values())
        if total <= self.threshold:
            return
        critical = any(counts.get(kind) for kind in CRITICAL_REFUSALS)
        kinds = ", ".join(
            f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        )
        yield Condition(
            name="SecurityRefusals",
            service="security",
            severity="critical" if critical else "warning",
            message=(
                f"{total} task messages refused by verification in the last "
                f"{self.window:g} s (over {self.threshold}): {kinds}; "
                "see `bulwark deadletter list`"
            ),
        )


@dataclass(frozen=True, slots=True)
class Watchdog:
    """Always fires: a dead-man's switch; the receiver alarms when it STOPS arriving."""

    every: float

    def __call__(self, obs: Observation) -> Iterator[Condition]:
        yield Condition(
            name="Watchdog",
            service="bulwark",
            severity="info",
            message="alerting pipeline is alive (this alert always fires)",
            repeat_interval=self.every,
        )


def run_rules(rules: Iterable[Rule], obs: Observation) -> list[Condition]:
    """Every rule's conditions; a rule that raises is logged and skipped."""
    found: list[Condition] = []
    for rule in rules:
        try:
            found.extend(rule(obs))
        except Exception:
            log.exception("alert rule %r failed; skipped this evaluation", rule)
    return found
