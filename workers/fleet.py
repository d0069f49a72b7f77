"""ONE read of the fleet's state: `FleetSnapshot`.

Metrics' fleet gauges, the health checks, the alert rules, `bulwark status`
(and the autoscaler) all take a snapshot from `read_fleet`; nothing else reads
fleet state from Redis. A snapshot is immutable plain data, so every consumer
is tested with a hand-made one.

It costs three pipelined round trips, however many policies, workers or keys:

1. policy Redis: TIME, the name indexes of breakers, bulkheads, services,
   workers and supervisors (`policies.index`), the stored health results, the
   dead-letter counts, the security refusal counts (`workers.security.refusals`);
2. policy Redis: one snapshot script per breaker, bulkhead and service, one
   GET per worker heartbeat, one HGETALL per supervisor's restarted processes;
3. broker Redis: LLEN of every priority sub-queue of every queue and kombu's
   `unacked` hash (messages reserved by workers; those whose ETA is still
   ahead are counted as scheduled).

A worker whose heartbeat expired (it died without saying goodbye) is dropped
from the workers index by the read that notices it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

import redis
from kombu.transport.redis import PRIORITY_STEPS, Channel

from policies import keys
from policies.breaker import BreakerSnapshot, RedisBreakerStore
from policies.bulkhead import BulkheadSnapshot
from policies.bulkhead import queue_snapshot as queue_bulkhead
from policies.bulkhead.store import RedisBulkheadStore
from policies.deadletter import DeadLetterStore
from policies.degradation import ServiceState
from policies.degradation.store import RedisDegradationStore
from policies.index import decode_names, raise_error
from workers.amqp import BROKER_ERRORS, AmqpBroker
from workers.resources import broker, policy_redis
from workers.security import refusals
from workers.security.refusals import RefusalCount
from workers.settings import DEADLETTER_QUEUE, get_settings

__all__ = [
    "HEALTH_LAST_RUN_KEY",
    "HEALTH_RESULTS_KEY",
    "SUPERVISORS_INDEX",
    "WORKERS_INDEX",
    "FleetSnapshot",
    "FleetUnreadable",
    "HealthResult",
    "PoolState",
    "ProcessState",
    "QueueState",
    "RefusalCount",
    "WorkerState",
    "heartbeat_key",
    "priority_queues",
    "processes_key",
    "read_fleet",
    "take",
]

logger = logging.getLogger(__name__)

HealthStatus = Literal["healthy", "degraded", "unhealthy"]
#: Health statuses, least to most severe.
SEVERITY: dict[str, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}

#: The HEALTH RESULTS CONTRACT: hash field = check name, value = `HealthResult` JSON.
HEALTH_RESULTS_KEY = keys.key("health", "fleet", "results")
#: Unix time of the last health-check run.
HEALTH_LAST_RUN_KEY = keys.key("health", "fleet", "last_run")
#: The hostnames of workers that announced themselves (`workers.lifecycle`).
WORKERS_INDEX = keys.index("worker")
#: The hosts whose supervisor (`bulwark up`) restarted a process.
SUPERVISORS_INDEX = keys.index("supervisor")


def processes_key(host: str) -> str:
    """Hash of one supervisor's processes: name -> JSON {restarts, crash_looping, ...}."""
    return keys.key("supervisor", host, "processes")


def heartbeat_key(hostname: str) -> str:
    """The key a live worker keeps alive with a TTL: JSON {hostname, pid, queues, at}."""
    return keys.key("worker", hostname, "heartbeat")


