"""Beat-driven health checks: `bulwark.health.check` runs the registry and stores results."""

from __future__ import annotations

import time
from typing import Any

from workers.app import app
from workers.telemetry.health import HealthContext, run_checks, store_results, worst


@app.task(name="bulwark.health.check", ignore_result=True)
def health_check() -> dict[str, Any]:
    """Run every registered check and store the results (HEALTH RESULTS CONTRACT)."""
    ctx = HealthContext.from_settings()
    results = run_checks(ctx)
    store_results(ctx.policy, results, time.time())
    return {"status": worst(results), "results": {r.check: r.status for r in results}}
