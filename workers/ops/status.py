"""`bulwark status` and `bulwark health`: views of one fleet snapshot."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from policies.routing import Balance
from workers import fleet
from workers.amqp import DEAD_QUEUE, AmqpBroker
from workers.balancing import published
from workers.caching import hit_ratios
from workers.fleet import FleetSnapshot, HealthResult
from workers.resources import broker, policy_redis
from workers.settings import get_settings
from workers.stores import StoreHealth, check_all
from workers.telemetry.health import HealthContext, in_check_order, run_checks, store_results, worst


def _table(
    out: list[str], title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    out.append(title)
    if not rows:
        out.append("  (none)")
        out.append("")
        return
    cells = [tuple(str(c) for c in row) for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    out.append("")


def render_status(
    snap: FleetSnapshot,
    now: float | None = None,
    caches: dict[str, float] | None = None,
    balances: Mapping[str, Balance] | None = None,
) -> str:
    """The snapshot as aligned text tables (and the caches' hit ratios and the balanced
    tasks' shards, if given)."""
    if not snap.up:
        return f"FLEET UNREADABLE: {snap.error}"
    now = snap.taken_at if now is None else now
    out: list[str] = []
    _table(
        out,
        "QUEUES",
        ("queue", "ready", "unacked", "scheduled"),
        [(q.name, q.ready, q.unacked, q.scheduled) for q in snap.queues],
    )
    _table(
        out,
        "BREAKERS",
        ("name", "state", "failures", "window", "trips", "trials", "retry_after"),
        [
            (
                b.name,
                b.state,
                b.failures,
                f"{b.window_failures}/{b.window_calls}",
                b.trips,
                b.trials_in_flight,
                f"{b.retry_after:.1f}s" if b.state in ("open", "half_open") else "-",
            )
            for b in snap.breakers
        ],
    )
    _table(
        out,
        "BULKHEADS",
        ("name", "in_use", "limit", "available", "utilization"),
        [(b.name, b.in_use, b.limit, b.available, f"{b.utilization:.0%}") for b in snap.bulkheads],
    )
    _table(
        out,
        "SERVICES",
        ("service", "level", "floor", "reason", "last_recovery"),
        [
            (
                s.service,
                s.level,
                s.floor,
                s.reason or "-",
                f"{s.last_recovery:.1f}s" if s.last_recovery is not None else "-",
            )
            for s in snap.services
        ],
    )
    _table(
        out,
        "WORKERS",
        ("hostname", "queues", "heartbeat_age", "pool", "autoscale"),
        [
            (
                w.hostname,
                ",".join(w.queues),
                f"{max(0.0, now - w.at):.0f}s",
                f"{w.pool.processes} ({w.pool.min}-{w.pool.max})" if w.pool else "-",
                f"-> {w.pool.desired}: {w.pool.reason}" if w.pool else "-",
            )
            for w in snap.workers
        ],
    )
    if balances is not None:
        _table(out, "BALANCING", ("task", "strategy", "backlog per target"),
               [(name, b.strategy, " ".join(f"{t}={snap.queue(t).backlog}" for t in b.targets))
                for name, b in sorted(balances.items())])  # fmt: skip
    if caches is not None:
        _table(out, "CACHES", ("cache", "hit_ratio"),
               [(name, f"{ratio:.0%}") for name, ratio in sorted(caches.items())])  # fmt: skip
    out.append(f"DEAD LETTERS  {snap.deadletters_kept} kept ({snap.deadletters_total} ever)")
    return "\n".join(out)


def render_health(results: Sequence[HealthResult], last_run: float | None, now: float) -> str:
    if last_run is None:
        return "no health results stored yet (is beat running?); `bulwark health --run` runs them"
    lines = [f"FLEET {worst(results).upper()}  (checked {max(0.0, now - last_run):.0f}s ago)"]
    width = max((len(r.check) for r in results), default=5)
    for r in results:
        lines.append(
            f"  {r.check:{width}}  {r.status:9}  {r.latency_seconds * 1000:7.1f} ms  {r.message}"
        )
    return "\n".join(lines)


def _snapshot(extra: Sequence[str] = ()) -> FleetSnapshot:
    return fleet.take(extra).require()


def render_stores(found: Sequence[StoreHealth]) -> str:
    rows = [(s.role, s.engine, s.url, "ok" if s.ok else f"DOWN: {s.error}") for s in found]
    out: list[str] = []
    _table(out, "STORES", ("role", "engine", "url", "health"), rows)
    return "\n".join(out)


def _cmd_status(args: argparse.Namespace) -> int:
    balances, problems = published(policy_redis())  # what the workers declared balanced
    snap = _snapshot([t for b in balances.values() for t in b.targets])
    caches = hit_ratios(policy_redis())
    found = check_all(get_settings())
    where = broker()
    dead = where.dead() if isinstance(where, AmqpBroker) and snap.up else None
    if args.json:
        balancing = {name: {"strategy": b.strategy,
                            "backlog": {t: snap.queue(t).backlog for t in b.targets}}
                     for name, b in balances.items()}  # fmt: skip
        print(json.dumps({**snap.as_dict(), "caches": caches, "balancing": balancing,
                          "stores": {s.role: s.as_dict() for s in found},
                          "rabbitmq_dead_lettered": dead,
                          "problems": problems}, indent=2, default=str))  # fmt: skip
    else:
        print(render_stores(found))
        if dead is not None:  # RabbitMQ's own dead-lettering (delivery limit), apart
            print(f"RABBITMQ DEAD-LETTERED  {dead} in {DEAD_QUEUE.name}\n")
        print(render_status(snap, caches=caches, balances=balances))
        for problem in problems:
            print(f"! {problem}")
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    if args.run:
        ctx = HealthContext.from_settings()
        results = run_checks(ctx)
        last_run: float | None = time.time()
        store_results(policy_redis(), results, last_run or 0.0)
    else:
        snap = _snapshot()
        results, last_run = in_check_order(snap.health.values()), snap.health_last_run
    if args.json:
        print(json.dumps({"last_run": last_run, "results": [r.as_dict() for r in results]}))
    else:
        print(render_health(results, last_run, time.time()))
    if last_run is None:
        return 2
    return 1 if worst(results) == "unhealthy" else 0


def register(sub: Any) -> None:
    """Add `bulwark status` and `bulwark health` to the command's subparsers."""
    p = sub.add_parser("status", help="queues, breakers, bulkheads, levels, workers, dead letters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("health", help="fleet health checks (stored by beat; --run runs them now)")
    p.add_argument("--run", action="store_true", help="run the checks now and store them")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_health)