def priority_queues(queue: str) -> list[str]:
    """The Redis lists kombu keeps for `queue`, one per priority step."""
    return [f"{queue}{Channel.sep}{p}" if p else queue for p in PRIORITY_STEPS]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueState:
    """One Celery queue on the broker."""

    name: str
    #: Ready messages, summed over every priority sub-queue.
    ready: int = 0
    #: Reserved by workers and not acknowledged: running, prefetched or held for an ETA.
    unacked: int = 0
    #: Of the unacked, those held for an ETA (countdown) still ahead.
    scheduled: int = 0
    #: Ready messages per priority step (kombu's PRIORITY_STEPS order).
    by_priority: tuple[int, ...] = ()

    @property
    def backlog(self) -> int:
        """Messages waiting to run: ready plus scheduled."""
        return self.ready + self.scheduled


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolState:
    """A worker's pool as its autoscaler last left it (`--autoscale` only)."""

    processes: int
    desired: int
    min: int
    max: int
    reason: str
    #: When the decision was made (the worker's clock, unix seconds).
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerState:
    """One worker's last heartbeat."""

    hostname: str
    pid: int
    queues: tuple[str, ...]
    #: The worker's clock when it wrote the heartbeat (unix seconds).
    at: float
    #: Its pool's last autoscale decision; None if it runs without --autoscale.
    pool: PoolState | None = None
    #: (seconds, tasks) its tasks have run since it started; None from an older worker.
    runtime: tuple[float, int] | None = None
    #: Its pool processes when it wrote the heartbeat; None from an older worker.
    processes: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessState:
    """A process the supervisor of `bulwark up` had to restart."""

    host: str
    process: str
    restarts: int
    last_exit: int
    crash_looping: bool
    #: When the supervisor last wrote this (unix seconds).
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthResult:
    """One health check's stored result (the HEALTH RESULTS CONTRACT)."""

    check: str
    status: HealthStatus
    message: str
    latency_seconds: float
    checked_at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, check: str, raw: str | bytes) -> HealthResult:
        """Parse a stored result; an unreadable one is an unhealthy result saying so."""
        try:
            data = json.loads(raw)
            return cls(
                check=check,
                status=data["status"] if data["status"] in SEVERITY else "unhealthy",
                message=str(data.get("message", "")),
                latency_seconds=float(data.get("latency_seconds", 0.0)),
                checked_at=float(data.get("checked_at", 0.0)),
            )
        except (ValueError, TypeError, KeyError):
            return cls(
                check=check,
                status="unhealthy",
                message="unreadable stored result",
                latency_seconds=0.0,
                checked_at=0.0,
            )


class FleetUnreadable(RuntimeError):
    """The fleet's state could not be read (`FleetSnapshot.require`)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class FleetSnapshot:
    """The fleet at one instant, as every consumer sees it."""

    #: When it was read: the policy Redis's clock (unix seconds).
    taken_at: float
    #: False if Redis could not be read; `error` says why and the rest is empty.
    up: bool = True
    error: str | None = None
    queues: tuple[QueueState, ...] = ()
    breakers: tuple[BreakerSnapshot, ...] = ()
    bulkheads: tuple[BulkheadSnapshot, ...] = ()
    services: tuple[ServiceState, ...] = ()
    workers: tuple[WorkerState, ...] = ()
    #: Processes restarted by a supervisor (crashed at least once).
    processes: tuple[ProcessState, ...] = ()
    deadletters_kept: int = 0
    deadletters_total: int = 0
    #: Stored health results by check name (sorted), and when the checks last ran.
    health: Mapping[str, HealthResult] = field(default_factory=dict)
    health_last_run: float | None = None
    #: Task messages refused by verification, per kind and bucket, the last few minutes.
    security_refusals: tuple[RefusalCount, ...] = ()

    @classmethod
    def unreadable(cls, error: BaseException | str, at: float) -> FleetSnapshot:
        return cls(taken_at=at, up=False, error=str(error))

    def require(self) -> FleetSnapshot:
        """This snapshot, or `FleetUnreadable` naming why Redis could not be read."""
        if not self.up:
            raise FleetUnreadable(f"fleet state unreadable: {self.error}")
        return self

    @property
    def work_queues(self) -> tuple[QueueState, ...]:
        """The queues that hold work: all but the dead-letter queue."""
        return tuple(q for q in self.queues if q.name != DEADLETTER_QUEUE)

    def queue(self, name: str) -> QueueState:
        """The state of queue `name` (empty if the snapshot does not list it)."""
        for q in self.queues:
            if q.name == name:
                return q
        return QueueState(name=name)

    def refusals_within(self, seconds: float) -> dict[str, int]:
        """Security refusals per kind in the buckets that end within `seconds` of `taken_at`.

        Buckets are `refusals.BUCKET` seconds wide, so this looks up to one bucket further back.
        """
        counts: dict[str, int] = {}
        for c in self.security_refusals:
            if c.end > self.taken_at - seconds:
                counts[c.kind] = counts.get(c.kind, 0) + c.count
        return counts

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: levels as names, every field of every part."""
        data = {
            "taken_at": self.taken_at,
            "up": self.up,
            "error": self.error,
            "queues": [asdict(q) for q in self.queues],
            "breakers": [asdict(b) for b in self.breakers],
            "bulkheads": [asdict(b) for b in self.bulkheads],
            "services": [_service_dict(s) for s in self.services],
            "workers": [asdict(w) for w in self.workers],
            "processes": [asdict(p) for p in self.processes],
            "deadletters": {"kept": self.deadletters_kept, "total": self.deadletters_total},
            "health": {
                "last_run": self.health_last_run,
                "results": [r.as_dict() for r in self.health.values()],
            },
            "security_refusals": [asdict(c) for c in self.security_refusals],
        }
        return data


