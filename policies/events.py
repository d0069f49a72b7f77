"""What policies report: small frozen event objects and a listener protocol.

Policies never import prometheus_client or opentelemetry. They call
`Emitter.emit(event)`; the worker tier registers listeners that turn events
into metrics, span events, log lines, audit records and alerts. A listener
that raises is logged and skipped: it never fails the call it reports on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every policy event: which policy instance it is about."""

    policy: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerTransition(Event):
    """A breaker changed state (closed, open, half_open, forced_open, disabled, metrics_only)."""

    policy: str = "breaker"
    from_state: str
    to_state: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRejected(Event):
    """A policy refused a call for now (open breaker, full bulkhead, degraded service)."""

    reason: str
    retry_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class CallRecorded(Event):
    """A breaker recorded the outcome of a call it admitted."""

    policy: str = "breaker"
    success: bool
    duration: float
    slow: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkheadChanged(Event):
    """A bulkhead lease was taken, renewed, released or found expired."""

    policy: str = "bulkhead"
    action: str  # acquired | released | renewed | lost
    in_use: int
    limit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DegradationChanged(Event):
    """A service moved to another degradation level."""

    policy: str = "degradation"
    from_level: str
    to_level: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Recovered(Event):
    """A service or breaker returned to normal; `duration` is the measured outage."""

    duration: float


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreUnavailable(Event):
    """Redis could not be reached; the policy runs on local, in-process state."""

    error: str
    mode: str  # what the policy does meanwhile, e.g. "local fail-open"


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRestored(Event):
    """Redis answers again; the policy is back on shared state."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEvent(Event):
    """Something happened to a task because of a policy (for the worker tier)."""

    task_name: str
    task_id: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDeferred(TaskEvent):
    """A task could not run now and was re-scheduled; not counted as a retry."""

    countdown: float
    deferrals: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRetried(TaskEvent):
    """A task failed and was retried with a countdown."""

    attempt: int
    countdown: float
    failure: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskDeadLettered(TaskEvent):
    """A task went to the dead-letter queue."""

    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFellBack(TaskEvent):
    """A task's result came from a fallback (status degraded, fallback or unavailable)."""

    status: str


class Listener(Protocol):
    def __call__(self, event: Event) -> None: ...


class Emitter:
    """Delivers events to listeners; a failing listener is logged, never raised."""

    def __init__(self, *listeners: Listener) -> None:
        self._listeners: list[Listener] = list(listeners)

    def subscribe(self, listener: Listener) -> Listener:
        self._listeners.append(listener)
        return listener

    def unsubscribe(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def emit(self, event: Event) -> None:
        for listener in tuple(self._listeners):
            try:
                listener(event)
            except Exception:
                logger.exception("event listener %r failed on %r", listener, event)


class Recorder:
    """A listener that keeps every event: for tests and the demo."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, kind)]


#: The process-wide emitter every policy uses unless given its own.
default_emitter = Emitter()
