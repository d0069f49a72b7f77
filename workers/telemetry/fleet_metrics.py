"""The fleet gauges beat serves on its /metrics, from one `workers.fleet` snapshot.

- bulwark_fleet_up: 1 if the last read of Redis worked
- bulwark_queue_depth{queue}: ready messages, all Redis priority sub-queues
- bulwark_queue_unacked{queue}: reserved by workers, not acknowledged yet
  (prefetched, running, or held for a countdown/ETA)
- bulwark_queue_scheduled{queue}: of those, held for an ETA still ahead
- bulwark_breaker_state{breaker, state}: 1 for the current state, 0 for the
  others (closed, half_open, open, forced_open, disabled, metrics_only)
- bulwark_bulkhead_in_use{bulkhead}, bulwark_bulkhead_limit{bulkhead}
- bulwark_degradation_level{service}: 0 full, 1 degraded, 2 minimal, 3 offline
- bulwark_deadletters_kept (now), bulwark_deadletters_total (ever)
- bulwark_workers: workers with a live heartbeat
- bulwark_process_restarts{process}, bulwark_process_crash_looping{process}:
  what `bulwark up`'s supervisor restarted
- bulwark_health_status{check}: 0 healthy, 1 degraded, 2 unhealthy;
  bulwark_health_check_latency_seconds{check}; bulwark_health_last_run_timestamp_seconds
- bulwark_security_refusals_last_minute{kind}: task messages refused by
  verification fleet-wide in the last minute (to the bucket), every kind, 0 included
- bulwark_worker_utilization{worker}: share of a worker's pool busy, between its last two
  heartbeats (their run-time totals); bulwark_balance_efficiency{task} (least busy over
  busiest worker of a balanced task's targets) and bulwark_balance_backlog_spread{task}
- bulwark_scaling_desired_workers{group}, bulwark_scaling_current_workers{group},
  bulwark_scaling_ready_workers{group}: the fleet scaler's last decision per
  Procfile worker group (`workers.scaling.fleet`; `scaling_families`)

The snapshot is taken when scraped, at most once per `BULWARK_METRICS_INTERVAL`.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from workers import balancing
from workers.fleet import SEVERITY, FleetSnapshot
from workers.scaling.fleet import read_decisions
from workers.security.refusals import KINDS
from workers.stores import StoreHealth

BREAKER_STATES = ("closed", "half_open", "open", "forced_open", "disabled", "metrics_only")


def _gauge(name: str, doc: str, labels: list[str], rows: Iterable[tuple[Any, ...]]) -> Any:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for *values, number in rows:
        family.add_metric([str(v) for v in values], float(number))
    return family


def fleet_families(snap: FleetSnapshot) -> Iterator[Any]:
    """Metric families for one fleet snapshot."""
    yield _gauge(
        "bulwark_fleet_up", "1 if Redis answered the last fleet read", [], [(int(snap.up),)]
    )
    if not snap.up:
        return
    yield _gauge(
        "bulwark_queue_depth",
        "Ready messages, all priorities",
        ["queue"],
        ((q.name, q.ready) for q in snap.queues),
    )
    yield _gauge(
        "bulwark_queue_unacked",
        "Messages reserved by workers, not acknowledged",
        ["queue"],
        ((q.name, q.unacked) for q in snap.queues),
    )
    yield _gauge(
        "bulwark_queue_scheduled",
        "Reserved messages held for an ETA still ahead",
        ["queue"],
        ((q.name, q.scheduled) for q in snap.queues),
    )
    yield _gauge(
        "bulwark_breaker_state",
        "1 for the breaker's current state",
        ["breaker", "state"],
        ((b.name, s, int(b.state == s)) for b in snap.breakers for s in BREAKER_STATES),
    )
    yield _gauge(
        "bulwark_bulkhead_in_use",
        "Leases held",
        ["bulkhead"],
        ((b.name, b.in_use) for b in snap.bulkheads),
    )
    yield _gauge(
        "bulwark_bulkhead_limit",
        "Concurrent calls allowed",
        ["bulkhead"],
        ((b.name, b.limit) for b in snap.bulkheads),
    )
    yield _gauge(
        "bulwark_degradation_level",
        "0 full, 1 degraded, 2 minimal, 3 offline",
        ["service"],
        ((s.service, int(s.level)) for s in snap.services),
    )
    yield _gauge("bulwark_deadletters_kept", "Dead letters kept", [], [(snap.deadletters_kept,)])
    total = CounterMetricFamily("bulwark_deadletters", "Dead letters ever", labels=[])
    total.add_metric([], float(snap.deadletters_total))
    yield total
    yield _gauge("bulwark_workers", "Workers with a live heartbeat", [], [(len(snap.workers),)])
    yield _gauge(
        "bulwark_process_restarts",
        "Times a supervisor restarted this process after it exited",
        ["process"],
        ((p.process, p.restarts) for p in snap.processes),
    )
    yield _gauge(
        "bulwark_process_crash_looping",
        "1 while the process crashes again and again",
        ["process"],
        ((p.process, int(p.crash_looping)) for p in snap.processes),
    )
    results = snap.health.values()
    yield _gauge(
        "bulwark_health_status",
        "0 healthy, 1 degraded, 2 unhealthy",
        ["check"],
        ((r.check, SEVERITY[r.status]) for r in results),
    )
    yield _gauge(
        "bulwark_health_check_latency_seconds",
        "How long the check took",
        ["check"],
        ((r.check, r.latency_seconds) for r in results),
    )
    refused = snap.refusals_within(60.0)
    yield _gauge(
        "bulwark_security_refusals_last_minute",
        "Task messages refused by verification fleet-wide in the last minute",
        ["kind"],
        ((kind, refused.get(kind, 0)) for kind in (*KINDS, *sorted(set(refused) - set(KINDS)))),
    )
    if snap.health_last_run is not None:
        yield _gauge(
            "bulwark_health_last_run_timestamp_seconds",
            "When health checks last ran",
            [],
            [(snap.health_last_run,)],
        )


class Utilisation:
    """Each worker's busy share between two snapshots: the growth of its run-time total
    over the time between its two heartbeats, times its pool processes; and, for every
    balanced task, how evenly its target queues' workers are busy and backlogged."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, float]] = {}  # hostname -> (heartbeat at, seconds)
        self.of: dict[str, float] = {}

    def update(self, snap: FleetSnapshot) -> None:
        seen = {}
        for w in snap.workers:
            if w.runtime is None:
                continue
            seen[w.hostname] = (w.at, w.runtime[0])
            before = self._last.get(w.hostname)
            if before is None or w.at <= before[0] or w.runtime[0] < before[1]:
                continue  # the same heartbeat again, or a restarted worker
            busy = (w.runtime[0] - before[1]) / ((w.at - before[0]) * (w.processes or 1))
            self.of[w.hostname] = max(0.0, min(1.0, busy))
        self._last = seen
        self.of = {h: u for h, u in self.of.items() if h in seen}

    def families(self, snap: FleetSnapshot) -> Iterator[Any]:
        yield _gauge(
            "bulwark_worker_utilization",
            "Share of a worker's pool busy running tasks, between its last two heartbeats",
            ["worker"],
            sorted(self.of.items()),
        )
        efficiency, spread = [], []
        for task, balance in sorted(balancing.declared().items()):
            targets = set(balance.targets)
            busy = [self.of[w.hostname] for w in snap.workers
                    if w.hostname in self.of and targets & set(w.queues)]  # fmt: skip
            if busy and max(busy) > 0:
                efficiency.append((task, min(busy) / max(busy)))
            depths = [snap.queue(t).backlog for t in balance.targets]
            mean = statistics.mean(depths)
            spread.append((task, statistics.pstdev(depths) / mean if mean else 0.0))
        yield _gauge(
            "bulwark_balance_efficiency",
            "Least busy over busiest worker of a balanced task's target queues (1: even)",
            ["task"],
            efficiency,
        )
        yield _gauge(
            "bulwark_balance_backlog_spread",
            "Standard deviation over mean of a balanced task's target queue backlogs",
            ["task"],
            spread,
        )


