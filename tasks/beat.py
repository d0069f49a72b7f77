"""Jobs the beat scheduler drives."""

from __future__ import annotations

from typing import Any

from workers.app import app
from workers.autodegrade import observe_services


@app.task(name="bulwark.policies.tick", ignore_result=True)
def policies_tick() -> dict[str, Any]:
    """Apply the automatic degradation rule to every declared service (stepwise recovery)."""
    return observe_services()
