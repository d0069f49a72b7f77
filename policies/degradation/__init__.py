"""Degradation levels per service, shared by the fleet, with fallbacks.

policy   `Degradation`: the level from a local cache, `execute_with_fallback`,
         operator levels and the automatic rule (`AutoDegrade`)
store    `Level`, `ServiceState`, the Redis store (lua/degradation_step.lua) and
         the memory store
"""

from policies.degradation.policy import (
    AutoDegrade,
    Degradation,
    DegradationConfig,
    Outcome,
    list_services,
    pass_level,
)
from policies.degradation.store import Level, ServiceState

__all__ = [
    "AutoDegrade",
    "Degradation",
    "DegradationConfig",
    "Level",
    "Outcome",
    "ServiceState",
    "list_services",
    "pass_level",
]