class FleetCollector:
    """Fleet gauges from a snapshot taken when scraped, at most once per `interval` seconds."""

    def __init__(
        self,
        take: Callable[[], FleetSnapshot],
        interval: float,
        scaling: Callable[[], redis.Redis] | None = None,
        stores: Callable[[], list[StoreHealth]] | None = None,
    ) -> None:
        self.take = take
        #: Checks the three stores, as often as the snapshot is taken (None: not served).
        self.stores = stores
        self._stores: list[StoreHealth] = []
        #: Gives the client the fleet scaler's decisions are read with (None: not served).
        self.scaling = scaling
        self.interval = interval
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._snapshot: FleetSnapshot | None = None
        self.utilisation = Utilisation()

    def snapshot(self) -> FleetSnapshot:
        with self._lock:
            if self._snapshot is None or time.monotonic() - self._at >= self.interval:
                self._snapshot = self.take()
                if self.stores is not None:
                    self._stores = self.stores()
                self._at = time.monotonic()
                if self._snapshot.up:
                    self.utilisation.update(self._snapshot)
            return self._snapshot

    def collect(self) -> Iterator[Any]:
        snap = self.snapshot()
        yield from fleet_families(snap)
        if self.stores is not None:
            yield _gauge(
                "bulwark_store_up",
                "1 if the store answered its last check; role: policy, broker or backend; "
                "engine: redis, redis sentinel, redis cluster or rabbitmq",
                ["role", "engine"],
                [(s.role, s.engine.split(" (")[0], int(s.ok)) for s in self._stores],
            )
        if snap.up:
            yield from self.utilisation.families(snap)
            if self.scaling is not None:
                yield from scaling_families(self.scaling())

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


def scaling_families(client: redis.Redis) -> Iterator[Any]:
    """The scaling gauges, from the decisions stored in Redis (none if Redis is away:
    `bulwark_fleet_up` already says so)."""
    try:
        decisions = sorted(read_decisions(client).items())
    except redis.RedisError as exc:
        logging.getLogger(__name__).warning("scaling gauges: Redis unreachable (%s)", exc)
        return
    for metric, doc, field in (
        ("bulwark_scaling_desired_workers", "Workers the fleet scaler wants", "desired"),
        ("bulwark_scaling_current_workers", "Workers with a live heartbeat", "current"),
        ("bulwark_scaling_ready_workers", "Workers beating on time", "ready"),
    ):
        yield _gauge(metric, doc, ["group"], ((n, getattr(d, field)) for n, d in decisions))
