"""The demo's stock lookups through the tiered cache, on a real worker: the catalog is
asked once per SKU, and `bulwark status` shows the fleet's hit ratio."""

from __future__ import annotations

import contextlib
import io
import json

import redis

from tasks.dependencies import dependency
from tests.conftest import StartWorker
from tests.kit import poll
from workers.client import client
from workers.ops.cli import main as bulwark


def test_stock_lookups_hit_the_cache_and_status_shows_the_ratio(
    r: redis.Redis, start_worker: StartWorker
) -> None:
    start_worker(["default"], name="stock")  # catalog.* runs on default
    app = client()
    results = [app.send_task("catalog.stock", args=[f"sku-{i % 2}"]) for i in range(40)]
    answers = [x.get(timeout=30) for x in results]
    assert {a["sku"] for a in answers} == {"sku-0", "sku-1"}
    assert len({(a["sku"], a["level"]) for a in answers}) == 2  # one level per SKU
    assert dependency("catalog").calls() == 2, "the catalog was asked once per SKU"

    def ratio() -> float | None:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bulwark(["status", "--json"])
        return json.loads(out.getvalue())["caches"].get("catalog.stock")

    booked = poll(ratio, deadline=10, what="the hit ratio in bulwark status")
    assert booked >= 0.9, booked  # 38 hits of 40 lookups, as booked so far
