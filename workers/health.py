"""Health: fleet checks as plain data, their results in Redis, probes, `bulwark health`.

A check is a name and a function of a `HealthContext` returning an `Outcome`
(healthy, degraded or unhealthy, with a message); `run_checks` times each one
and turns an exception into an unhealthy result. The beat task
`bulwark.health.check` runs `CHECKS` and stores the results (the HEALTH RESULTS
CONTRACT): hash `bulwark:{health:fleet}:results`, field = check name, value =
JSON {check, status, message, latency_seconds, checked_at}, and
`bulwark:{health:fleet}:last_run` = unix time of the last run.

Worker probes (served by `workers.http`): /healthz is liveness (this process
and its event loop; never the broker), /readyz is readiness (connected to the
broker and consuming).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

from policies import keys

Status = Literal["healthy", "degraded", "unhealthy"]
SEVERITY: dict[str, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}
RESULTS_KEY = keys.key("health", "fleet", "results")
LAST_RUN_KEY = keys.key("health", "fleet", "last_run")
#: Breaker states that refuse (some) calls.
REFUSING = frozenset({"open", "half_open", "forced_open"})


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One check's result as stored in Redis."""

    check: str
    status: Status
    message: str
    latency_seconds: float
    checked_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Result:
        return cls(**json.loads(raw))


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthContext:
    """What checks read: the policies' Redis, the broker's, and thresholds."""

    policy: redis.Redis
    broker: redis.Redis
    queues: tuple[str, ...]
    backlog_threshold: int
    heartbeat_ttl: float
    now: Callable[[], float] = time.time

    @classmethod
    def from_settings(cls) -> HealthContext:
        from workers.resources import broker_redis, policy_redis
        from workers.settings import get_settings

        settings = get_settings()
        obs = settings.observability
        return cls(
            policy=policy_redis(),
            broker=broker_redis(),
            queues=settings.all_queues,
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
    from workers.metrics import queue_depths

    depths = queue_depths(ctx.broker, ctx.queues)
    over = {q: n for q, n in depths.items() if n > ctx.backlog_threshold}
    if over:
        listed = ", ".join(f"{q}={n}" for q, n in sorted(over.items()))
        return Outcome("degraded", f"backlog over {ctx.backlog_threshold}: {listed}")
    return Outcome("healthy", f"{sum(depths.values())} ready messages in {len(depths)} queues")


def check_breakers(ctx: HealthContext) -> Outcome:
    from policies.breaker import list_breakers

    breakers = list_breakers(ctx.policy)
    refusing = sorted(f"{b.name} ({b.state})" for b in breakers if b.state in REFUSING)
    if refusing:
        return Outcome("degraded", "breakers not closed: " + ", ".join(refusing))
    return Outcome("healthy", f"{len(breakers)} breakers closed")


def check_workers(ctx: HealthContext) -> Outcome:
    beats = []
    for key in ctx.policy.scan_iter(match=keys.pattern("worker", "heartbeat"), count=500):
        raw = ctx.policy.get(key)
        if raw:
            beats.append(json.loads(raw))
    if not beats:
        return Outcome("unhealthy", "no worker heartbeat")
    now = ctx.now()
    # A heartbeat is rewritten every ttl/3; two missed writes make it stale.
    stale = sorted(b["hostname"] for b in beats if now - b["at"] > ctx.heartbeat_ttl * 2 / 3)
    served = {q for b in beats for q in b["queues"]}
    from workers.settings import DEADLETTER_QUEUE

    unserved = sorted(q for q in ctx.queues if q != DEADLETTER_QUEUE and q not in served)
    problems = []
    if stale:
        problems.append("stale heartbeat: " + ", ".join(stale))
    if unserved:
        problems.append("no worker consumes: " + ", ".join(unserved))
    if problems:
        return Outcome("degraded", "; ".join(problems))
    return Outcome("healthy", f"{len(beats)} workers with fresh heartbeats")


def check_degradation(ctx: HealthContext) -> Outcome:
    from policies.degradation import list_services
    from policies.degradation.store import Level

    services = list_services(ctx.policy)
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


def run_check(check: Check, ctx: HealthContext) -> Result:
    started = time.perf_counter()
    try:
        outcome = check.run(ctx)
    except Exception as exc:
        outcome = Outcome("unhealthy", f"{type(exc).__name__}: {exc}")
    return Result(
        check=check.name,
        status=outcome.status,
        message=outcome.message,
        latency_seconds=round(time.perf_counter() - started, 6),
        checked_at=ctx.now(),
    )


def run_checks(ctx: HealthContext, checks: Sequence[Check] = CHECKS) -> list[Result]:
    return [run_check(check, ctx) for check in checks]


def store_results(client: redis.Redis, results: Sequence[Result], at: float) -> None:
    """Replace the stored results (one MULTI/EXEC: readers never see half a run)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(RESULTS_KEY)
    if results:
        pipe.hset(RESULTS_KEY, mapping={r.check: json.dumps(r.as_dict()) for r in results})
    pipe.set(LAST_RUN_KEY, repr(at))
    pipe.execute()


def load_results(client: redis.Redis) -> tuple[list[Result], float | None]:
    """The stored results in registry order (unknown checks last) and the last run time."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(RESULTS_KEY)
    pipe.get(LAST_RUN_KEY)
    raw, last = pipe.execute()
    order = {c.name: i for i, c in enumerate(CHECKS)}
    results = sorted(
        (Result.from_json(v) for v in raw.values()), key=lambda r: (order.get(r.check, 99), r.check)
    )
    return results, float(last) if last is not None else None


def worst(results: Sequence[Result]) -> Status:
    if not results:
        return "healthy"
    return max((r.status for r in results), key=SEVERITY.__getitem__)


def render(results: Sequence[Result], last_run: float | None, now: float) -> str:
    if last_run is None:
        return "no health results stored yet (is beat running?); `bulwark health --run` runs them"
    lines = [f"FLEET {worst(results).upper()}  (checked {max(0.0, now - last_run):.0f}s ago)"]
    width = max((len(r.check) for r in results), default=5)
    for r in results:
        lines.append(
            f"  {r.check:{width}}  {r.status:9}  {r.latency_seconds * 1000:7.1f} ms  {r.message}"
        )
    return "\n".join(lines)


# -- probes ------------------------------------------------------------------------------------


class WorkerProbe:
    """Liveness and readiness of one worker's main process (its Celery consumer)."""

    def __init__(self, consumer: Any, stale_after: float | None = None) -> None:
        from workers.settings import get_settings

        self.consumer = consumer
        self.stale_after = stale_after or get_settings().observability.liveness_stale
        self.last_turn = time.monotonic()
        hub = getattr(consumer, "hub", None)
        if hub is not None:
            hub.on_tick.add(self._turn)  # called on every turn of the event loop

    def _turn(self) -> None:
        self.last_turn = time.monotonic()

    def liveness(self) -> Any:
        from workers.http import Response

        age = time.monotonic() - self.last_turn
        connected = getattr(self.consumer, "connection", None) is not None
        data = {"pid": _pid(), "loop_age_seconds": round(age, 3)}
        if not threading.main_thread().is_alive():
            return Response.json(503, {"status": "dead", "reason": "main thread ended", **data})
        # While the broker is away the loop does not turn; that is not a liveness failure.
        if connected and getattr(self.consumer, "hub", None) is not None and age > self.stale_after:
            return Response.json(503, {"status": "stalled", "reason": "event loop stalled", **data})
        return Response.json(200, {"status": "alive", **data})

    def readiness(self) -> Any:
        from workers.http import Response
        from workers.resources import broker_redis

        problems = []
        if getattr(self.consumer, "connection", None) is None:
            problems.append("no broker connection")
        if getattr(self.consumer, "task_consumer", None) is None:
            problems.append("not consuming")
        try:
            broker_redis().ping()
        except redis.RedisError as exc:
            problems.append(f"broker unreachable: {exc}")
        if problems:
            return Response.json(503, {"status": "not ready", "problems": problems})
        queues = sorted(q.name for q in self.consumer.task_consumer.queues)
        return Response.json(200, {"status": "ready", "queues": queues})


def _pid() -> int:
    import os

    return os.getpid()


def beat_liveness() -> Any:
    from workers.http import Response

    return Response.json(200, {"status": "alive", "pid": _pid()})


def beat_readiness() -> Any:
    from workers.http import Response
    from workers.resources import broker_redis, policy_redis

    try:
        policy_redis().ping()
        broker_redis().ping()
    except redis.RedisError as exc:
        return Response.json(503, {"status": "not ready", "problems": [str(exc)]})
    return Response.json(200, {"status": "ready"})


# -- `bulwark health` --------------------------------------------------------------------------


def _cmd_health(args: argparse.Namespace) -> int:
    from workers.resources import policy_redis

    client = policy_redis()
    if args.run:
        results = run_checks(HealthContext.from_settings())
        last_run: float | None = time.time()
        store_results(client, results, last_run or 0.0)
    else:
        results, last_run = load_results(client)
    if args.json:
        print(json.dumps({"last_run": last_run, "results": [r.as_dict() for r in results]}))
    else:
        print(render(results, last_run, time.time()))
    if last_run is None:
        return 2
    return 1 if worst(results) == "unhealthy" else 0


def register_cli(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `bulwark health`: the fleet view; exit 1 if any check is unhealthy."""
    p = sub.add_parser("health", help="fleet health checks (stored by beat; --run runs them now)")
    p.add_argument("--run", action="store_true", help="run the checks now and store them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_health)
