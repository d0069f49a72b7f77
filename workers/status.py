"""`bulwark status`: breakers, bulkheads, degradation levels, dead letters and workers."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import redis

from policies import keys
from policies.breaker import list_breakers
from policies.bulkhead import list_bulkheads
from policies.deadletter import DeadLetterStore
from policies.degradation import list_services


def fleet_status(client: redis.Redis) -> dict[str, Any]:
    """Everything `bulwark status` shows, as plain data."""
    workers = []
    for key in client.scan_iter(match=keys.pattern("worker", "heartbeat"), count=500):
        raw = client.get(key)
        if raw:
            workers.append(json.loads(raw))
    letters = DeadLetterStore(client)
    return {
        "breakers": [asdict(b) for b in list_breakers(client)],
        "bulkheads": [asdict(b) for b in list_bulkheads(client)],
        "services": [_service(s) for s in list_services(client)],
        "deadletters": {"count": letters.count(), "total": letters.total()},
        "workers": sorted(workers, key=lambda w: w["hostname"]),
    }


def _service(state: Any) -> dict[str, Any]:
    data = asdict(state)
    data["level"] = str(state.level)
    data["floor"] = str(state.floor)
    data["from_level"] = str(state.from_level)
    return data


def render(status: dict[str, Any]) -> str:
    """The status as aligned text tables."""
    out: list[str] = []

    def table(title: str, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        out.append(title)
        if not rows:
            out.append("  (none)")
            out.append("")
            return
        cells = [tuple(str(c) for c in row) for row in [header, *rows]]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        for row in cells:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        out.append("")

    table(
        "BREAKERS",
        ("name", "state", "failures", "window", "trips", "trials", "retry_after"),
        [
            (
                b["name"],
                b["state"],
                b["failures"],
                f"{b['window_failures']}/{b['window_calls']}",
                b["trips"],
                b["trials_in_flight"],
                f"{b['retry_after']:.1f}s" if b["state"] in ("open", "half_open") else "-",
            )
            for b in status["breakers"]
        ],
    )
    table(
        "BULKHEADS",
        ("name", "in_use", "limit", "available", "utilization"),
        [
            (b["name"], b["in_use"], b["limit"], b["available"], f"{b['utilization']:.0%}")
            for b in status["bulkheads"]
        ],
    )
    table(
        "SERVICES",
        ("service", "level", "floor", "reason", "last_recovery"),
        [
            (
                s["service"],
                s["level"],
                s["floor"],
                s["reason"] or "-",
                f"{s['last_recovery']:.1f}s" if s["last_recovery"] is not None else "-",
            )
            for s in status["services"]
        ],
    )
    now = time.time()
    table(
        "WORKERS",
        ("hostname", "queues", "heartbeat_age"),
        [
            (w["hostname"], ",".join(w["queues"]), f"{max(0.0, now - w['at']):.0f}s")
            for w in status["workers"]
        ],
    )
    d = status["deadletters"]
    out.append(f"DEAD LETTERS  {d['count']} kept ({d['total']} ever)")
    return "\n".join(out)