def _service_dict(state: ServiceState) -> dict[str, Any]:
    data = asdict(state)
    for name in ("level", "from_level", "floor"):
        data[name] = str(getattr(state, name))
    data["level_value"] = int(state.level)
    return data


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _now(reply: Sequence[Any]) -> float:
    seconds, micros = reply
    return float(seconds) + int(micros) / 1_000_000


def read_fleet(
    policy: redis.Redis, broker: redis.Redis | AmqpBroker, queues: Iterable[str]
) -> FleetSnapshot:
    """Read the fleet (three pipelined round trips); `up=False` with the error if Redis fails."""
    names = list(queues)
    try:
        return _read(policy, broker, names)
    except (redis.RedisError, *BROKER_ERRORS) as exc:
        logger.warning("fleet snapshot: Redis or the broker unreachable (%s)", exc)
        return FleetSnapshot.unreadable(f"{type(exc).__name__}: {exc}", time.time())


def _read(
    policy: redis.Redis, broker: redis.Redis | AmqpBroker, queues: list[str]
) -> FleetSnapshot:
    letters = DeadLetterStore(policy)
    # 1. what exists, and the plain values
    pipe = policy.pipeline(transaction=False)
    pipe.execute_command("TIME")  # by name: a cluster pipeline blocks `time()` (keyless)
    for policy_name in ("breaker", "bulkhead", "degradation"):
        pipe.smembers(keys.index(policy_name))
    pipe.smembers(WORKERS_INDEX)
    pipe.smembers(SUPERVISORS_INDEX)
    pipe.hgetall(HEALTH_RESULTS_KEY)
    pipe.get(HEALTH_LAST_RUN_KEY)
    letters.queue_counts(pipe)
    refusals.queue_read(pipe)
    first = [raise_error(r) for r in pipe.execute(raise_on_error=False)]
    now = _now(first[0])
    breaker_names, bulkhead_names, service_names, hostnames, supervisors = (
        decode_names(r) for r in first[1:6]
    )
    raw_health, last_run = first[6], first[7]
    kept, total = letters.read_counts(first[8:10])
    refused = refusals.read(first[10], now)

    # 2. one snapshot per policy instance, one heartbeat per worker
    pipe = policy.pipeline(transaction=False)
    breakers = RedisBreakerStore(policy)
    bulkheads = RedisBulkheadStore(policy)
    services = RedisDegradationStore(policy)
    read_breakers = [breakers.queue_snapshot(pipe, n) for n in breaker_names]
    read_bulkheads = [queue_bulkhead(bulkheads, pipe, n) for n in bulkhead_names]
    read_services = [services.queue_snapshot(pipe, n) for n in service_names]
    beats_at = len(pipe)
    for hostname in hostnames:
        pipe.get(heartbeat_key(hostname))
    for host in supervisors:
        pipe.hgetall(processes_key(host))
    second = pipe.execute(raise_on_error=False)
    beats = second[beats_at : beats_at + len(hostnames)]
    supervised = second[beats_at + len(hostnames) :]
    workers = _workers(hostnames, beats)
    gone = [h for h, raw in zip(hostnames, beats, strict=True) if raw is None]
    if gone:
        policy.srem(WORKERS_INDEX, *gone)

    # 3. the broker's queues
    return FleetSnapshot(
        taken_at=now,
        queues=_queues(broker, queues, now),
        breakers=tuple(read(second) for read in read_breakers),
        bulkheads=tuple(b for b in (read(second) for read in read_bulkheads) if b is not None),
        services=tuple(read(second) for read in read_services),
        workers=workers,
        processes=_processes(supervised),
        deadletters_kept=kept,
        deadletters_total=total,
        health={
            _text(k): HealthResult.from_json(_text(k), v) for k, v in sorted(raw_health.items())
        },
        health_last_run=float(last_run) if last_run is not None else None,
        security_refusals=refused,
    )


def _workers(hostnames: list[str], beats: Sequence[Any]) -> tuple[WorkerState, ...]:
    found = []
    for hostname, raw in zip(hostnames, beats, strict=True):
        if raw is None or isinstance(raw, BaseException):
            continue
        try:
            data = json.loads(raw)
            found.append(
                WorkerState(
                    hostname=hostname,
                    pid=int(data["pid"]),
                    queues=tuple(str(q) for q in data["queues"]),
                    at=float(data["at"]),
                    pool=_pool(data.get("pool")),
                    runtime=_runtime(data.get("runtime")),
                    processes=_pool_size(data.get("processes")),
                )
            )
        except (ValueError, TypeError, KeyError):
            logger.warning("fleet snapshot: unreadable heartbeat of %s", hostname)
    return tuple(found)


