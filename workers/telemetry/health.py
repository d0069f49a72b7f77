"""Fleet health checks as plain data, over one fleet snapshot; their results in Redis.

A check is a name and a function of a `HealthContext` returning an `Outcome`
(healthy, degraded or unhealthy, with a message); `run_checks` times each one
and turns an exception into an unhealthy result. `redis` and `broker` ping
their server; every other check reads the context's `FleetSnapshot`, taken
once per run. The beat task `bulwark.health.check` runs `CHECKS` and stores
the results (the HEALTH RESULTS CONTRACT, see `workers.fleet`): hash
`bulwark:{health:fleet}:results`, field = check name, value = JSON {check,
status, message, latency_seconds, checked_at}, and
`bulwark:{health:fleet}:last_run` = unix time of the last run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import redis

from policies.degradation import Level
from workers import fleet
from workers.amqp import AmqpBroker
from workers.fleet import (
    HEALTH_LAST_RUN_KEY,
    HEALTH_RESULTS_KEY,
    SEVERITY,
    FleetSnapshot,
    HealthResult,
    HealthStatus,
)
from workers.resources import broker, policy_redis
from workers.settings import get_settings

#: Breaker states that refuse (some) calls.
REFUSING = frozenset({"open", "half_open", "forced_open"})


@dataclass(frozen=True, slots=True)
class Outcome:
    status: HealthStatus
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthContext:
    """What checks read: the two Redis servers (for PING), one fleet snapshot, thresholds."""

    policy: redis.Redis
    broker: redis.Redis | AmqpBroker
    snapshot: FleetSnapshot
    backlog_threshold: int
    heartbeat_ttl: float
    now: Callable[[], float] = time.time

    @property
    def fleet(self) -> FleetSnapshot:
        """The snapshot; raises `FleetUnreadable` (an unhealthy result) if Redis failed it."""
        return self.snapshot.require()

    @classmethod
    def from_settings(cls) -> HealthContext:
        obs = get_settings().observability
        return cls(
            policy=policy_redis(),
            broker=broker(),
            snapshot=fleet.take(),
            backlog_threshold=obs.health_backlog_threshold,
            heartbeat_ttl=obs.heartbeat_ttl,
        )


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    run: Callable[[HealthContext], Outcome]


# -- the checks --------------------------------------------------------------------------------


def check_redis(ctx: HealthContext) -> Outcome:
    ctx.policy.ping()
    return Outcome("healthy", "policy Redis answers PING")


def check_broker(ctx: HealthContext) -> Outcome:
    ctx.broker.ping()
    return Outcome("healthy", "broker answers PING")


def check_backlog(ctx: HealthContext) -> Outcome:
    queues = ctx.fleet.work_queues
    over = sorted((q.name, q.ready) for q in queues if q.ready > ctx.backlog_threshold)
    if over:
        listed = ", ".join(f"{name}={n}" for name, n in over)
        return Outcome("degraded", f"backlog over {ctx.backlog_threshold}: {listed}")
    ready = sum(q.ready for q in queues)
    return Outcome("healthy", f"{ready} ready messages in {len(queues)} queues")


def check_breakers(ctx: HealthContext) -> Outcome:
    breakers = ctx.fleet.breakers
    refusing = sorted(f"{b.name} ({b.state})" for b in breakers if b.state in REFUSING)
    if refusing:
        return Outcome("degraded", "breakers not closed: " + ", ".join(refusing))
    return Outcome("healthy", f"{len(breakers)} breakers closed")


def check_workers(ctx: HealthContext) -> Outcome:
    snap = ctx.fleet
    if not snap.workers:
        return Outcome("unhealthy", "no worker heartbeat")
    now = ctx.now()
    # A heartbeat is rewritten every ttl/3; two missed writes make it stale.
    stale = sorted(w.hostname for w in snap.workers if now - w.at > ctx.heartbeat_ttl * 2 / 3)
    served = {q for w in snap.workers for q in w.queues}
    unserved = sorted(q.name for q in snap.work_queues if q.name not in served)
    problems = []
    if stale:
        problems.append("stale heartbeat: " + ", ".join(stale))
    if unserved:
        problems.append("no worker consumes: " + ", ".join(unserved))
    if problems:
        return Outcome("degraded", "; ".join(problems))
    return Outcome("healthy", f"{len(snap.workers)} workers with fresh heartbeats")


def check_degradation(ctx: HealthContext) -> Outcome:
    services = ctx.fleet.services
    offline = sorted(s.service for s in services if s.level >= Level.offline)
    reduced = sorted(f"{s.service} ({s.level})" for s in services if Level.full < s.level)
    if offline:
        return Outcome("unhealthy", "services offline: " + ", ".join(offline))
    if reduced:
        return Outcome("degraded", "services degraded: " + ", ".join(reduced))
    return Outcome("healthy", f"{len(services)} services at full level")


#: The registry: what `bulwark.health.check` runs, in order.
CHECKS: tuple[Check, ...] = (
    Check("redis", check_redis),
    Check("broker", check_broker),
    Check("queue_backlog", check_backlog),
    Check("breakers", check_breakers),
    Check("workers", check_workers),
    Check("degradation", check_degradation),
)


def run_check(check: Check, ctx: HealthContext) -> HealthResult:
    started = time.perf_counter()
    try:
        outcome = check.run(ctx)
    except Exception as exc:
        outcome = Outcome("unhealthy", f"{type(exc).__name__}: {exc}")
    return HealthResult(
        check=check.name,
        status=outcome.status,
        message=outcome.message,
        latency_seconds=round(time.perf_counter() - started, 6),
        checked_at=ctx.now(),
    )


def run_checks(ctx: HealthContext, checks: Sequence[Check] = CHECKS) -> list[HealthResult]:
    return [run_check(check, ctx) for check in checks]


def store_results(client: redis.Redis, results: Sequence[HealthResult], at: float) -> None:
    """Replace the stored results (one MULTI/EXEC: readers never see half a run)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(HEALTH_RESULTS_KEY)
    if results:
        pipe.hset(HEALTH_RESULTS_KEY, mapping={r.check: json.dumps(r.as_dict()) for r in results})
    pipe.set(HEALTH_LAST_RUN_KEY, repr(at))
    pipe.execute()


def in_check_order(results: Iterable[HealthResult]) -> list[HealthResult]:
    """`results` in registry order, unknown checks last (by name)."""
    order = {c.name: i for i, c in enumerate(CHECKS)}
    return sorted(results, key=lambda r: (order.get(r.check, len(order)), r.check))


def worst(results: Iterable[HealthResult]) -> HealthStatus:
    found: HealthStatus = "healthy"
    for r in results:
        if SEVERITY[r.status] > SEVERITY[found]:
            found = r.status
    return found
