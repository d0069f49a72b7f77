"""The worker tier's listeners of policy events, subscribed once per process.

Policies report what happens to them as events (`policies.events`); here they
become log lines, metrics, span events and automatic degradation. A forked
child inherits the subscriptions of its parent.
"""

from __future__ import annotations

import threading

from policies import events
from workers.autodegrade import degrade_on_breaker
from workers.telemetry.eventlog import log_event
from workers.telemetry.metrics import record_event
from workers.telemetry.tracing import span_event

LISTENERS: tuple[events.Listener, ...] = (log_event, record_event, span_event, degrade_on_breaker)

_lock = threading.Lock()
_subscribed = False


def ensure() -> None:
    """Subscribe every listener to `events.default_emitter`, once per process tree."""
    global _subscribed
    with _lock:
        if not _subscribed:
            for listener in LISTENERS:
                events.default_emitter.subscribe(listener)
            _subscribed = True
