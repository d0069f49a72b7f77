"""A listener that turns policy events into log lines (one per event)."""

from __future__ import annotations

import logging
from dataclasses import asdict

from policies import events

logger = logging.getLogger("bulwark.policies")

_WARN = (
    events.StoreUnavailable,
    events.TaskDeferred,
    events.TaskRetried,
    events.TaskFellBack,
)


def describe(event: events.Event) -> str:
    """A one-line, human-readable account of `event`."""
    match event:
        case events.BreakerTransition():
            return f"breaker {event.name}: {event.from_state} -> {event.to_state} ({event.reason})"
        case events.DegradationChanged():
            return f"service {event.name}: {event.from_level} -> {event.to_level} ({event.reason})"
        case events.Recovered():
            return f"{event.policy} {event.name}: recovered after {event.duration:.1f} s"
        case events.CallRejected():
            return (
                f"{event.policy} {event.name}: rejected ({event.reason}), "
                f"may pass in {event.retry_after:.1f} s"
            )
        case events.StoreUnavailable():
            return f"{event.policy} {event.name}: Redis unreachable, {event.mode} ({event.error})"
        case events.StoreRestored():
            return f"{event.policy} {event.name}: Redis reachable again, shared state resumed"
        case events.TaskDeferred():
            return (
                f"task {event.task_name}[{event.task_id}] deferred {event.countdown:.1f} s "
                f"(deferral {event.deferrals}): {event.reason}"
            )
        case events.TaskRetried():
            return (
                f"task {event.task_name}[{event.task_id}] retry {event.attempt} in "
                f"{event.countdown:.2f} s ({event.failure}): {event.reason}"
            )
        case events.TaskDeadLettered():
            return f"task {event.task_name}[{event.task_id}] dead-lettered: {event.reason}"
        case events.TaskFellBack():
            return f"task {event.task_name}[{event.task_id}] answered by fallback: {event.status}"
    return f"{type(event).__name__} {asdict(event)}"


def log_event(event: events.Event) -> None:
    """Listener: log `event` at a level fitting its weight."""
    # A rejection is reported again, with its task, as TaskDeferred.
    if isinstance(event, events.CallRecorded | events.BulkheadChanged | events.CallRejected):
        level = logging.DEBUG
    elif isinstance(event, events.TaskDeadLettered):
        level = logging.ERROR
    elif isinstance(event, _WARN):
        level = logging.WARNING
    else:
        level = logging.INFO
    if logger.isEnabledFor(level):
        logger.log(level, describe(event), extra={"event": type(event).__name__})
