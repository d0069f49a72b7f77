"""Automatic degradation: a service follows its dependency's breaker.

The breaker and the service of one dependency share its name. When the
breaker opens the service degrades at once (`degrade_on_breaker`, a policy
event listener); the beat tick (`observe_services`) brings it back one level
per `BULWARK_DEGRADATION_RECOVERY_STEP` seconds of health.
"""

from __future__ import annotations

from typing import Any

from policies import events
from policies.degradation import Degradation
from workers.registry import registry
from workers.resources import policy

#: Breaker states that refuse (some) calls.
OPEN_STATES = frozenset({"open", "half_open", "forced_open"})


def observe_service(name: str, *, breaker_open: bool | None = None) -> str | None:
    """Apply the automatic degradation rule to service `name`; the new level if it changed."""
    service: Degradation = policy("service", name)
    failures = 0
    if breaker_open is None and any(d.name == name for d in registry.declared("breaker")):
        snapshot = policy("breaker", name).snapshot()
        breaker_open = snapshot.state in OPEN_STATES
        failures = snapshot.window_failures
    state = service.observe(breaker_open=bool(breaker_open), failures=failures)
    return str(state.level) if state is not None and state.changed else None


def observe_services() -> dict[str, Any]:
    """`observe_service` for every declared service: what the beat tick runs."""
    changes = {}
    for decl in registry.declared("service"):
        changed = observe_service(decl.name)
        if changed is not None:
            changes[decl.name] = changed
    return changes


def degrade_on_breaker(event: events.Event) -> None:
    """Listener: a breaker of a declared service opened or closed -> re-assess the service now."""
    if not isinstance(event, events.BreakerTransition):
        return
    if any(d.name == event.name for d in registry.declared("service")):
        observe_service(event.name, breaker_open=event.to_state in OPEN_STATES)
