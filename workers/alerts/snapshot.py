"""Read the fleet snapshot the rules look at, from the policies' and the broker's Redis."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import redis

from policies import keys
from policies.breaker import list_breakers
from policies.deadletter import DeadLetterStore
from workers.alerts.rules import Snapshot
from workers.alerts.store import AlertStore
from workers.metrics import queue_depths

HEALTH_RESULTS = keys.key("health", "fleet", "results")
HEALTH_LAST_RUN = keys.key("health", "fleet", "last_run")


def health_results(client: redis.Redis) -> tuple[dict[str, dict[str, Any]], float | None]:
    """The stored health results by check name, and the time of the last run."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(HEALTH_RESULTS)
        pipe.get(HEALTH_LAST_RUN)
        raw, last = pipe.execute()
    results: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        try:
            results[name.decode()] = json.loads(value)
        except ValueError:
            results[name.decode()] = {"status": "unhealthy", "message": "unreadable result"}
    return results, (float(last) if last is not None else None)


def take_snapshot(
    client: redis.Redis, broker: redis.Redis, store: AlertStore, queues: Iterable[str]
) -> Snapshot:
    health, last_run = health_results(client)
    total = DeadLetterStore(client).total()
    growth = store.observe_deadletters(total)
    return Snapshot(
        now=store.now(),
        health=health,
        health_last_run=last_run,
        breakers=[asdict(b) for b in list_breakers(client)],
        queues=queue_depths(broker, queues),
        deadletters_total=total,
        deadletters_grew_at=growth.at,
        deadletters_grew_by=growth.by,
    )