def _pool_size(data: Any) -> int | None:
    """The pool processes a heartbeat reports: a whole number from 1 to 10 000, or None."""
    return data if isinstance(data, int) and 0 < data <= 10_000 else None


def _runtime(data: Any) -> tuple[float, int] | None:
    """The run-time totals of a heartbeat: two finite, non-negative numbers, or None."""
    if not isinstance(data, list) or len(data) != 2:
        return None
    seconds, tasks = data
    if not isinstance(seconds, int | float) or not isinstance(tasks, int):
        return None
    if not (math.isfinite(seconds) and seconds >= 0 and tasks >= 0):
        return None
    return float(seconds), tasks


def _pool(data: Any) -> PoolState | None:
    """The pool part of a heartbeat; None if absent or not readable (logged)."""
    if data is None:
        return None
    try:
        return PoolState(
            processes=int(data["processes"]),
            desired=int(data["desired"]),
            min=int(data["min"]),
            max=int(data["max"]),
            reason=str(data["reason"])[:300],
            at=float(data["at"]),
        )
    except (ValueError, TypeError, KeyError):
        logger.warning("fleet snapshot: unreadable pool in a heartbeat")
        return None


def _processes(replies: Sequence[Any]) -> tuple[ProcessState, ...]:
    found = []
    for reply in replies:
        if isinstance(reply, BaseException):
            continue
        for name, raw in sorted(reply.items()):
            try:
                data = json.loads(raw)
                found.append(
                    ProcessState(
                        host=str(data["host"]),
                        process=_text(name),
                        restarts=int(data["restarts"]),
                        last_exit=int(data["last_exit"]),
                        crash_looping=bool(data["crash_looping"]),
                        at=float(data["at"]),
                    )
                )
            except (ValueError, TypeError, KeyError):
                logger.warning("fleet snapshot: unreadable process entry %r", name)
    return tuple(found)


def _queues(
    broker: redis.Redis | AmqpBroker, names: list[str], now: float
) -> tuple[QueueState, ...]:
    if isinstance(broker, AmqpBroker):  # RabbitMQ's own counts: ready only (see workers.amqp)
        return tuple(QueueState(name=q, ready=n) for q, (n, _) in broker.depths(names).items())
    steps = len(PRIORITY_STEPS)
    pipe = broker.pipeline(transaction=False)
    for queue in names:
        for list_key in priority_queues(queue):
            pipe.llen(list_key)
    pipe.hvals(Channel.unacked_key)
    replies = [raise_error(r) for r in pipe.execute(raise_on_error=False)]
    unacked, scheduled = _reserved(replies[-1], now)
    found = []
    for i, queue in enumerate(names):
        counts = tuple(int(n) for n in replies[i * steps : (i + 1) * steps])
        found.append(
            QueueState(
                name=queue,
                ready=sum(counts),
                unacked=unacked.get(queue, 0),
                scheduled=scheduled.get(queue, 0),
                by_priority=counts,
            )
        )
    return tuple(found)


def _reserved(values: Iterable[bytes], now: float) -> tuple[dict[str, int], dict[str, int]]:
    """Unacked and ETA-held messages per queue, from kombu's `unacked` hash values.

    Each value is JSON `[message, exchange, routing_key]`; an entry that does not
    parse counts under queue "unknown".
    """
    unacked: dict[str, int] = {}
    scheduled: dict[str, int] = {}
    for raw in values:
        queue, eta = "unknown", None
        try:
            message, _exchange, routing_key = json.loads(raw)
            queue = str(routing_key)
            eta = _eta(message)
        except (ValueError, TypeError):
            pass
        unacked[queue] = unacked.get(queue, 0) + 1
        if eta is not None and eta > now:
            scheduled[queue] = scheduled.get(queue, 0) + 1
    return unacked, scheduled


def _eta(message: Any) -> float | None:
    headers = message.get("headers") if isinstance(message, dict) else None
    eta = headers.get("eta") if isinstance(headers, dict) else None
    if not isinstance(eta, str):
        return None
    try:
        return datetime.fromisoformat(eta).timestamp()
    except ValueError:
        return None


def take(extra: Sequence[str] = ()) -> FleetSnapshot:
    """A snapshot of this fleet: the settings' Redis servers and queues (and `extra`
    queues: a balanced task's targets)."""
    queues = get_settings().all_queues
    return read_fleet(policy_redis(), broker(), queues + tuple(q for q in extra if q not in queues))
