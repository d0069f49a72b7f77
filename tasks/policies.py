"""The policies the task catalogue runs through, declared by name.

Defaults come from the settings (BULWARK_BREAKER_*, BULWARK_BULKHEAD_*, ...);
what is given here overrides them for one policy.
"""

from __future__ import annotations

from workers.registry import registry

# One breaker, one fleet-wide concurrency limit and one degradation level per dependency.
PAYMENTS = registry.breaker("payments")
registry.bulkhead("payments", limit=4)
registry.service("payments")
registry.budget("payments")

INVENTORY = registry.breaker("inventory")
registry.bulkhead("inventory", limit=8)
registry.budget("inventory")

NOTIFICATIONS = registry.breaker("notifications")
registry.bulkhead("notifications")
registry.service("notifications")
registry.budget("notifications")
